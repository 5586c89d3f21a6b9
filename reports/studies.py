"""A study's numbers with error bars: from its finished run folders to study.csv, study.json, study.md and report.html.

Two sources of variance, reported apart (shared/DESIGN.md, "Statistics for comparisons"):
  the test set   per run, stratified bootstrap 95 % intervals of accuracy, F1, AUROC and ECE (study.csv), and per
                 pair of runs on the same test images, the paired-bootstrap interval of the accuracy difference,
                 McNemar's exact test and DeLong's test of the AUROC difference;
  the training   across seeds and folds, mean +- sd and a t-interval of each metric (study.md's cells), and of the
                 paired differences against the reference model (its last column).
An interval over seeds says nothing about the size of the test set, and a bootstrap of one run nothing about seed
luck: the table gives both. decisions/statistics.py holds the statistics.

Refused images (out of distribution: `prediction` -1 in predictions.csv) count in every table with the class the
model leads with (`leading_class`), so every model is scored on the same images and the paired tests stay paired;
the share of images each run answered (its coverage) stands beside, in study.csv, study.json and study.md. A study
compares what the models learned; what refusal costs or saves is reported apart (docs/decisions.md).
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from decisions.statistics import bootstrap_intervals, format_cell, paired_comparison, paired_differences, t_interval
from experiment.run_folders import RunFolder
from networks.weights import load_weights_file

from .figures import plot_forest
from .records import read_predictions
from .report import data_uri
from .results import PREDICTIONS_FILE, newest_metrics

METRICS = ("accuracy", "macro_f1", "auroc", "ece")
STUDY_FILES = ("study.csv", "study.json", "study.md", "report.html")


def read_run(folder: Path) -> dict:
    """The newest test of a run folder: labels, class scores, predictions (refused images: their leading class, see
    the module docstring), which images were refused, and row ids, from its predictions.csv."""
    directory = newest_metrics(folder).parent
    records, _ = read_predictions(directory / PREDICTIONS_FILE)
    return {
        "directory": str(directory),
        "ids": np.array([record.id for record in records]),
        "labels": np.array([record.label for record in records]),
        "predictions": np.array([record.leading for record in records]),
        "refused": np.array([record.refused for record in records]),
        "probs": np.array([record.probs for record in records]),
        "forwards": None if records[0].forwards is None else float(np.mean([record.forwards for record in records])),
    }


def validation_accuracy(folder: Path) -> float | None:
    """The accuracy of the run's `validate` stage on the whole validation split (what a study chooses on, never the
    test): the newest TensorBoard version of the run that logged val/accuracy; None when none did."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for version in reversed(RunFolder(folder).versions()):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0}).Reload()
        if "val/accuracy" in events.Tags().get("scalars", []):
            return float(events.Scalars("val/accuracy")[-1].value)
    return None


def training_steps(folder: Path) -> int | None:
    """The optimizer steps the run's training reached (its last.ckpt; a test-time arm: the weights' run)."""
    checkpoint = RunFolder(folder).last_checkpoint
    return int(load_weights_file(checkpoint)["global_step"]) if checkpoint.is_file() else None


def run_rows(study) -> tuple[list[dict], dict]:
    """study.csv's rows, one per run (done, failed or not run), and the read outputs of the finished runs."""
    rows, outputs = [], {}
    for run in study.runs():
        row = {"experiment": run.experiment, "seed": run.seed, "fold": run.fold, "folder": str(run.folder)}
        if not run.done():
            log = run.folder / "study.log"
            rows.append(row | {"status": "failed" if log.is_file() else "not run", "log": str(log)})
            continue
        data = read_run(run.folder)
        outputs[run.name] = data | {"run": run}
        intervals = bootstrap_intervals(data["labels"], data["probs"], data["predictions"])
        row |= {"status": "done", "test": data["directory"], "n_images": len(data["labels"]),
                "n_refused": int(data["refused"].sum()), "coverage": float(1 - data["refused"].mean()),
                "val_accuracy": validation_accuracy(run.folder), "forwards": data["forwards"],
                "steps": training_steps(run.weights_from or run.folder)}  # fmt: skip
        for metric in METRICS:
            row |= {metric: intervals[metric]["estimate"], f"{metric}_low": intervals[metric]["low"],
                    f"{metric}_high": intervals[metric]["high"]}  # fmt: skip
        rows.append(row)
    return rows, outputs


