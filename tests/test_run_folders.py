"""Runs never land in other runs (issue 40): the README's two flows after a demo run, driven through the real
commands, leave the demo's test result as it was; a run folder keeps one data set; outputs are never read back
as inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import cli
from experiment.run_folders import DATA_FILE
from reports.results import newest_metrics
from tests.helpers.data import write_pngs
from tests.helpers.publishers import make_csv_folder
from tests.helpers.runs import tiny_args
from tools import classify, export
from tools import summary as summary_tool


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny demo run that was fitted and tested, as `make demo` leaves runs/demo: (folder, its test metrics)."""
    root = tmp_path_factory.mktemp("demo_run") / "runs" / "demo"
    assert cli.run(["fit", *tiny_args(root, "--trainer.max_steps=2")]) == 0
    assert cli.run(["test", *tiny_args(root), "--ckpt_path=last"]) == 0
    return root, json.loads(newest_metrics(root).read_text())


def publisher_folder(folder: Path) -> Path:
    """A publisher's own CSV (columns file, diagnosis, subject), as configs/data/example_publisher.yaml reads it."""
    make_csv_folder(folder)
    table = pd.read_csv(folder / "labels.csv", dtype=str)
    table.rename(columns={"path": "file", "label": "diagnosis", "patient_id": "subject"}).to_csv(
        folder / "labels.csv", index=False
    )
    return folder


def own_data(folder: Path) -> list[str]:
    """The README's own-data options (configs/data/example_publisher.yaml), shrunk to seconds."""
    return ["--data=configs/data/example_publisher.yaml", f"--data.init_args.root={folder}",
            "--data.init_args.cache_dir=null", "--data.init_args.image_size=16"]  # fmt: skip


def test_the_own_data_fit_into_the_demo_folder_is_refused_and_the_demos_test_stays(demo_run, tmp_path, capsys):
    """README flow 1: make demo, then the own-data fit, then the own-data test. The fit into runs/demo is refused in
    one line naming --trainer.default_root_dir; runs/demo's test (`--ckpt_path last`) still tests the demo's model."""
    root, metrics = demo_run
    before = sorted(str(path) for path in root.rglob("*"))
    data = own_data(publisher_folder(tmp_path / "mine"))
    assert cli.run(["fit", *tiny_args(root, "--trainer.max_steps=1"), *data]) == 2
    error = capsys.readouterr().err
    assert "holds a run of other data" in error and "--trainer.default_root_dir" in error
    assert sorted(str(path) for path in root.rglob("*")) == before  # no splits.csv, no version, no last-v1.ckpt
    # the README's own-data command names its own folder: it trains and tests there
    mine = tmp_path / "runs" / "mine"
    assert cli.run(["fit", *tiny_args(mine, "--trainer.max_steps=1"), *data]) == 0
    assert json.loads((mine / DATA_FILE).read_text())["datamodule"] == "CSVDataModule"
    assert cli.run(["test", *tiny_args(root), "--ckpt_path=last"]) == 0
    again = json.loads(newest_metrics(root).read_text())
    assert again["accuracy"] == metrics["accuracy"] and again["n_images"] == metrics["n_images"]


def test_classify_into_the_demo_folder_is_refused_and_the_summary_stays(demo_run, tmp_path, capsys):
    """README flow 2: make demo, classify with --output runs/demo, tools.summary runs/demo."""
    root, metrics = demo_run
    images = tmp_path / "images"
    write_pngs(images, "chest", 3, size=16)
    newest = newest_metrics(root)
    assert classify.main([str(root / "checkpoints" / "last.ckpt"), str(images), "--output", str(root)]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert newest_metrics(root) == newest and not (root / "trained_with.yaml").exists()
    summary_tool.main([str(root)])
    assert f"Test results ({newest})" in capsys.readouterr().out  # the demo's test, not a classification


def test_a_second_classify_into_the_source_folder_never_reads_the_first_ones_outputs(demo_run, tmp_path, capsys):
    root, _ = demo_run
    images = tmp_path / "images"
    write_pngs(images, "chest", 3, size=16)
    assert classify.main([str(root / "checkpoints" / "last.ckpt"), str(images), "--output", str(images)]) == 2
    assert "lies in the source folder" in capsys.readouterr().err
    assert sorted(path.name for path in images.iterdir()) == [f"chest_0{i}.png" for i in range(3)]


def test_an_export_never_replaces_a_users_files_without_overwrite(demo_run, tmp_path, capsys):
    root, _ = demo_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    assert export.main([str(root), str(mine)]) == 2
    assert "holds files that are not an export" in capsys.readouterr().err
    assert (mine / "README.md").read_text() == "my notes\n"
    assert export.main([str(root), str(mine), "--overwrite"]) == 0
    assert export.main([str(root), str(mine)]) == 0  # an earlier export is replaced without asking
