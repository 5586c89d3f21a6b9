"""The README's layout picture against the tree: every file it names exists, and every module of the
suite's packages is named in it, under its folder."""

from __future__ import annotations

import re

from tests.helpers import ROOT

PACKAGES = ("diffusion", "networks", "evaluation", "lightning_modules", "lightning_modules/callbacks", "datamodules",
            "tools", "tests/helpers")  # fmt: skip
NAME = re.compile(r"[\w.-]+(?:\.py|\.toml|/)")


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
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


def test_every_module_of_the_suite_is_in_the_layout():
    named = named_paths()
    modules = {
        str(file.relative_to(ROOT))
        for package in PACKAGES
        for file in (ROOT / package).glob("*.py")
        if file.name != "__init__.py"
    }
    assert not sorted(modules - named), sorted(modules - named)
