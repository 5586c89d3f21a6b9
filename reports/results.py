"""Per-image results of test and predict: gathered over ranks, one row per image id, written to
predictions.csv (and errors.pt), and, for test, metrics.json and the uncertainty figures.

Both stages of every classifier go through `PerImageResults`, so a test row and a predict row of
the same image are written by the same code.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from decisions.calibration import (
    DECISION_KEYS,
    OOD_BLOCK,
    RULES_BLOCK,
    SHIFT_BLOCK,
    apply_calibration,
    calibration_metrics,
    off_lines,
    rule_status,
)
from decisions.refusal import conformity_message
from decisions.set_shift import shift_message
from decisions.uncertainty import uncertainty_report
from diffusion.voting import entropy

from .figures import (
    plot_confusion,
    plot_filtered_accuracy,
    plot_ood_scores,
    plot_reliability,
    plot_risk_coverage,
    plot_uncertainty_boxes,
)
from .gallery import Gallery
from .records import ImageRecord, from_every_rank, image_records
from .report import write_report

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
ERRORS_FILE = "errors.pt"
DECISIONS_FILE = "decisions.json"  # test and predict: each rule on or OFF and why, refusals, whole-set tests


def concat_outputs(batches: list[dict]) -> dict:
    """Per-batch output dicts -> one dict of per-image tensors (lists for strings such as paths)."""
    if not batches:
        return {}
    joined = {}
    for key in batches[0]:
        values = [batch[key] for batch in batches]
        joined[key] = (
            torch.cat([v.detach().cpu() for v in values])
            if isinstance(values[0], Tensor)
            else sum(map(list, values), [])
        )
    return joined


def select(outputs: dict, index: Tensor) -> dict:
    return {k: v[index] if isinstance(v, Tensor) else [v[i] for i in index.tolist()] for k, v in outputs.items()}


def gather_unique(outputs: dict, trainer) -> dict:
    """All ranks' outputs, one row per image id, sorted by id.

    Under DDP, Lightning's test sampler (DistributedSampler) pads the ranks to equal length by
    repeating the first images; the repeats carry the same id (and, with id-seeded noise, the
    same results), so keeping the first row of each id makes every metric count each image
    exactly once. Must be called on every rank (all_gather_object is a collective).
    """
    outputs = concat_outputs([part for part in from_every_rank(outputs, trainer) if part])
    if not outputs:  # no images at all (e.g. limit_test_batches=0)
        return outputs
    ids = outputs["id"]
    order = torch.argsort(ids, stable=True)
    first = torch.ones(len(ids), dtype=torch.bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return select(outputs, order[first])


def write_metrics(directory: str | Path, metrics: dict) -> Path:
    path = Path(directory) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = with_undefined_explained(metrics)  # NaN and infinity are no JSON: null, each with its reason
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return path


def outputs_from_probs(probs: Tensor) -> dict[str, Tensor]:
    """Per-image outputs of a model that gives class probabilities (softmax, MC-dropout mean),
    with the meaning the diffusion classifier's vote fractions have: prediction (argmax), probs,
    entropy (nats) and entropy_normalized (/ log C) of probs, and score (probability of class 1,
    the positive class, with two classes; the winning probability with more)."""
    probs = probs.float()
    return {
        "prediction": probs.argmax(dim=1),
        "probs": probs,
        "entropy": entropy(probs),
        "entropy_normalized": entropy(probs, normalize=True),
        "score": probs[:, 1] if probs.shape[1] == 2 else probs.max(dim=1).values,
    }


def test_metrics(outputs: dict, num_classes: int, settings=None) -> dict:
    """metrics.json: accuracy, F1, AUROC, ECE, Brier and the uncertainty curves of `entropy`, for
    any model; a diffusion classifier's outputs and ClassifierSettings add both rules' accuracies,
    the forwards used and N, rule and early exit."""
    if "label" not in outputs:
        raise ValueError("the test set has no labels: use `predict` for unlabeled images")
    labels, predictions = outputs["label"], outputs["prediction"]
    accuracy = lambda p, y=labels: float(multiclass_accuracy(p, y, num_classes, average="micro"))  # noqa: E731
    report = uncertainty_report(outputs["probs"], labels, predictions, outputs["entropy"])
    metrics = {
        **report,
        "accuracy": accuracy(predictions),
        "f1": float(multiclass_f1_score(predictions, labels, num_classes, average="macro")),
    }
    for key in [key for key in outputs if key.endswith("_prediction")]:  # every vote rule's (diffusion.voting)
        metrics[key.replace("_prediction", "_accuracy")] = accuracy(outputs[key])
    if "forwards" in outputs and settings is not None:
        metrics["mean_forwards"] = float(outputs["forwards"].float().mean())
        views = len(getattr(settings, "views", ())) or 1  # each test-time view has its own N steps
        metrics["forward_fraction"] = metrics["mean_forwards"] / (num_classes * settings.num_steps * views)
    metrics["n_images"] = len(labels)
    if "out_of_distribution" in outputs:  # a refused image is counted as refused, not as right or wrong
        answered = ~outputs["out_of_distribution"].bool()
        metrics |= {"n_refused": int((~answered).sum()), "n_answered": int(answered.sum())}
        metrics["accuracy_answered"] = accuracy(predictions[answered], labels[answered]) if answered.any() else None
    if settings is not None:
        metrics |= {"n_steps": settings.num_steps, "rule": settings.rule, "early_exit": settings.early_exit}
        metrics |= {"views": list(settings.views)} if len(getattr(settings, "views", ())) > 1 else {}
    return with_undefined_explained(metrics, labels)


def with_undefined_explained(metrics: dict, labels: Tensor | None = None) -> dict:
    """Non-finite numbers (at any depth) become null, so metrics.json stays JSON, each with its reason under
    `undefined` (kept where an earlier call gave one): NaN of a ranking metric on labels of one class, or the
    infinity a calibrated threshold takes when its rule passes every image or none."""
    one_class = labels is not None and labels.unique().numel() < 2
    undefined = dict(metrics.get("undefined") or {})

    def reason(value: float) -> str:
        if math.isnan(value):
            if one_class:
                return f"the labels hold one class ({int(labels[0])}): a ranking metric needs both"
            return "not defined for these images"
        return f"{'+' if value > 0 else '-'}infinity (a threshold that no score passes, or every one)"

    def nulled(value, name: str):
        if isinstance(value, dict):
            return {key: nulled(item, f"{name}.{key}" if name else key) for key, item in value.items()}
        if isinstance(value, list):
            return [nulled(item, name) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            undefined.setdefault(name, reason(value))
            return None
        return value

    metrics = nulled({key: value for key, value in metrics.items() if key != "undefined"}, "")
    return metrics | ({"undefined": undefined} if undefined else {})


def write_predictions(path: str | Path, records: list[ImageRecord], class_names: list[str]) -> Path:
    """predictions.csv: one row per image, sorted by id, the fields of records.ImageRecord (documented there and
    in the README). The column of a decision rule that is OFF says "off"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [record.row(class_names) for record in records]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_errors(path: str | Path, outputs: dict) -> Path:
    """The full C x N error matrix of every image, keyed by id, for research (NaN = step skipped)."""
    torch.save({"ids": outputs["id"], "errors": outputs["errors"]}, path)
    return Path(path)