def paired_runs(study, outputs: dict, reference: str | None = None) -> dict[str, list[dict]]:
    """Per experiment other than the reference (the study's, or the one named): its paired comparison with the
    reference run of the same seed and fold, on the same test images (refused, in one line, where they differ)."""
    reference_name = reference or study.reference
    pairs = {}
    for name, data in outputs.items():
        run = data["run"]
        if run.experiment == reference_name:
            continue
        reference_run = outputs.get(name.replace(run.experiment, reference_name, 1))
        if reference_run is None:
            continue
        comparison = paired_comparison(
            reference_run["labels"], data["probs"], reference_run["probs"], data["predictions"],
            reference_run["predictions"], ids_a=data["ids"], ids_b=reference_run["ids"],
        )  # fmt: skip
        pairs.setdefault(run.experiment, []).append(comparison | {"seed": run.seed, "fold": run.fold})
    return pairs


def accuracy_differences(pairs: dict) -> dict[str, dict]:
    """Per experiment: its paired accuracy differences to a reference over the runs, with their t-interval."""
    return {
        experiment: paired_differences([pair["accuracy_a"] for pair in runs], [pair["accuracy_b"] for pair in runs])
        for experiment, runs in pairs.items()
    }


def summaries(study, rows: list[dict], pairs: dict, also: dict[str, dict] | None = None) -> dict:
    """Per experiment: the t-interval of each metric over its finished runs, and of the differences to the reference
    (and, under `accuracy_difference_against`, to each experiment of the study's `also_against`)."""
    found = {}
    against = {name: accuracy_differences(other) for name, other in (also or {}).items()}
    to_reference = accuracy_differences(pairs)
    for experiment in study.experiments:
        done = [row for row in rows if row["experiment"] == experiment and row["status"] == "done"]
        found[experiment] = {"runs": len(done)} | {
            metric: t_interval([row[metric] for row in done]) for metric in (*METRICS, "coverage") if done
        }
        for extra in ("val_accuracy", "steps", "forwards"):  # what the choice rests on, and what each run cost
            values = [row[extra] for row in done if row.get(extra) is not None]
            if values:
                found[experiment][extra] = t_interval(values)
        if experiment in pairs:
            found[experiment]["accuracy_difference"] = to_reference[experiment]
        found[experiment]["accuracy_difference_against"] = {
            name: differences[experiment] for name, differences in against.items() if experiment in differences
        }
    return found


