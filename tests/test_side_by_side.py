"""tools/side_by_side.py: both models trained for the same wall-clock budget, calibrated on validation,
tested, and the table's numbers are those of the runs' own metrics.json files."""

import json
import math
import statistics

import pytest
import yaml

from reports.results import newest_metrics
from tests.helpers.configs import resolved
from tests.helpers.runs import TINY_UNET
from tools import side_by_side

SYNTHETIC = {"num_train": 24, "num_val": 24, "num_test": 8, "image_size": 16}


def tiny_configs(folder):
    """The demo and baseline demo configs shrunk (tiny UNet, N = 3; baseline monitoring val/accuracy)."""
    diffusion, baseline = resolved("demo"), resolved("baseline_demo")
    for config in (diffusion, baseline):
        config["data"]["init_args"] |= SYNTHETIC
        config["global_batch_size"] = 8
        config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                              "val_check_interval": 2, "limit_val_batches": 1}  # fmt: skip
    diffusion["model"]["init_args"] |= {"val_steps": 2}
    diffusion["model"]["init_args"]["classification"]["num_steps"] = 3
    diffusion["model"]["init_args"]["explanation"]["every_n_epochs"] = 0
    for option in TINY_UNET:  # "--model.network.init_args.key=value"
        key, value = option.removeprefix("--model.network.").split("=", 1)
        if key.startswith("init_args."):
            diffusion["model"]["init_args"]["network"]["init_args"][key.removeprefix("init_args.")] = yaml.safe_load(
                value
            )
    baseline["model"]["init_args"]["mc_dropout_passes"] = 2
    baseline["checkpoint"] |= {"monitor": "val/accuracy", "mode": "max"}
    paths = folder / "diffusion.yaml", folder / "baseline.yaml"
    for path, config in zip(paths, (diffusion, baseline)):
        path.write_text(yaml.safe_dump(config))
    return paths


@pytest.mark.slow  # 35 s: both models trained, calibrated and tested through the real CLI (make test-all)
def test_side_by_side_trains_both_for_the_budget_calibrates_and_tabulates_their_metrics(tmp_path):
    diffusion, baseline = tiny_configs(tmp_path)
    output = tmp_path / "out"
    text = side_by_side.main(["--minutes", "0.05", "--seeds", "0", "1", "--diffusion", str(diffusion),
                              "--baseline", str(baseline), "--output", str(output)])  # fmt: skip
    assert (output / "side_by_side.md").read_text() == text
    metrics = {
        (name, seed): json.loads(newest_metrics(output / f"seed{seed}" / name).read_text())
        for name in ("diffusion", "resnet18")
        for seed in (0, 1)
    }
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in text.splitlines()[2:]}
    means = {
        name: statistics.fmean(metrics[name, seed]["accuracy"] for seed in (0, 1)) for name in ("diffusion", "resnet18")
    }
    assert rows["accuracy"][0].startswith(f"{means['diffusion']:.3f} ± ")
    assert rows["accuracy"][1].startswith(f"{means['resnet18']:.3f} ± ")
    if means["resnet18"]:
        assert rows["accuracy"][2].rstrip(" |") == f"{means['diffusion'] / means['resnet18']:.3f}"
    assert rows["accuracy, seed 1"][:2] == [f"{metrics['diffusion', 1]['accuracy']:.3f}",
                                            f"{metrics['resnet18', 1]['accuracy']:.3f}"]  # fmt: skip
    for (name, seed), numbers in metrics.items():
        root = output / f"seed{seed}" / name
        calibration = json.loads((root / "calibration.json").read_text())
        assert calibration["n_calibration"] == 24  # the whole validation split, not the config's 1 batch
        threshold = calibration["referral"]["threshold"]  # metrics.json writes an infinite one as null
        assert numbers["selective"]["threshold"] == (threshold if math.isfinite(threshold) else None)  # test applied it
        assert numbers["checkpoint"] == calibration["checkpoint"]
    # the baseline monitors val/accuracy: its best checkpoint is tested, the diffusion config's last
    assert metrics["resnet18", 0]["checkpoint"].split("/")[-1].startswith("epoch=")
    assert metrics["diffusion", 0]["checkpoint"].endswith("last.ckpt")
    assert "| prediction sets (alpha 0.1): coverage |" in text
    assert "nan" not in rows["prediction sets (alpha 0.1): mean size"][0]


@pytest.mark.parametrize("minutes, clock", [(8, "00:00:08:00"), (0.5, "00:00:00:30"), (90, "00:01:30:00")])
def test_the_budget_becomes_lightnings_max_time(minutes, clock):
    assert side_by_side.max_time(minutes) == clock