class PerImageResults:
    """Collects a stage's per-image outputs batch by batch and, at the end of the stage, writes them.

    `finish` gathers the rows of all ranks (one per image id), and rank 0 writes predictions.csv
    (and errors.pt if the outputs hold errors) into the logger's directory; with `metrics=True`
    (test) also metrics.json, accuracy_filtered.png and uncertainty_boxes.png, and the figures to
    TensorBoard. Must be called on every rank (it gathers, and trainer.log_dir is a collective).

    uncertainty_name: what `entropy` is (the figures' label), e.g. "vote entropy", "softmax entropy".
    """

    def __init__(self, class_names: list[str], uncertainty_name: str = "vote entropy"):
        self.class_names = class_names
        self.uncertainty_name = uncertainty_name
        self.batches: list[dict] = []
        self.gallery = Gallery(class_names)

    def add(self, outputs: dict, images: Tensor | None = None, calibration: dict | None = None) -> None:
        """Keeps a batch's outputs with the calibration's decisions on each image (decided here, once: refer,
        the prediction sets, the refusal); with its images, also the candidates of the report's gallery."""
        outputs = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        outputs |= apply_calibration(calibration, outputs) if calibration else {}
        self.batches.append(outputs)
        if images is not None:
            self.gallery.add(images, outputs)

    def finish(self, trainer, directory: Path, metrics: bool, settings=None, info: dict | None = None,
               calibration=None, description: str = "", calibration_note: str | None = None,
               model_card=None) -> tuple[dict, list[ImageRecord]]:  # fmt: skip
        """Writes the files into `directory` (rank 0); returns metrics.json's content (for predict: the decision
        blocks only) and the images' records (rank 0; empty on the others).
        `settings`: a diffusion classifier's ClassifierSettings; `info`: extra metrics.json entries;
        `calibration`: the run's calibration.json, applied: predictions.csv gets `refer`, the prediction
        sets and the out-of-distribution columns, metrics.json their blocks; `calibration_note`: why there
        is none (every rule is then OFF, and every output says so); `description`: the report's subtitle;
        `model_card`: the card of an export of these weights, which the report links."""
        outputs, self.batches = gather_unique(concat_outputs(self.batches), trainer), []
        gallery = self.gallery.finish(trainer)
        decisions = {key: outputs[key] for key in DECISION_KEYS if key in outputs} if calibration else {}
        numbers = test_metrics(outputs, len(self.class_names), settings) | (info or {}) if metrics else {}
        if decisions:
            scored = outputs if metrics else {key: value for key, value in outputs.items() if key != "label"}
            numbers |= calibration_metrics(calibration, decisions, scored, self.class_names)
        numbers[RULES_BLOCK] = rule_status(calibration, calibration_note)
        if not trainer.is_global_zero or not outputs:
            return numbers, []
        records = image_records(outputs, numbers[RULES_BLOCK])
        path = write_predictions(directory / PREDICTIONS_FILE, records, self.class_names)
        write_decisions(directory, numbers)
        if "errors" in outputs:
            save_errors(directory / ERRORS_FILE, outputs)
        if metrics:
            write_metrics(directory, numbers)
            self.write_figures(trainer, directory, outputs, numbers)
            print(f"test results written to {directory}")
        else:
            print(f"{len(outputs['id'])} predictions written to {path}")
        if OOD_BLOCK in numbers:
            block = calibration[OOD_BLOCK]
            plot_ood_scores(block["calibration_scores"], outputs["ood_score"], block["threshold"], block["score"],
                            directory / "ood_scores.png")  # fmt: skip
        report = write_report(
            directory, "test" if metrics else "predict", numbers, outputs, gallery, {r.id: r for r in records},
            class_names=self.class_names, calibration=calibration, description=description, model_card=model_card,
        )  # fmt: skip
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("report", f"open {report.resolve()} in a browser", global_step=trainer.global_step)
        print(f"report: {report}")
        report_decisions(numbers, self.class_names)  # the run's last lines: what was decided, what was OFF
        return numbers, records

    def write_figures(self, trainer, directory: Path, outputs: dict, numbers: dict) -> None:
        """The test figures as PNG files beside metrics.json (report.html embeds them) and in TensorBoard."""
        name = self.uncertainty_name
        selective = numbers.get("selective", {}).get("test")
        point = (selective["coverage"], 1 - selective["accuracy"]) if selective and selective["n_accepted"] else None
        figures = {
            "risk_coverage": plot_risk_coverage(
                outputs["prediction"],
                outputs["label"],
                outputs["entropy"],
                point,
                directory / "risk_coverage.png",
                title=f"Risk-coverage of {name}" + (" (star: the calibrated referral)" if point else ""),
            ),
            "accuracy_filtered": plot_filtered_accuracy(
                {name: numbers["accuracy_filtered"]}, directory / "accuracy_filtered.png"
            ),
            "uncertainty_boxes": plot_uncertainty_boxes(
                outputs["entropy"],
                outputs["prediction"],
                outputs["label"],
                directory / "uncertainty_boxes.png",
                ylabel=name,
            ),
            "reliability": plot_reliability(outputs["probs"], outputs["label"], path=directory / "reliability.png"),
            "confusion_matrix": plot_confusion(
                outputs["prediction"], outputs["label"], self.class_names, directory / "confusion_matrix.png"
            ),
        }
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            for figure_name, figure in figures.items():
                experiment.add_figure(f"test/{figure_name}", figure, global_step=trainer.global_step)


