"""Refusal of out-of-distribution images through the real CLI and tools.classify: a model that learned the
synthetic chest images refuses skin images, calibrations of other weights or of older runs are not applied."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from cli import main
from lightning_modules import BaselineClassifier
from tests.helpers.data import write_pngs
from tests.helpers.models import four_flips
from tools import classify


def rows_of(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "predictions.csv").open()))


def test_validate_calibrates_refusal_and_test_keeps_false_refusals_within_alpha(calibrated, calibrated_test):
    root, args = calibrated
    refusal = json.loads((root / "calibration.json").read_text())["out_of_distribution"]
    assert refusal["score"] == "typicality" and refusal["alpha"] == 0.01 and refusal["feasible"]
    assert refusal["n_reference"] == 100 and refusal["n_calibration"] == len(refusal["calibration_scores"]) == 100
    assert len(refusal["profile"]["mean"]) == 32
    folder = calibrated_test
    metrics = json.loads((folder / "metrics.json").read_text())["out_of_distribution"]
    rows = rows_of(folder)
    refused = [row["out_of_distribution"] == "true" for row in rows]
    assert metrics["n_refused"] == sum(refused) <= 3  # 100 test images, alpha 0.01: 1 expected
    assert not metrics["shift"]["shifted"]  # the test split is like the validation split
    conformity = json.loads((folder / "metrics.json").read_text())["conformal"]["class_conditional"]["test"]
    assert not conformity["exchangeability"]["shifted"]  # and its labels relate to the images as there
    for row in rows:  # the p-value is the conformal count over the calibration scores
        above = sum(s >= float(row["ood_score"]) * (1 - 1e-5) for s in refusal["calibration_scores"])
        assert float(row["ood_pvalue"]) == pytest.approx((1 + above) / 101, abs=1e-5)
        if row["out_of_distribution"] == "true":
            assert row["refer"] == "true" and row["prediction_set"] == "" and row["prediction_set_marginal"] == ""


def test_a_folder_of_chest_and_skin_images_gets_the_skin_ones_refused(calibrated, tmp_path, capsys):
    root, _ = calibrated
    files = sorted(write_pngs(tmp_path / "images" / "chest", "chest", 8) + write_pngs(tmp_path / "images", "skin", 8))
    output = tmp_path / "classified"
    assert (
        classify.main([str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "images"), "--output", str(output)]) == 0
    )
    (version,) = (output / "tensorboard").glob("version_*")
    rows = rows_of(version)
    assert [row["path"] for row in rows] == files  # one row per file
    refused = {Path(row["path"]).name: row["out_of_distribution"] == "true" for row in rows}
    skin = [value for name, value in refused.items() if name.startswith("skin_")]
    chest = [value for name, value in refused.items() if name.startswith("chest_")]
    assert len(skin) == len(chest) == 8
    assert all(skin) and sum(chest) <= 1
    printed = capsys.readouterr()
    summary = printed.out[printed.out.index("Classified") :]
    assert summary.splitlines()[1].startswith(f"  {sum(skin) + sum(chest)} of 16 images refused")
    assert "are not exchangeable with the 100 calibration images" in printed.err  # the whole set has shifted


def test_a_calibration_of_other_weights_or_without_refusal_is_not_applied(calibrated, tmp_path):
    root, args = calibrated
    other = tmp_path / "other.ckpt"
    shutil.copy(root / "checkpoints" / "last.ckpt", other)
    with pytest.warns(UserWarning, match="was calibrated for .*last.ckpt, not .*other.ckpt: not applied"):
        cli = main(["predict", *args, f"--ckpt_path={other}", "--trainer.limit_predict_batches=1"])
    assert "out_of_distribution" not in rows_of(Path(cli.trainer.log_dir))[0]
    # a calibration.json written before refusals existed: referral and sets still apply, and it says so
    file = root / "calibration.json"
    calibration = json.loads(file.read_text())
    try:
        file.write_text(json.dumps({k: v for k, v in calibration.items() if k != "out_of_distribution"}))
        with pytest.warns(UserWarning, match="has no out-of-distribution block .* run `validate` again"):
            cli = main(["test", *args, "--ckpt_path=last", "--trainer.limit_test_batches=1"])
        folder = Path(cli.trainer.log_dir)
        assert "refer" in rows_of(folder)[0] and "out_of_distribution" not in rows_of(folder)[0]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert "selective" in metrics and "out_of_distribution" not in metrics
    finally:
        file.write_text(json.dumps(calibration))


def test_baseline_energy_is_the_mean_negative_logsumexp_of_its_forwards():
    torch.manual_seed(0)
    model = BaselineClassifier("resnet18", num_classes=2, image_size=32, test_time_flips=True).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = sum(-torch.logsumexp(model.network(view), dim=1) for view in four_flips(images)) / 4
        outputs = model.classify_batch({"image": images, "id": torch.arange(3)})
    torch.testing.assert_close(outputs["energy"], expected)
    with pytest.raises(ValueError, match="ood_score='typicality' is not a score of BaselineClassifier"):
        from evaluation.decisions import CalibrationSettings

        BaselineClassifier("resnet18", calibration=CalibrationSettings(ood_score="typicality"))
