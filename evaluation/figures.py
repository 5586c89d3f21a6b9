"""Figures of a run's report that the uncertainty figures (evaluation/uncertainty.py) do not already draw:
the reliability diagram, the confusion matrix and the out-of-distribution scores against the calibration's."""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_confusion_matrix

from .uncertainty import _cpu, _new_figure, _save, calibration_bins


def plot_reliability(probs, labels, n_bins: int = 15, path=None) -> Figure:
    """Accuracy against confidence (the top class's probability) in the bins of the ECE, with the
    diagonal of perfect calibration and the number of images in each bin."""
    probs, labels = _cpu(probs, labels)
    confidence, correct, bins = calibration_bins(probs, labels, n_bins)
    counts = torch.bincount(bins, minlength=n_bins).double()
    accuracy = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct) / counts.clamp(min=1)
    mean_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence) / counts.clamp(min=1)
    fig, ax = _new_figure()
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
    return _save(fig, path)


def plot_confusion(predictions, labels, class_names: list[str], path=None) -> Figure:
    """Counts of (true class, predicted class), each cell annotated with its count."""
    predictions, labels = _cpu(predictions, labels)
    matrix = multiclass_confusion_matrix(predictions, labels, len(class_names)).numpy()
    side = max(3.5, 0.9 * len(class_names) + 2)
    fig, ax = _new_figure((side + 1, side))
    ax.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(column, row, str(count), ha="center", va="center", color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    return _save(fig, path)


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
    fig, ax = _new_figure()
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
    return _save(fig, path)
