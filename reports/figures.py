"""Every figure of the suite's result files and reports, one style: matplotlib Figures on an Agg canvas.

Accuracy after filtering (paper Fig. 3) and uncertainty by outcome (Fig. 9), risk-coverage with the
calibrated operating point, reliability diagram, confusion matrix, out-of-distribution scores.
Each takes per-image tensors, draws, and writes a PNG when given a path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_confusion_matrix

from decisions.uncertainty import calibration_bins, confusion_groups, per_image, risk_coverage


# Figures are built on matplotlib.figure.Figure with an Agg canvas, never through pyplot:
# this works headless, leaves the caller's pyplot backend and open figures alone, and
# nothing is registered with pyplot that would need closing.
def new_canvas(size=(6.0, 4.0)) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def new_figure(size=(6.0, 4.0)) -> tuple[Figure, object]:
    fig = new_canvas(size)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return fig


def plot_filtered_accuracy(curves: dict[str, dict[str, float]], path=None) -> Figure:
    """Fig. 3: accuracy vs. fraction of most uncertain images filtered; one line per model."""
    fig, ax = new_figure()
    for name, curve in curves.items():
        xs = sorted(float(k) for k in curve)
        ax.plot(xs, [curve[f"{x:.2f}"] for x in xs], marker="o", label=name)
    ax.set_xlabel("fraction of most uncertain images filtered out")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.0, 0.5)
    ax.set_title("Accuracy vs. uncertain images filtered out")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    return save_figure(fig, path)


def plot_uncertainty_boxes(
    uncertainty, predictions, labels, path=None, ylabel="vote entropy", num_classes: int | None = None
) -> Figure:
    """Fig. 9: box plot of the uncertainty per group TP / TN / FP / FN (or correct / wrong)."""
    uncertainty, predictions, labels = per_image(uncertainty, predictions, labels)
    groups = confusion_groups(predictions, labels, num_classes=num_classes)
    fig, ax = new_figure()
    data = [uncertainty[mask].double().numpy() for mask in groups.values()]
    ax.boxplot(data)  # an empty group draws as an empty slot
    ax.set_xticks(range(1, len(groups) + 1))
    ax.set_xticklabels([f"{name}\nn={int(mask.sum())}" for name, mask in groups.items()])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} by prediction outcome")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_risk_coverage(
    predictions,
    labels,
    uncertainty,
    operating_point: tuple[float, float] | None = None,
    path=None,
    title: str = "Risk-coverage curve",
) -> Figure:
    """Selective risk vs. coverage (most certain first), with the chosen operating point marked.

    operating_point is (coverage, risk), e.g. a `selective_report`'s coverage and risk on the test
    set under the calibrated threshold. Written as a PNG when path is given.
    """
    coverage, risk = risk_coverage(predictions, labels, uncertainty)
    fig, ax = new_figure()
    ax.plot(coverage.numpy(), risk.numpy(), label="risk-coverage")
    if operating_point is not None:
        c, r = operating_point
        ax.plot(
            [c],
            [r],
            marker="*",
            markersize=14,
            linestyle="none",
            color="C3",
            label=f"operating point ({c:.2f}, {r:.3f})",
        )
    ax.set_xlabel("coverage (fraction of images accepted)")
    ax.set_ylabel("selective risk (error rate on accepted)")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_reliability(probs, labels, n_bins: int = 15, path=None) -> Figure:
    """Accuracy against confidence (the top class's probability) in the bins of the ECE, with the
    diagonal of perfect calibration and the number of images in each bin."""
    probs, labels = per_image(probs, labels)
    confidence, correct, bins = calibration_bins(probs, labels, n_bins)
    counts = torch.bincount(bins, minlength=n_bins).double()
    accuracy = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct) / counts.clamp(min=1)
    mean_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence) / counts.clamp(min=1)
    fig, ax = new_figure()
    edges = np.linspace(0, 1, n_bins + 1)
    filled = (counts > 0).numpy()
    ax.bar(edges[:-1][filled], accuracy.numpy()[filled], width=1 / n_bins, align="edge", alpha=0.7,
           edgecolor="C0", label="accuracy in the bin")  # fmt: skip
    ax.plot(mean_confidence.numpy()[filled], accuracy.numpy()[filled], "o", color="C1", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for left, n, height in zip(edges[:-1][filled], counts.numpy()[filled], accuracy.numpy()[filled]):
        ax.text(left + 0.5 / n_bins, min(height + 0.02, 0.97), f"{int(n)}", ha="center", fontsize=7)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Reliability diagram (numbers: images per bin)")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_confusion(predictions, labels, class_names: list[str], path=None) -> Figure:
    """Counts of (true class, predicted class), each cell annotated with its count."""
    predictions, labels = per_image(predictions, labels)
    matrix = multiclass_confusion_matrix(predictions, labels, len(class_names)).numpy()
    side = max(3.5, 0.9 * len(class_names) + 2)
    fig, ax = new_figure((side + 1, side))
    ax.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(column, row, str(count), ha="center", va="center", color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    return save_figure(fig, path)


def plot_ood_scores(calibration_scores, scores, threshold: float | None, name: str, path=None) -> Figure:
    """Histograms of the out-of-distribution scores of the calibration images and of this run's images,
    with the refusal threshold (images scoring above it are refused). Log-spaced bins for positive
    scores that span more than two decades (typicality: a few for images like the training data,
    hundreds for others)."""
    calibration = np.asarray(calibration_scores, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    both = np.concatenate([calibration, scores])
    low, high = float(both.min()), float(both.max())
    logarithmic = low > 0 and high / low > 100
    edges = np.geomspace(low, high, 40) if logarithmic else np.linspace(low, high if high > low else low + 1, 40)
    fig, ax = new_figure()
    ax.hist(calibration, bins=edges, alpha=0.6, density=True, label=f"calibration images (n = {len(calibration)})")
    ax.hist(scores, bins=edges, alpha=0.6, density=True, label=f"this run's images (n = {len(scores)})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="C3", linestyle="--", label="refused above")
    if logarithmic:
        ax.set_xscale("log")
    ax.set_xlabel(f"out-of-distribution score ({name}; higher = less like the training data)")
    ax.set_ylabel("density")
    ax.set_title("Out-of-distribution scores")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_forest(pairs: dict[str, list[dict]], summary: dict, reference: str, path=None) -> Path:
    """A study's forest plot: per model, the accuracy difference to the reference (percentage points) of every
    paired run with its paired-bootstrap interval (thin, dots), and over the runs the mean with its t-interval
    (thick); returns the PNG's path."""
    fig, ax = new_figure((7.0, 1.2 + 0.9 * len(pairs)))
    for row, (experiment, runs) in enumerate(pairs.items()):
        for offset, run in zip(np.linspace(-0.25, -0.05, len(runs)), runs):
            difference = run["accuracy_difference"]
            ax.plot([100 * difference["low"], 100 * difference["high"]], [row + offset] * 2, color="0.6", lw=1)
            ax.plot(100 * difference["estimate"], row + offset, "o", color="0.4", ms=4)
        mean = summary[experiment].get("accuracy_difference")
        if mean:
            ax.plot([100 * mean["low"], 100 * mean["high"]], [row + 0.15] * 2, color="C0", lw=3)
            ax.plot(100 * mean["mean"], row + 0.15, "D", color="C0", ms=7)
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(pairs)), list(pairs))
    ax.set_xlabel(f"accuracy minus {reference}'s (percentage points)")
    ax.set_title("Paired differences: per run (grey, test-set bootstrap) and over runs (blue, t-interval)")
    save_figure(fig, path)
    return Path(path)
