"""The paper's Table 1 from run directories: every model, grouped CNN / TF / DM, with accuracy, F1,
AUROC and ECE per dataset.

    python -m tools.results_table runs/* [--markdown table.md] [--csv table.csv]
    make results

Each argument is a run's `trainer.default_root_dir`. Its newest metrics.json (written by
`python cli.py test ...`) gives the numbers, unless that test ran without a checkpoint; the
config.yaml the CLI saved beside it names the
model (the model class, the baseline's backbone or the diffusion classifier's network) and the
data set (the datamodule class; the MedMNIST flag; the synthetic kind). Directories without test
results are skipped with a note; of two runs of the same model on the same data the newer counts.
The Markdown table (accuracy in %, as in the paper) is printed and, with --markdown, written; the
CSV has the same layout with the group on every row and unrounded numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from decisions.statistics import bootstrap_intervals
from experiment.user_errors import tool_main
from networks.backbones import BACKBONES
from reports import studies
from reports.results import METRICS_FILE, PREDICTIONS_FILE, newest_metrics

GROUPS = ("CNN", "TF", "DM")  # Table 1's groups, in its order; anything else comes last
MODEL_ORDER = [spec.display_name for spec in BACKBONES.values()] + ["DiT-B/4", "UNet", "Stable Diffusion"]
DATASET_ORDER = ["CheXpert", "ISIC"]
DATASET_NAMES = {"CheXpertDataModule": "CheXpert", "ISICDataModule": "ISIC"}
NETWORK_NAMES = {"ClassConditionalUNet": "UNet"}
# (column title, metrics.json key, Markdown format); accuracy in percent as in the paper
COLUMNS = (
    ("accuracy (%)", "accuracy", "{:.1f}"),
    ("F1", "f1", "{:.3f}"),
    ("AUROC", "auroc", "{:.3f}"),
    ("ECE", "ece", "{:.3f}"),
)
# 95 % intervals shown in the cells of these columns (and as columns of their own in the CSV): a stratified
# bootstrap of the run's test images from its predictions.csv (decisions/statistics.py), the test set's share
# of the uncertainty, not the seed's (a study gives that: tools/study.py).
INTERVALS = {"accuracy (%)": ("intervals.accuracy", 100.0, "{:.1f}"), "AUROC": ("intervals.auroc", 1.0, "{:.3f}")}
CI = " 95 % CI"
# Where a run was calibrated (`validate`): the referral rule's accuracy on the images it keeps and their
# share, and the class-conditional conformal sets' coverage and mean size (decisions/referral_and_sets.py).
CALIBRATED_COLUMNS = (
    ("referral accuracy (%)", "selective.test.accuracy", "{:.1f}"),
    ("kept", "selective.test.coverage", "{:.2f}"),
    ("set coverage", "conformal.class_conditional.test.coverage", "{:.3f}"),
    ("set size", "conformal.class_conditional.test.mean_set_size", "{:.2f}"),
)
PERCENT = {"accuracy", "selective.test.accuracy"}
OFF = "OFF"  # the cell of a calibrated column whose rule was off in that run (metrics.json `rules`)
RULE_OF = {"selective": "referral", "conformal": "prediction_sets"}


def metric(metrics: dict, key: str):
    """A metrics.json value by its dotted path; None where the run has none; OFF where its rule was off."""
    rule = RULE_OF.get(key.split(".")[0])
    if rule and not metrics.get("rules", {}).get(rule, {"on": True})["on"]:
        return OFF
    for part in key.split("."):
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics


@dataclass
class Run:
    directory: Path
    metrics_path: Path
    group: str
    model: str
    dataset: str
    metrics: dict


def _class_name(section: dict | None) -> str:
    return str((section or {}).get("class_path", "")).rsplit(".", 1)[-1]


def describe_model(model: dict) -> tuple[str, str]:
    """(group, name) of a config's `model` section."""
    name, args = _class_name(model), model.get("init_args") or {}
    if name == "BaselineClassifier":
        spec = BACKBONES.get(args.get("backbone"))
        group, display = (spec.group, spec.display_name) if spec else ("other", str(args.get("backbone")))
        # a row of its own: test-time flips are not the paper's protocol
        return group, display + (" + test-time flips" if args.get("test_time_flips") else "")
    if name == "DiffusionClassifier":
        network = args.get("network") or {}
        return "DM", _network_name(_class_name(network), network.get("init_args") or {})
    if "StableDiffusion" in name:
        return "DM", "Stable Diffusion"
    return ("DM" if "Diffusion" in name else "other"), name


def _network_name(name: str, args: dict) -> str:
    if name == "DiT":
        from networks.dit import DIT_VARIANTS  # DiT-B/4 and friends, by their sizes

        if args.get("variant"):
            return str(args["variant"])
        sizes = {key: args.get(key) for key in ("depth", "hidden_size", "num_heads", "patch_size")}
        return next((variant for variant, cfg in DIT_VARIANTS.items() if cfg == sizes), "DiT")
    return NETWORK_NAMES.get(name, name)


def describe_data(data: dict) -> str:
    """The data set's name from a config's `data` section."""
    name, args = _class_name(data), data.get("init_args") or {}
    if name in DATASET_NAMES:
        return DATASET_NAMES[name]
    if name == "MedMNISTDataModule":
        flag = str(args.get("flag", "medmnist"))
        return flag[: -len("mnist")].capitalize() + "MNIST" if flag.endswith("mnist") else flag
    if name == "SyntheticDataModule":
        return f"Synthetic {args.get('kind', 'chest')}"
    return name.removesuffix("DataModule") or "unknown"