def decision_lines(numbers: dict, class_names: list[str]) -> tuple[list[str], list[str]]:
    """(notes, warnings) a run ends with: how many images were refused, each rule that is OFF and why, and a
    warning when the set is not like the validation images."""
    notes, warnings = [], off_lines(numbers[RULES_BLOCK])
    refusal = numbers.get(OOD_BLOCK)
    if refusal and refusal["feasible"]:
        notes.append(f"out of distribution: {refusal['n_refused']} of {refusal['n_images']} images refused "
                     f"({refusal['score']} score, conformal p-value < {refusal['alpha']})")  # fmt: skip
    message = shift_message(numbers[SHIFT_BLOCK]) if SHIFT_BLOCK in numbers else None
    warnings += [message] if message else []
    conformity = numbers.get("conformal", {}).get("class_conditional", {}).get("test", {}).get("exchangeability")
    if conformity and conformity["shifted"]:
        warnings.append(conformity_message(conformity, class_names))
    return notes, warnings


def report_decisions(numbers: dict, class_names: list[str]) -> None:
    notes, warnings = decision_lines(numbers, class_names)
    for line in notes:
        print(line)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)


def write_decisions(directory: Path, numbers: dict) -> Path:
    """decisions.json: the rules (on or OFF, why), the refusal counts and the whole-set tests, for test and predict
    alike (tools/classify.py reads it for its summary)."""
    keep = (RULES_BLOCK, OOD_BLOCK, SHIFT_BLOCK)
    path = Path(directory) / DECISIONS_FILE
    path.write_text(json.dumps({key: numbers[key] for key in keep if key in numbers}, indent=2) + "\n")
    return path


def newest_metrics(run_dir: str | Path) -> Path:
    candidates = sorted(Path(run_dir).rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no {METRICS_FILE} under {run_dir}: run `python cli.py test ...` first")
    return candidates[-1]
