"""cli.py as a person meets it: a mistake in an option, the data, an image or a checkpoint prints one
line naming the culprit and how to fix it, exits with status 2 and shows no traceback (unless
DIFFCLS_DEBUG=1); validate, test and predict refuse untrained weights; a checkpoint crafted to run
code when unpickled is refused before anything loads it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import DEBUG_VARIABLE, run
from tests.helpers import ROOT
from tests.helpers.runs import tiny_args
from tools.results_table import collect_runs


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    """A 2-class, 16-pixel diffusion-classifier checkpoint (the session's tiny one)."""
    return tiny_checkpoint


def refusal(capsys, *args) -> str:
    """Runs the command line; asserts exit status 2, one error line first and no traceback; returns that line."""
    assert run(list(args)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_no_checkpoint_no_results(stage, tmp_path, capsys):
    line = refusal(capsys, stage, *tiny_args(tmp_path), "--ckpt_path=last")
    assert f"{stage} needs trained weights" in line and f"no checkpoint in {tmp_path / 'checkpoints'}" in line
    line = refusal(capsys, stage, *tiny_args(tmp_path))
    assert "no --ckpt_path was given" in line and "--allow_untrained true" in line


def test_untrained_weights_only_when_asked_and_make_results_leaves_them_out(tmp_path):
    assert run(["test", *tiny_args(tmp_path / "debug"), "--allow_untrained=true"]) == 0
    (metrics,) = (tmp_path / "debug").rglob("metrics.json")
    assert json.loads(metrics.read_text())["checkpoint"] is None
    assert collect_runs([tmp_path / "debug"]) == []


@pytest.mark.parametrize("option, culprit", [
    ("--model.init_args.classification.rule=median", "classification.rule='median' is not one of"),
    ("--data.init_args.image_size=31", "image_size must be an even integer"),
    ("--global_batch_size=0", "global_batch_size=0: a batch holds at least one image"),
    ("--trainer.no_such_option=1", "unknown option --trainer.no_such_option"),
])  # fmt: skip
def test_a_bad_option_is_named(option, culprit, tmp_path, capsys):
    assert culprit in refusal(capsys, "test", *tiny_args(tmp_path), option, "--allow_untrained=true")


@pytest.mark.parametrize("typo, suggestion", [
    ("--model.init_args.learning_rat=1e-3", "did you mean --model.init_args.learning_rate"),
    ("--data.init_args.bach_size=8", "did you mean --data.init_args.batch_size"),
    ("--trainer.max_step=5", "did you mean --trainer.max_steps"),  # an abbreviation is a typo, not max_steps
    ("--model.init_args.classification.num_step=3", "did you mean --model.init_args.classification.num_steps"),
    ("--global_batch=4", "did you mean --global_batch_size"),
])  # fmt: skip
def test_a_mistyped_option_is_named_with_the_nearest_valid_ones(typo, suggestion, tmp_path, capsys):
    line = refusal(capsys, "fit", *tiny_args(tmp_path), typo)
    assert f"unknown option {typo.split('=')[0]}" in line and suggestion in line
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


def csv_data(root: Path, rows: list[str]) -> list[str]:
    """A CSVDataModule over `rows` (the CSV text after its header) and PNG files for every path in them."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / row.split(",")[0])
    (root / "labels.csv").write_text("path,label\n" + "".join(row + "\n" for row in rows) if rows else "")
    return ["--data=datamodules.CSVDataModule", f"--data.init_args.root={root}", "--data.init_args.csv=labels.csv",
            "--data.init_args.cache_dir=null", "--data.init_args.num_workers=0"]  # fmt: skip


@pytest.mark.parametrize("rows, culprit", [
    ([], "labels.csv is empty"),
    (["a.png,normal", "b.png,normal"], "every row has the label 'normal': a classifier needs at least two classes"),
    (["a.png,normal", "b.png,normal ", "c.png,pneumonia"], "['normal', 'normal '] differ only by surrounding white"),
    (["a.png,Normal", "b.png,normal", "c.png,pneumonia"], "labels ['Normal', 'normal'] differ only by case"),
])  # fmt: skip
def test_a_bad_csv_is_named(rows, culprit, tmp_path, capsys):
    assert culprit in refusal(capsys, "fit", *tiny_args(tmp_path / "run"), *csv_data(tmp_path / "data", rows))


def test_a_missing_root_and_a_file_that_is_no_checkpoint_are_named(tmp_path, capsys):
    line = refusal(
        capsys, "fit", "--config=configs/unet_chexpert.yaml", f"--data.init_args.root={tmp_path / 'nowhere'}"
    )
    assert f"data.init_args.root: '{tmp_path / 'nowhere'}' is not a directory" in line
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    line = refusal(capsys, "test", *tiny_args(tmp_path), f"--ckpt_path={tmp_path / 'notes.ckpt'}")
    assert f"{tmp_path / 'notes.ckpt'} is not a PyTorch checkpoint" in line


def test_changed_data_under_a_reused_split_is_named_with_counts(tmp_path, capsys):
    names = [f"{i}.png,{'normal' if i % 2 else 'pneumonia'}" for i in range(40)]
    run_args = [*tiny_args(tmp_path / "run", "--trainer.max_steps=1"), "--data.init_args.image_size=16"]
    assert run(["fit", *run_args, *csv_data(tmp_path / "data", names)]) == 0
    grown = csv_data(tmp_path / "data", [*names, "40.png,normal", "41.png,pneumonia"])
    line = refusal(capsys, "fit", *run_args, *grown)
    assert f"splits file {tmp_path / 'run' / 'splits.csv'} no longer matches the data (40 images listed, 42" in line
    assert "2 in the data, not in the file, e.g. 40.png" in line and "resplit=true" in line
    assert "balancing" not in line  # nothing was balanced away: the message names only what happened
    assert run(["fit", *run_args, *grown, "--data.init_args.resplit=true", "--trainer.max_steps=2"]) == 0


class WritesAMarker:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(checkpoint, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    crafted = torch.load(checkpoint, weights_only=True) | {"payload": WritesAMarker(marker)}
    torch.save(crafted, tmp_path / "crafted.ckpt")
    for stage in ("test", "predict", "fit"):
        line = refusal(capsys, stage, *tiny_args(tmp_path / stage), f"--ckpt_path={tmp_path / 'crafted.ckpt'}")
        assert f"refused to load {tmp_path / 'crafted.ckpt'}: it needs arbitrary unpickling" in line
    assert not marker.exists()


def test_the_real_command_line_prints_one_line_and_a_traceback_only_when_asked(tmp_path):
    command = [sys.executable, "cli.py", "test", *tiny_args(tmp_path), "--ckpt_path=last"]
    quiet = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[0].startswith("error: test needs trained weights")
    loud = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {DEBUG_VARIABLE: "1"})  # fmt: skip
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UntrainedModelError" in loud.stderr


# what a person would see from libraries on every run until the suite quietened them (cli.LIBRARY_NOISE)
NOISE = ("LeafSpec", "WeightAveraging callback, but loading a checkpoint outside", "litlogger",
         "LightningCLI's args parameter", "Tip:")  # fmt: skip


def test_runs_print_no_library_noise(tmp_path):
    """fit, validate, test and predict through cli.run, then tools.classify with its own command line, as a
    user runs them, in one fresh Python: none of the notices a user can do nothing about comes back
    (Lightning's WeightAveraging warning outside fit, torch's LeafSpec deprecation, the litlogger
    advert, LightningCLI's warning about args given beside a command line)."""
    args = tiny_args(tmp_path, "--trainer.max_steps=2", "--data.init_args.num_val=24")
    steps = [["fit", *args], ["validate", *args, "--ckpt_path=last", "--trainer.limit_val_batches=1.0"],
             ["test", *args, "--ckpt_path=last"], ["predict", *args, "--ckpt_path=last"]]  # fmt: skip
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8)).save(tmp_path / "images" / "grey.png")
    tool = ["tools/classify.py", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "images"),
            "--output", str(tmp_path / "out")]  # fmt: skip
    script = (
        f"import sys, cli\nfor step in {steps!r}:\n    assert cli.run(step) == 0\n"
        f"from tools import classify\nsys.argv = {tool!r}\nassert classify.main() == 0\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrated on 24 validation images" in output and "Classified 1 images" in output  # all of it ran
    found = [noise for noise in NOISE if noise in output]
    assert not found, (found, output[-3000:])