def table(study, summary: dict, pairs: dict, rows: list[dict]) -> str:
    """study.md: Table 1 with mean +- sd [95 % t-interval over runs] cells and the differences to the reference."""
    over = "seeds and folds" if study.folds else "seeds"
    header = [
        "model",
        "runs",
        "validation accuracy",
        "steps",
        "forwards / image",
        "accuracy",
        "F1 (macro)",
        "AUROC",
        "ECE",
        "answered",
        f"accuracy - {study.reference} (pp)",
        *(f"accuracy - {name} (pp)" for name in study.also_against),
        "McNemar p / DeLong p per run",
    ]
    lines = [f"# Study {study.name}", "", f"Cells: mean ± sd [95 % t-interval] over {over}; accuracy and F1 in %; "
             "validation accuracy: the `validate` stage on the whole validation split (choose on it, never on test); "
             "steps: the training's optimizer steps; forwards: denoiser inputs per test image; "
             f"differences paired by run. "
             "Per-run bootstrap intervals (the test set's variance) are in study.csv. Images a model refused as out "
             "of distribution count with the class it leads with; `answered` is the share it did not refuse.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]  # fmt: skip
    for experiment, numbers in summary.items():
        cells = [experiment, str(numbers["runs"])]
        cells.append(format_cell(numbers["val_accuracy"], "accuracy") if "val_accuracy" in numbers else "-")
        cells += [f"{numbers[key]['mean']:.0f}" if key in numbers else "-" for key in ("steps", "forwards")]
        cells += [format_cell(numbers[metric], metric) if metric in numbers else "-" for metric in METRICS]
        cells.append(f"{100 * numbers['coverage']['mean']:.1f} %" if "coverage" in numbers else "-")
        difference = numbers.get("accuracy_difference")
        cells.append(
            format_cell(difference, "accuracy_difference")
            if difference
            else "reference" * (experiment == study.reference)
        )
        for name in study.also_against:
            other = numbers.get("accuracy_difference_against", {}).get(name)
            cells.append(format_cell(other, "accuracy_difference") if other else "reference" * (experiment == name))
        tests = [f"{pair['mcnemar']['pvalue']:.2g} / " + (f"{pair['auroc']['pvalue']:.2g}" if pair["auroc"] else "-")
                 for pair in pairs.get(experiment, [])]  # fmt: skip
        cells.append(", ".join(tests))
        lines.append("| " + " | ".join(cells) + " |")
    missing = [row for row in rows if row["status"] != "done"]
    if missing:
        lines += ["", "Runs without results (left out of the table):", ""]
        for row in missing:
            fold = f" fold {row['fold']}" if row["fold"] is not None else ""
            lines.append(f"- {row['experiment']} seed {row['seed']}{fold}: {row['status']}, log {row['log']}")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, study, markdown: str, figure: Path | None) -> Path:
    """report.html: the table and the forest plot in one self-contained page."""
    body = "".join(f"<p>{html.escape(line)}</p>" if not line.startswith("|") else "" for line in markdown.splitlines())
    table_lines = [line for line in markdown.splitlines() if line.startswith("|") and not line.startswith("| ---")]
    cells = lambda line: [html.escape(cell.strip()) for cell in line.strip("|").split("|")]  # noqa: E731
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(line)) + "</tr>" for line in table_lines)
    image = f'<img src="{data_uri(figure.read_bytes())}" alt="forest plot">' if figure else ""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Study {html.escape(study.name)}"
            "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{border:1px solid #ccc;"
            f"padding:4px}}table{{border-collapse:collapse}}</style></head><body>{body}<table>{rows}</table>{image}"
            "</body></html>")  # fmt: skip
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def summarize(study) -> dict:
    """Writes study.csv, study.json, study.md and report.html under runs/<study>/ and prints the table."""
    folder = study.root / study.name
    rows, outputs = run_rows(study)
    if not outputs:
        logs = ", ".join(row["log"] for row in rows if "log" in row)
        raise ValueError(f"no run of study {study.name} has finished, so no study page was written; see {logs}")
    folder.mkdir(parents=True, exist_ok=True)
    pairs = paired_runs(study, outputs)
    also = {name: paired_runs(study, outputs, name) for name in study.also_against}
    summary = summaries(study, rows, pairs, also)
    columns = sorted({key for row in rows for key in row}, key=lambda key: (key not in rows[0], key))
    with (folder / "study.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    result = {"study": study.name, "reference": study.reference, "also_against": list(study.also_against),
              "runs": rows, "summary": summary, "paired": pairs, "paired_against": also}  # fmt: skip
    (folder / "study.json").write_text(json.dumps(result, indent=2, default=json_value) + "\n")
    markdown = table(study, summary, pairs, rows)
    (folder / "study.md").write_text(markdown)
    figure = plot_forest(pairs, summary, study.reference, folder / "forest.png") if pairs else None
    report = write_report(folder, study, markdown, figure)
    print(markdown + f"\nwritten: {', '.join(str(folder / name) for name in STUDY_FILES)}; open {report}")
    return result


def json_value(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return None if isinstance(value, float) and math.isnan(value) else str(value)
