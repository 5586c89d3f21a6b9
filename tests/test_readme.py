"""The layout picture (docs/layout.md, "## The tree") against the tree: every file it names exists, and every
module of the suite's packages is named in it, under its folder. The README links it."""

from __future__ import annotations

import re

from tests.helpers import ROOT

PACKAGES = ("diffusion", "networks", "evaluation", "lightning_modules", "lightning_modules/callbacks", "datamodules",
            "tools", "tests/helpers")  # fmt: skip
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