def read_run(directory: str | Path) -> Run:
    directory = Path(directory)
    metrics_path = newest_metrics(directory)
    config_path = metrics_path.with_name("config.yaml")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: the model and data of {metrics_path} are unknown")
    config = yaml.safe_load(config_path.read_text())
    group, model = describe_model(config.get("model") or {})
    metrics = json.loads(metrics_path.read_text())
    predictions = metrics_path.with_name(PREDICTIONS_FILE)
    if predictions.is_file() and "label" in predictions.open().readline().split(","):
        tested = studies.read_run(directory)
        metrics["intervals"] = bootstrap_intervals(tested["labels"], tested["probs"], tested["predictions"])
    return Run(directory, metrics_path, group, model, describe_data(config.get("data") or {}), metrics)


def collect_runs(directories: list[str | Path]) -> list[Run]:
    """One Run per (model, dataset): the newest; directories without results are skipped."""
    newest: dict[tuple[str, str], Run] = {}
    for directory in directories:
        if not Path(directory).is_dir():
            continue
        if (Path(directory) / "study.md").is_file():
            print(f"skipped {directory}: a study of several runs, its table is {Path(directory) / 'study.md'}",
                  file=sys.stderr)  # fmt: skip
            continue
        try:
            run = read_run(directory)
        except FileNotFoundError as error:
            print(f"skipped {directory}: {error}", file=sys.stderr)
            continue
        if "checkpoint" in run.metrics and not run.metrics["checkpoint"]:
            print(f"skipped {directory}: {run.metrics_path} tested untrained weights (no checkpoint)", file=sys.stderr)
            continue
        key = (run.model, run.dataset)
        if key in newest:
            older, run = sorted([newest[key], run], key=lambda r: r.metrics_path.stat().st_mtime)
            print(f"{run.model} on {run.dataset}: using {run.metrics_path}, not {older.metrics_path}", file=sys.stderr)
        newest[key] = run
    return list(newest.values())


def _rank(order: list[str], value: str) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def build_table(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """Column titles and rows (dicts of raw values, None where a model has no run on a data set)."""
    datasets = sorted({run.dataset for run in runs}, key=lambda d: _rank(DATASET_ORDER, d))
    models = sorted(
        {(run.group, run.model) for run in runs}, key=lambda gm: (_rank(list(GROUPS), gm[0]), _rank(MODEL_ORDER, gm[1]))
    )
    by_key = {(run.model, run.dataset): run.metrics for run in runs}
    shown = COLUMNS + CALIBRATED_COLUMNS * any("selective" in run.metrics for run in runs)
    columns = ["group", "model"] + [f"{dataset} {title}" for dataset in datasets for title, _, _ in shown]
    rows = []
    for group, model in models:
        row = {"group": group, "model": model}
        for dataset in datasets:
            metrics = by_key.get((model, dataset), {})
            for title, key, _ in shown:
                value = metric(metrics, key)
                row[f"{dataset} {title}"] = value * 100 if key in PERCENT and isinstance(value, float) else value
                if title in INTERVALS and metric(metrics, INTERVALS[title][0]):
                    interval, scale = metric(metrics, INTERVALS[title][0]), INTERVALS[title][1]
                    row[f"{dataset} {title}{CI}"] = (scale * interval["low"], scale * interval["high"])
        rows.append(row)
    return columns, rows


def _markdown_cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if value == OFF:
        return OFF
    return "n/a" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def _interval(row: dict, column: str) -> str:
    interval = row.get(column + CI)
    if interval is None:
        return ""
    fmt = next(fmt for title, (_, _, fmt) in INTERVALS.items() if column.endswith(" " + title))
    return f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    formats = {"group": "{}", "model": "{}"} | {
        c: fmt for c in columns for title, _, fmt in COLUMNS + CALIBRATED_COLUMNS if c.endswith(" " + title)
    }
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    previous_group = None
    for row in rows:
        cells = [_markdown_cell(row[c], formats[c]) + _interval(row, c) for c in columns]
        if row["group"] == previous_group:
            cells[0] = ""  # as in the paper: the group is named on its first row only
        previous_group = row["group"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        intervals = [c + CI for c in columns if any(c + CI in row for row in rows)]
        bounds = [f"{c} {bound}" for c in intervals for bound in ("low", "high")]
        writer = csv.DictWriter(handle, fieldnames=columns + bounds)
        writer.writeheader()
        for row in rows:
            cells = {c: "" if row[c] is None else row[c] for c in columns}
            for c in intervals:
                low, high = row.get(c, ("", ""))
                cells |= {f"{c} low": low, f"{c} high": high}
            writer.writerow(cells)
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories (trainer.default_root_dir), e.g. runs/*")
    parser.add_argument("--markdown", help="also write the Markdown table to this file")
    parser.add_argument("--csv", help="also write the table as CSV to this file")
    args = parser.parse_args(argv)
    runs = collect_runs(args.run_dirs)
    if not runs:
        parser.error(f"no {METRICS_FILE} under {' '.join(args.run_dirs)}: run `python cli.py test ...` first")
    columns, rows = build_table(runs)
    markdown = to_markdown(columns, rows)
    print(markdown, end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown)
    if args.csv:
        write_csv(args.csv, columns, rows)
    return markdown


if __name__ == "__main__":
    tool_main(main, "python -m tools.results_table ...")
