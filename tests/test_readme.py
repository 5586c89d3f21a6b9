"""The layout picture (docs/layout.md, "## The tree") against the tree: every file it names exists, and every
module of the suite's packages is named in it, under its folder. The README links it."""

from __future__ import annotations

import re

from tests.helpers import ROOT

PACKAGES = ("diffusion", "networks", "decisions", "reports", "experiment", "lightning_modules",
            "lightning_modules/callbacks", "datamodules", "tools", "tests/helpers")  # fmt: skip
NAME = re.compile(r"[\w.-]+(?:\.py|\.toml|/)")
LAYOUT = ROOT / "docs" / "layout.md"
SECTION = "## The tree"
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def layout_block() -> list[str]:
    text = LAYOUT.read_text()
    section = text[text.index(SECTION) :]
    start = section.index("```\n") + 4
    return section[start : section.index("```", start)].splitlines()


def named_paths() -> set[str]:
    """Every path the picture names, from its indentation: `folder/` lines open a level."""
    paths, parents = set(), {}
    for line in layout_block():
        depth = (len(line) - len(line.lstrip())) // 2
        for word in line.split():
            if not NAME.fullmatch(word):
                break
            parent = parents.get(depth - 1, "") if depth else ""
            path = parent + word
            paths.add(path.rstrip("/"))
            if word.endswith("/"):
                parents[depth] = path
    return paths


def test_every_file_the_layout_names_exists():
    missing = sorted(path for path in named_paths() if not (ROOT / path).exists())
    assert not missing, missing


def test_the_readme_links_the_layout():
    assert "](docs/layout.md" in (ROOT / "README.md").read_text()


def test_every_module_of_the_suite_is_in_the_layout():
    named = named_paths()
    modules = {
        str(file.relative_to(ROOT))
        for package in PACKAGES
        for file in (ROOT / package).glob("*.py")
        if file.name != "__init__.py"
    }
    assert not sorted(modules - named), sorted(modules - named)


def anchors(page) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_of_the_manual_exists():
    """README.md and docs/*.md: each relative link or image names a file that exists, and its #anchor a heading."""
    broken = []
    for page in MANUAL:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


# ---- the imports between folders (docs/layout.md, "## Imports between folders") ----------------------------
UPPER = ("cli", "tools", "lightning_modules", "experiment", "reports")  # listed by folder: they use the floors below
LOWER = ("decisions", "networks", "datamodules", "diffusion")  # listed file by file: each crossing is an exception
IMPORTS_SECTION = "## Imports between folders"


def code_imports() -> set[str]:
    """`source -> target` for every import of one top-level folder (or cli.py) by another, read from the code:
    an upper floor by folder, a lower one by file."""
    import ast

    found = set()
    for file in sorted(ROOT.rglob("*.py")):
        relative = file.relative_to(ROOT)
        top = relative.parts[0].removesuffix(".py")
        if top not in UPPER + LOWER:
            continue
        source = "cli.py" if top == "cli" else top if top in UPPER else str(relative)
        for node in ast.walk(ast.parse(file.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            found |= {f"{source} -> {name.split('.')[0]}" for name in names
                      if name.split(".")[0] in UPPER + LOWER and name.split(".")[0] != top}  # fmt: skip
    return found


def documented_imports() -> set[str]:
    text = LAYOUT.read_text()
    section = text[text.index(IMPORTS_SECTION) :]
    start = section.index("```\n") + 4
    lines = section[start : section.index("```", start)].splitlines()
    return {f"{source} -> {target}" for source, _, targets in (line.partition(" -> ") for line in lines if line.strip())
            for target in targets.split()}  # fmt: skip


def test_the_layout_lists_every_import_between_folders_and_no_other():
    code, documented = code_imports(), documented_imports()
    assert not sorted(code - documented), f"imports the layout does not list: {sorted(code - documented)}"
    assert not sorted(documented - code), f"imports the layout lists that the code lacks: {sorted(documented - code)}"


def test_no_wheel_is_claimed():
    """pyproject.toml holds tool settings only: the suite runs from its repository root (cli.py, configs/)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "[build-system]" not in text and "[project]" not in text and "setuptools" not in text


FLOORS = {"tools": 6, "cli": 5, "lightning_modules": 4, "reports": 3, "experiment": 2, "networks": 1,
          "decisions": 0, "datamodules": 0, "diffusion": 0}  # fmt: skip


def test_every_import_between_folders_goes_down_a_floor():
    """No folder imports one on its own floor or above it (docs/layout.md: the walk of one image never steps up)."""

    def floor(place: str) -> int:  # a folder, cli.py, or a file of a lower folder
        return FLOORS[place.split("/")[0].removesuffix(".py")]

    upward = [edge for edge in code_imports() if floor(edge.split(" -> ")[0]) <= floor(edge.split(" -> ")[1])]
    assert not upward, upward
