"""The diffusion classifier and the ResNet-18 on the same data, for the same wall-clock time, side by side.

    python -m tools.side_by_side --minutes 8 --seeds 0 1 2
    python -m tools.side_by_side --data my_data.yaml --minutes 10 -- --data.init_args.num_workers 2

For each seed and model: `fit` with `trainer.max_time` = the budget (steps and epochs unlimited, so
both stop on the clock), `validate` on the whole validation split with the checkpoint its config
keeps (the best on validation where the config monitors a metric, else the last), which calibrates
the referral rule and the conformal prediction sets (calibration.json), then `test` with the same
checkpoint. It prints one table (the mean over the seeds, and each seed's accuracy): accuracy,
AUROC, ECE, error-detection AUROC of the uncertainty, the accuracy after filtering out the 20 % and
50 % most uncertain images, and the calibrated decision rules on the test images. `--data` is any
datamodule file (configs/data/*.yaml, or your own: e.g. datamodules.CSVDataModule with your CSV);
options after `--` go to every run. The baseline is tested on one view (the paper's protocol:
test-time flips off). Everything lands in `<output>/seed<s>/<model>/`; the table also in
`<output>/side_by_side.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import cli
from experiment.run_folders import RunFolder
from experiment.user_errors import tool_main
from networks.weights import load_weights_file
from reports.results import newest_metrics

MODELS = {
    "diffusion": ("configs/unet_pneumoniamnist.yaml", []),
    "resnet18": ("configs/resnet18_pneumoniamnist.yaml", ["--model.init_args.test_time_flips=false"]),
}
ROWS = (
    ("accuracy", lambda m: m["accuracy"]),
    ("AUROC", lambda m: m["auroc"]),
    ("ECE", lambda m: m["ece"]),
    ("error-detection AUROC", lambda m: m["error_detection_auroc"]),
    ("accuracy, 20 % most uncertain filtered out", lambda m: m["accuracy_filtered"]["0.20"]),
    ("accuracy, 50 % most uncertain filtered out", lambda m: m["accuracy_filtered"]["0.50"]),
    ("referral (target 0.95): accuracy on accepted", lambda m: m["selective"]["test"]["accuracy"]),
    ("referral (target 0.95): fraction accepted", lambda m: m["selective"]["test"]["coverage"]),
    ("prediction sets (alpha 0.1): coverage", lambda m: m["conformal"]["class_conditional"]["test"]["coverage"]),
    ("prediction sets (alpha 0.1): mean size", lambda m: m["conformal"]["class_conditional"]["test"]["mean_set_size"]),
)


def max_time(minutes: float) -> str:
    """Lightning's `trainer.max_time` ("DD:HH:MM:SS") for a budget in minutes."""
    seconds = round(60 * minutes)
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def kept_checkpoint(root: Path) -> str:
    """The best checkpoint where the run monitored a metric (read from last.ckpt's record), else last.ckpt."""
    last = RunFolder(root).last_checkpoint
    states = load_weights_file(last).get("callbacks", {})
    best = [  # without a monitored metric Lightning calls its latest top-k file "best": last.ckpt is as new
        state.get("best_model_path")
        for key, state in states.items()
        if key.startswith("RunCheckpoint") and state.get("best_model_score") is not None
    ]
    return best[0] if best and best[0] and Path(best[0]).is_file() else str(last)


def train_validate_test(name: str, config: str, extra: list[str], seed: int, args) -> tuple[dict, float]:
    root = args.output / f"seed{seed}" / name
    budget = max_time(args.minutes)
    data = [f"--data={args.data}"] if args.data else []
    common = [f"--config={config}", *data, f"--trainer.default_root_dir={root}", f"--seed_everything={seed}",
              *extra, *args.extra]  # fmt: skip
    started = time.time()
    fit = [*common, f"--trainer.max_time={budget}", "--trainer.max_steps=-1", "--trainer.max_epochs=-1"]
    if cli.run(["fit", *fit]) != 0:
        raise SystemExit(f"{name}: fit failed (see above)")
    seconds = time.time() - started
    checkpoint = kept_checkpoint(root)
    # the whole validation split calibrates the decision rules that test then applies
    if cli.run(["validate", *common, f"--ckpt_path={checkpoint}", "--trainer.limit_val_batches=1.0"]) != 0:
        raise SystemExit(f"{name}: validate failed (see above)")
    if cli.run(["test", *common, f"--ckpt_path={checkpoint}"]) != 0:
        raise SystemExit(f"{name}: test failed (see above)")
    return json.loads(newest_metrics(root).read_text()), seconds


def value_of(row, metrics: dict) -> float:
    try:
        return float(row(metrics))
    except (KeyError, TypeError):  # e.g. no calibration: too few validation images for alpha
        return math.nan


def spread(values: list[float]) -> float:
    """The standard deviation over the seeds; nan where a seed has none (e.g. every test image referred)."""
    return math.nan if any(math.isnan(v) for v in values) else statistics.stdev(values)


def table(results: dict[str, list[tuple[dict, float]]], minutes: float, seeds: list[int]) -> str:
    """Mean over the seeds (± standard deviation with more than one), and the ratio of the means."""
    names = list(results)
    over = f"mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [f"| {minutes:g} min of training each, {over} | " + " | ".join(names) + " | ratio |",
             "| --- |" + " --- |" * (len(names) + 1)]  # fmt: skip
    for title, row in ROWS:
        per_model = [[value_of(row, metrics) for metrics, _ in results[name]] for name in names]
        means = [statistics.fmean(values) for values in per_model]
        cells = [f"{m:.3f}" + (f" ± {spread(v):.3f}" if len(v) > 1 else "") for m, v in zip(means, per_model)]
        ratio = means[0] / means[1] if len(means) == 2 and means[1] else math.nan
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    if len(seeds) > 1:
        for i, seed in enumerate(seeds):
            accuracies = [f"{results[name][i][0]['accuracy']:.3f}" for name in names]
            lines.append(f"| accuracy, seed {seed} | " + " | ".join(accuracies) + " | |")
    lines.append("| test images | " + " | ".join(str(results[n][0][0]["n_images"]) for n in names) + " | |")
    seconds = [statistics.fmean(s for _, s in results[n]) for n in names]
    lines.append("| fit seconds (incl. start-up) | " + " | ".join(f"{s:.0f}" for s in seconds) + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a datamodule config file (default: the configs' own data, PneumoniaMNIST)")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget of each model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full comparison per seed")
    parser.add_argument("--diffusion", default=MODELS["diffusion"][0], help="the diffusion classifier's config")
    parser.add_argument("--baseline", default=MODELS["resnet18"][0], help="the discriminative baseline's config")
    parser.add_argument("--output", type=Path, default=Path("runs/side_by_side"))
    args = parser.parse_args(own)
    args.extra = extra
    configs = {
        "diffusion": (args.diffusion, MODELS["diffusion"][1]),
        "resnet18": (args.baseline, MODELS["resnet18"][1]),
    }
    results = {name: [] for name in configs}
    for seed in args.seeds:
        for name, (config, options) in configs.items():
            results[name].append(train_validate_test(name, config, options, seed, args))
    text = table(results, args.minutes, args.seeds)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "side_by_side.md").write_text(text)
    print(f"\n{text}")
    return text


if __name__ == "__main__":
    tool_main(main, "python -m tools.side_by_side ...")
