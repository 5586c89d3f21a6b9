"""The files a person reads are the same, byte for byte, as the suite wrote them before the "one way through"
refactor (issue 41): predictions.csv, decisions.json and metrics.json of the calibrated learned demo on its test
set (`cli.py test`) and on a folder of new images (`tools.classify`). tests/data/outputs_before/ holds what the
code before the refactor wrote for exactly these runs; only the temporary folders' names are replaced by
placeholders, and nothing else is left out (these files hold no timings).

Recording them again (`RECORD_OUTPUTS=1 pytest tests/test_outputs_unchanged.py`) is for a change of the outputs
made on purpose, and says so in its commit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import cli
from datamodules import SyntheticDataModule
from tests.helpers import ROOT
from tests.helpers.data import write_pngs
from tools import classify

BEFORE = ROOT / "tests" / "data" / "outputs_before"
COMPARED = ("predictions.csv", "decisions.json", "metrics.json", "skipped.csv")
RECORDING = os.environ.get("RECORD_OUTPUTS") == "1"


def placeholders(text: str, folders: dict[str, Path]) -> str:
    """The temporary folders' names as fixed placeholders (longest first: one may lie inside another)."""
    for name, folder in sorted(folders.items(), key=lambda item: -len(str(item[1]))):
        text = text.replace(str(folder), f"<{name}>")
    return text


def check_or_record(case: str, run_folder: Path, folders: dict[str, Path]) -> None:
    """Each of COMPARED that the run wrote, against the recording; the same files must have been written."""
    written = sorted(name for name in COMPARED if (run_folder / name).is_file())
    if RECORDING:
        (BEFORE / case).mkdir(parents=True, exist_ok=True)
    else:
        assert written == sorted(path.name for path in (BEFORE / case).iterdir())
    for name in written:
        now = placeholders((run_folder / name).read_text(), folders)
        recorded = BEFORE / case / name
        if RECORDING:
            recorded.write_text(now)
        else:
            assert now == recorded.read_text(), f"{case}/{name} differs from what the suite wrote before"


def test_the_demo_tests_as_before(calibrated, calibrated_test):
    root, _ = calibrated
    check_or_record("demo_test", calibrated_test, {"run": root})


def new_images(folder: Path) -> Path:
    """12 chest images like the training data, 4 skin images unlike it (the refusal's business), a text file
    (skipped, with its reason), and labels.csv: the chest images with their labels."""
    paths = write_pngs(folder / "ward", "chest", 12)
    write_pngs(folder / "other", "skin", 4)
    (folder / "notes.txt").write_text("not an image\n")
    split = SyntheticDataModule(kind="chest", image_size=32, num_train=0, num_val=0, num_test=12).split("test")
    names = ["no_finding", "pleural_effusion"]
    rows = [f"{path},{names[int(split[i]['label'])]}" for i, path in enumerate(paths)]
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return folder


class OpenedFiles:
    """Every file opened while it watches (Python's audit event `open`: open(), io.open, os.open), by path.
    An audit hook cannot be removed: it stays, idle, for the rest of the process."""

    def __init__(self):
        self.paths: list[str] = []
        self.watching = False
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if self.watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.mark.parametrize("case", ["new_images", "new_labelled_images"])
def test_new_images_are_classified_as_before(case, calibrated, tmp_path, one_thread, monkeypatch):
    """... in this process: the checkpoint opened once, and cli.py's command line never built."""
    root, _ = calibrated
    images = new_images(tmp_path / "images")
    source = images / "labels.csv" if case == "new_labelled_images" else images
    output = tmp_path / "classified"
    checkpoint = root / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(cli, "main", lambda *args, **kwargs: pytest.fail("tools.classify called cli.main"))
    opened = OpenedFiles()
    opened.watching = True
    try:
        assert classify.main([str(checkpoint), str(source), "--output", str(output)]) == 0
    finally:
        opened.watching = False
    assert opened.paths.count(os.path.realpath(checkpoint)) == 1
    (version,) = (output / "tensorboard").glob("version_*")
    check_or_record(case, version, {"run": root, "images": images, "output": output})
