"""tools/ood_benchmark.py end to end on two tiny checkpoints: every shifted set, every score, both tables."""

from __future__ import annotations

import json

import pytest

from cli import main
from datamodules.corruptions import CORRUPTIONS, SEVERITIES
from tests.helpers.data import needs_pneumoniamnist
from tests.helpers.runs import tiny_args, tiny_baseline_args
from tools import ood_benchmark


@needs_pneumoniamnist
def test_the_benchmark_scores_every_shifted_set_with_every_score(tmp_path, capsys):
    main(["fit", *tiny_args(tmp_path / "unet", "--trainer.max_steps=2", "--data.init_args.num_val=24")])
    main(["fit", *tiny_baseline_args(tmp_path / "resnet", "--trainer.max_steps=2")])
    checkpoints = [str(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("unet", "resnet")]
    # the unet's own test images, read through a datamodule file: the same ids, so the same scores
    extra = tmp_path / "same_images.yaml"
    extra.write_text(
        "class_path: datamodules.SyntheticDataModule\ninit_args: {num_train: 24, num_val: 24, num_test: 7}\n"
    )
    output, markdown = tmp_path / "ood.json", tmp_path / "ood.md"
    ood_benchmark.main([*checkpoints, "--ood-data", str(extra), "--max-images", "5", "--null-label",
                        "--output", str(output), "--markdown", str(markdown)])  # fmt: skip
    unet, resnet = json.loads(output.read_text())["results"]
    assert unet["scores"] == ["typicality", "excess_error", "best_error", "entropy", "unconditional_typicality"]
    assert resnet["scores"] == ["energy", "msp", "entropy"] and resnet["default_score"] == "energy"
    expected_sets = {"synthetic skin", "PneumoniaMNIST", "same_images"}
    expected_sets |= {f"{kind} {severity}" for kind in CORRUPTIONS for severity in SEVERITIES}
    for result in (unet, resnet):
        assert set(result["sets"]) == expected_sets and result["n_test"] == 5
        for row in result["sets"].values():
            for name in result["scores"]:
                assert 0.0 <= row[name]["auroc"] <= 1.0 and 0.0 <= row[name]["refused"] <= 1.0
    # the unet calibrated on half of its 24 validation images (12 fit the time profile), the resnet on all 8
    assert unet["n_reference"] == 12 and unet["n_calibration"]["typicality"] == 12
    assert resnet["n_reference"] == 0 and resnet["n_calibration"]["energy"] == 8
    # the in-distribution images again cannot be told apart from themselves: every pair ties
    for name in unet["scores"]:
        assert unet["sets"]["same_images"][name]["auroc"] == pytest.approx(0.5)
    table = markdown.read_text()
    assert "| mean of the corruptions at severity 3 |" in table.replace("**", "") and "unet: typicality *" in table
    assert table in capsys.readouterr().out
