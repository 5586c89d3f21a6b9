"""The table of bad inputs (tests/data/bad_inputs.yaml): every entry through its command's real main, each answered
with exit status 2 and one line naming the file, row or option; no traceback. Extend the table, not this file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import cli
from experiment.user_errors import guarded
from tests.helpers import ROOT
from tests.helpers.data import write_pngs
from tests.helpers.runs import tiny_args
from tools import classify, export, study, summary

TABLE = ROOT / "tests" / "data" / "bad_inputs.yaml"
CASES = yaml.safe_load(TABLE.read_text())
TOOLS = {
    "cli": lambda argv: cli.run(argv),
    "classify": lambda argv: classify.main(argv),
    "study": lambda argv: guarded(lambda: study.main(argv)),
    "export": lambda argv: guarded(lambda: export.main(argv)),
    "summary": lambda argv: guarded(lambda: summary.main(argv)),
}


def test_the_table_is_large_and_every_entry_is_complete():
    assert len(CASES) >= 40
    for case in CASES:
        assert {"name", "tool", "args", "says"} <= set(case) and case["tool"] in TOOLS, case
    assert len({case["name"] for case in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_input_images")
    write_pngs(folder, "chest", 3, size=16)
    return folder


def write_files(case: dict, tmp: Path, images: Path) -> None:
    for name, text in (case.get("files") or {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text == "@png":
            shutil.copy(sorted(images.glob("*.png"))[0], path)
        else:
            path.write_text(text)


def command(case: dict, tmp: Path, images: Path, checkpoint: Path) -> list[str]:
    values = {"tmp": str(tmp), "images": str(images), "ckpt": str(checkpoint), "run": str(checkpoint.parent.parent)}
    args = [arg.format(**values) if arg != "{demo}" else arg for arg in case["args"]]
    if case["tool"] == "cli" and args[1:3] == ["--config", "{demo}"]:  # the demo shrunk to seconds, then the case's
        args = [args[0], *tiny_args(tmp / "run"), *args[3:]]
    return args


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_a_bad_input_is_one_line_and_exit_2(case, tmp_path, images, tiny_checkpoint, capsys):
    write_files(case, tmp_path, images)
    run_folder = tiny_checkpoint.parent.parent
    before = sorted(str(path) for path in run_folder.rglob("*"))
    status = TOOLS[case["tool"]](command(case, tmp_path, images, tiny_checkpoint))
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("error:")]
    assert status == 2, f"exit {status}, stderr:\n{error}"
    assert len(lines) == 1 and "Traceback" not in error, error
    assert case["says"] in lines[0], f"{case['says']!r} not in: {lines[0]}"
    assert sorted(str(path) for path in run_folder.rglob("*")) == before  # nothing written into the run
