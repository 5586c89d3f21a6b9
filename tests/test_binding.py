"""A calibration bound to the weights it calibrated, not to a path (decisions/binding.py, lightning_modules/base.py):
applied however the checkpoint is named (relative, absolute, a symlink, a moved copy of the run folder), refused in
one line after one more training step, after a change of N, and when it is too old to say what it calibrated."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import main
from decisions.binding import binding_mismatch, weights_digest
from tests.helpers import ROOT
from tests.helpers.runs import tiny_args
from tools import classify

VAL_IMAGES = ["--data.init_args.num_val=8"]


@pytest.fixture(scope="module")
def calibrated_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """A copy of the tiny run (one training step), calibrated by validate on its 8 validation images."""
    run = tmp_path_factory.mktemp("bound") / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "checkpoints" / "last.ckpt")
    main(["validate", *tiny_args(run), *VAL_IMAGES, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert (run / "calibration.json").is_file()
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("new_images")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"x{i}.png")
    return folder


def classified(checkpoint, images: Path, output: Path, *extra: str) -> dict:
    """tools.classify as a user runs it; its decisions.json and predictions.csv header."""
    assert classify.main([str(checkpoint), str(images), "--output", str(output), *extra]) == 0
    (version,) = (output / "tensorboard").glob("version_*")
    with (version / "predictions.csv").open() as handle:
        header = next(csv.reader(handle))
    return json.loads((version / "decisions.json").read_text()) | {"header": header}


def applied(decisions: dict) -> bool:
    """The calibration was applied: the rules it could set are on, and no rule is OFF for want of one."""
    reasons = [status["reason"] for status in decisions["rules"].values() if not status["on"]]
    return "refer" in decisions["header"] and not any("not applied" in r or "no calibration" in r for r in reasons)


def test_the_calibration_applies_however_the_checkpoint_is_named(calibrated_run, images, tmp_path, capsys):
    checkpoint = calibrated_run / "checkpoints" / "last.ckpt"
    (tmp_path / "link_to_run").symlink_to(calibrated_run, target_is_directory=True)
    (tmp_path / "model.ckpt").symlink_to(checkpoint)
    moved = tmp_path / "moved_run"
    shutil.copytree(calibrated_run, moved)
    names = {
        "relative": Path(os.path.relpath(checkpoint, ROOT)),  # tests run in the repository root, as users do
        "absolute": checkpoint.resolve(),
        "symlinked folder": tmp_path / "link_to_run" / "checkpoints" / "last.ckpt",
        "symlinked file": tmp_path / "model.ckpt",
        "moved copy": moved / "checkpoints" / "last.ckpt",
    }
    for how, name in names.items():
        decisions = classified(name, images, tmp_path / how.replace(" ", "_"))
        assert applied(decisions), (how, decisions["rules"])
    assert "not applied" not in capsys.readouterr().err


def test_an_infeasible_refusal_says_off_in_the_summary_and_the_report(calibrated_run, images, tmp_path, capsys):
    decisions = classified(calibrated_run / "checkpoints" / "last.ckpt", images, tmp_path / "out")
    reason = "ood_alpha=0.01 needs at least 100 calibration images, got 4: no image can be refused"
    assert decisions["rules"]["refusal"] == {"on": False, "reason": reason}
    summary = capsys.readouterr().out.split("Classified 3 images")[1]
    assert f"\n  refusal OFF: {reason}" in summary and "images refused" not in summary  # no count to misread
    (version,) = (tmp_path / "out" / "tensorboard").glob("version_*")
    assert f"OFF: {reason}" in (version / "report.html").read_text()
    with (version / "predictions.csv").open() as handle:
        assert {row["out_of_distribution"] for row in csv.DictReader(handle)} == {"off"}


def test_a_step_before_the_ema_starts_keeps_the_classifying_weights_and_the_calibration(
    calibrated_run, images, tmp_path
):
    # the demo's EMA starts at step 50: until then the weights that classify (the EMA's) are the step-0 copy, so the
    # digest, which hashes what classifies, is unchanged; one step after the EMA started: tests/test_out_of_distribution
    run = tmp_path / "trained_on"
    shutil.copytree(calibrated_run, run)
    main(["fit", *tiny_args(run, "--trainer.max_steps=2"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    newest = max((run / "checkpoints").glob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] == 2
    assert applied(classified(newest, images, tmp_path / "out"))


def test_a_change_of_n_voids_the_calibration(calibrated_run, images, tmp_path):
    options = ["--", "--model.init_args.classification.num_steps=4"]
    decisions = classified(calibrated_run / "checkpoints" / "last.ckpt", images, tmp_path / "out", *options)
    reason = decisions["rules"]["refusal"]["reason"]
    assert "settings its thresholds depend on differ: num_steps 3 there, 4 here" in reason, reason


def test_a_speed_only_setting_keeps_the_calibration(calibrated_run, images, tmp_path):
    options = ["--", "--model.init_args.classification.max_forward_batch=2"]
    assert applied(classified(calibrated_run / "checkpoints" / "last.ckpt", images, tmp_path / "out", *options))


def test_a_calibration_of_an_older_version_is_reported_and_not_applied(calibrated_run, images, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(calibrated_run, run)
    old = json.loads((run / "calibration.json").read_text())
    for key in ("weights", "classification"):
        old.pop(key)
    (run / "calibration.json").write_text(json.dumps(old))
    decisions = classified(run / "checkpoints" / "last.ckpt", images, tmp_path / "out")
    assert "older version" in decisions["rules"]["referral"]["reason"]
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "older version" in line and "OFF" in line]


def test_the_digest_sees_one_changed_number_or_buffer_and_nothing_else():
    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    digest, original = weights_digest(network), network[0].weight.detach().clone()
    assert weights_digest(network) == digest
    with torch.no_grad():
        network[0].weight[1, 2] += 1e-3
    assert weights_digest(network) != digest
    with torch.no_grad():
        network[0].weight.copy_(original)
    assert weights_digest(network) == digest
    network[1].running_mean += 1.0  # buffers count: batch-norm statistics change the outputs too
    assert weights_digest(network) != digest


def test_a_mismatch_names_what_differs():
    calibration = {"weights": "sha256:" + "a" * 64, "classification": {"num_steps": 3, "seed": 0}}
    assert binding_mismatch(calibration, "sha256:" + "a" * 64, {"num_steps": 3, "seed": 0}) is None
    assert "the weights differ (calibrated aaaaaaaaaaaa, these are bbbbbbbbbbbb)" in binding_mismatch(
        calibration, "sha256:" + "b" * 64, {"num_steps": 3, "seed": 0}
    )
    assert binding_mismatch(calibration, "sha256:" + "a" * 64, {"num_steps": 3, "seed": 1}).endswith(
        "seed 0 there, 1 here"
    )
    assert binding_mismatch({}, "sha256:x", {}).startswith("it records no digest")
