"""Refusal of out-of-distribution images through the real CLI and tools.classify: a model that learned the
synthetic chest images refuses skin images, calibrations of other weights or of older runs are not applied."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from lightning_modules import BaselineClassifier
from tests.helpers import ROOT
from tests.helpers.data import write_pngs
from tests.helpers.models import four_flips
from tools import classify


def rows_of(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "predictions.csv").open()))


def test_validate_calibrates_on_the_whole_split_whatever_limit_fit_used():
    config = yaml.safe_load((ROOT / "configs/base/diffusion_cpu.yaml").read_text())
    assert config["trainer"]["limit_val_batches"] == 2  # what validate inherits from the demo's config


def test_validate_calibrates_refusal_and_test_keeps_false_refusals_within_alpha(calibrated, calibrated_test):
    root, args = calibrated
    calibration = json.loads((root / "calibration.json").read_text())
    assert calibration["n_calibration"] == 200  # every validation image, not the config's 2 batches of 64
    refusal = calibration["out_of_distribution"]
    assert refusal["score"] == "typicality" and refusal["alpha"] == 0.01 and refusal["feasible"]
    assert refusal["n_reference"] == 100 and refusal["n_calibration"] == len(refusal["calibration_scores"]) == 100
    assert len(refusal["profile"]["mean"]) == 32
    folder = calibrated_test
    metrics = json.loads((folder / "metrics.json").read_text())["out_of_distribution"]
    rows = rows_of(folder)
    refused = [row["out_of_distribution"] == "true" for row in rows]
    assert metrics["n_refused"] == sum(refused) <= 3  # 100 test images, alpha 0.01: 1 expected
    shift = json.loads((folder / "metrics.json").read_text())["set_shift"]
    assert not shift["shifted"] and set(shift["tests"]) == {
        "ood_score",
        "error_profile",
        "predicted_classes",
        "class_score_pleural_effusion",
    }
    conformity = json.loads((folder / "metrics.json").read_text())["conformal"]["class_conditional"]["test"]
    assert not conformity["exchangeability"]["shifted"]  # and its labels relate to the images as there
    for row in rows:  # the p-value is the conformal count over the calibration scores
        above = sum(s >= float(row["ood_score"]) * (1 - 1e-5) for s in refusal["calibration_scores"])
        assert float(row["ood_pvalue"]) == pytest.approx((1 + above) / 101, abs=1e-5)
        if row["out_of_distribution"] == "true":
            assert row["refer"] in ("true", "off")  # referred, or the referral rule is OFF for this model
            assert row["prediction_set"] == "" and row["prediction_set_marginal"] == ""


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
    assert f"\n  {sum(skin) + sum(chest)} of 16 images refused" in summary
    assert "are not like the validation images (out-of-distribution scores larger" in printed.err  # the set moved


def test_refused_images_have_no_answer_and_the_csv_metrics_and_report_agree_on_them(calibrated, tmp_path):
    """A labelled CSV of chest images like the calibration's and skin images unlike them (refused)."""
    root, _ = calibrated
    chest, skin = write_pngs(tmp_path / "images", "chest", 6), write_pngs(tmp_path / "images", "skin", 4)
    names = ["no_finding", "pleural_effusion"]
    listed = "".join(f"{path},{names[i % 2]}\n" for i, path in enumerate(chest + skin))
    (tmp_path / "list.csv").write_text("path,label\n" + listed)
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert classify.main([str(checkpoint), str(tmp_path / "list.csv"), "--output", str(tmp_path / "out")]) == 0
    (version,) = (tmp_path / "out" / "tensorboard").glob("version_*")
    rows = rows_of(version)
    refused = [row for row in rows if row["out_of_distribution"] == "true"]
    metrics = json.loads((version / "metrics.json").read_text())
    decisions = json.loads((version / "decisions.json").read_text())
    assert len(refused) >= 4 and metrics["n_refused"] == decisions["out_of_distribution"]["n_refused"] == len(refused)
    assert all(row["predicted_class"] == "" and row["prediction"] == "-1" and row["leading_class"] for row in refused)
    answered = [row for row in rows if row["out_of_distribution"] == "false"]
    right = sum(row["prediction"] == row["label"] for row in answered)  # label: the class index
    assert metrics["n_answered"] == len(answered)
    assert metrics["accuracy_answered"] == pytest.approx(right / len(answered))
    report = (version / "report.html").read_text()
    assert re.search(rf"Refused</[^>]+>\s*<[^>]+>{len(refused)}<", report)


def test_a_calibration_without_refusal_applies_its_other_rules_and_says_refusal_is_off(calibrated):
    root, args = calibrated
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
        assert (
            not metrics["rules"]["refusal"]["on"]
            and "before this rule existed" in metrics["rules"]["refusal"]["reason"]
        )
        assert metrics["rules"]["prediction_sets"]["on"]
    finally:
        file.write_text(json.dumps(calibration))


def test_one_more_training_step_voids_the_calibration(calibrated, tmp_path, capsys):
    root, args = calibrated
    run = tmp_path / "trained_on"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    shutil.copy(root / "calibration.json", run / "calibration.json")
    moved = [arg for arg in args if not arg.startswith("--trainer.default_root_dir")] + [
        f"--trainer.default_root_dir={run}"
    ]
    main(["fit", *moved, "--trainer.max_steps=151", "--ckpt_path=last"])  # 150 + 1, the EMA running since step 50
    folder = Path(main(["test", *moved, "--ckpt_path=last", "--trainer.limit_test_batches=1"]).trainer.log_dir)
    rules = json.loads((folder / "metrics.json").read_text())["rules"]
    reasons = {status["reason"] for status in rules.values()}
    assert len(reasons) == 1 and "not applied: the weights differ" in reasons.pop()
    assert "refer" not in rows_of(folder)[0]
    assert "refusal, referral, prediction sets, marginal prediction sets, whole-set shift check OFF" in (
        capsys.readouterr().err
    )


def test_baseline_energy_is_the_mean_negative_logsumexp_of_its_forwards():
    torch.manual_seed(0)
    model = BaselineClassifier("resnet18", num_classes=2, image_size=32, test_time_flips=True).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = sum(-torch.logsumexp(model.network(view), dim=1) for view in four_flips(images)) / 4
        outputs = model.classify_batch({"image": images, "id": torch.arange(3)})
    torch.testing.assert_close(outputs["energy"], expected)
    with pytest.raises(ValueError, match="ood_score='typicality' is not a score of BaselineClassifier"):
        from decisions.calibration import CalibrationSettings

        BaselineClassifier("resnet18", calibration=CalibrationSettings(ood_score="typicality"))
