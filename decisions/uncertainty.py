"""Uncertainty analysis of a finished test run (paper Sec. 4.4, Fig. 3, App. E / Fig. 9).

Pure functions on per-image results gathered over the whole test set:
    probs (N, C) class probabilities (vote fractions or softmax), labels (N,),
    predictions (N,) the model's decisions (not necessarily argmax of probs),
    uncertainty (N,) higher = more uncertain (e.g. vote entropy).
Correctness is always `predictions == labels`, except in the calibration metrics
(ECE, Brier, AUROC), which are defined on `probs` alone.

Tie rule used everywhere images are ranked by uncertainty: a stable ascending sort
on (uncertainty, index). Among equal uncertainties the lower index counts as more
certain, so the image with the HIGHER index is dropped first. Vote entropies take
few distinct values, so ties are common; a fixed rule keeps results hardware-independent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

FILTER_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(11))  # 0.00, 0.05, ..., 0.50


def per_image(*tensors: Tensor) -> list[Tensor]:
    """The per-image tensors on the CPU; refused unless they hold the same number (>= 1) of images."""
    out = [t.detach().cpu() for t in tensors]
    n = out[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in out):
        raise ValueError(f"need N >= 1 images and equal lengths, got {[tuple(t.shape) for t in out]}")
    return out


def certainty_order(uncertainty: Tensor) -> Tensor:
    """Indices from most to least certain; ties keep index order (stable sort)."""
    return torch.sort(uncertainty.double(), stable=True).indices


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Exact AUROC (ties count 1/2); NaN when only one class is present."""
    positives = positives.bool()
    if positives.all() or not positives.any():
        return float("nan")
    # binary_auroc applies a sigmoid to scores outside [0, 1]; that keeps the order but can
    # saturate (entropies in bits, logits) into false ties. Dense ranks scaled to [0, 1] keep
    # order and ties exactly, so the AUROC is unchanged and never passes through a sigmoid.
    ranks = torch.unique(scores.double(), return_inverse=True)[1].double()
    ranks = ranks / max(1.0, float(ranks.max()))
    return float(binary_auroc(ranks, positives.long()))


def filtered_accuracy(predictions, labels, uncertainty, fractions=FILTER_FRACTIONS) -> dict[str, float]:
    """Accuracy after dropping the round(f * N) most uncertain images, for each fraction f.

    Keys are the fractions with two decimals ("0.00", "0.05", ..., "0.50"). round() rounds
    half up, n_drop = floor(f * N + 1/2), so 5 % of 10 images drops one (Python's banker's
    round() would drop none). Ties: the image with the higher index is dropped first.
    NaN if nothing is left.
    """
    predictions, labels, uncertainty = per_image(predictions, labels, uncertainty)
    n = labels.shape[0]
    correct = (predictions == labels)[certainty_order(uncertainty)].double()
    out = {}
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {f}")
        n_keep = n - min(n, math.floor(f * n + 0.5 + 1e-9))  # 1e-9: 0.15*10 = 1.5000000000000002 etc.
        out[f"{f:.2f}"] = float(correct[:n_keep].mean()) if n_keep > 0 else float("nan")
    return out


def risk_coverage(predictions, labels, uncertainty) -> tuple[Tensor, Tensor]:
    """Coverage k/N and selective risk (error rate among the k most certain), k = 1..N.

    Images are ranked by ascending uncertainty with the module's tie rule. float64 tensors.
    """
    predictions, labels, uncertainty = per_image(predictions, labels, uncertainty)
    errors = (predictions != labels)[certainty_order(uncertainty)].double()
    k = torch.arange(1, errors.shape[0] + 1, dtype=torch.float64)
    return k / errors.shape[0], errors.cumsum(0) / k


def aurc(predictions, labels, uncertainty) -> float:
    """Area under the risk-coverage curve: the mean of the selective risks over k = 1..N.

    This is the discrete AURC of Geifman et al. (2019); lower is better. Its minimum for a
    given accuracy is reached when all errors are the most uncertain images.
    """
    return float(risk_coverage(predictions, labels, uncertainty)[1].mean())


def error_detection_auroc(predictions, labels, uncertainty) -> float:
    """AUROC of the uncertainty as a score for "the prediction is wrong" (positives = errors).

    Equals the fraction of (error, correct) pairs in which the error is more uncertain, ties
    counting 1/2. NaN when all predictions are right or all are wrong (AUROC undefined).
    """
    predictions, labels, uncertainty = per_image(predictions, labels, uncertainty)
    return auroc(uncertainty, predictions != labels)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of |accuracy - mean confidence| * (bin size / N).

    Confidence = max prob; correct = argmax(probs) == label (argmax of probs, NOT the given
    predictions; the first maximal class wins a tie). Bins are equal-width and right-closed
    on (0, 1]: ((m-1)/M, m/M], as in Guo et al. (2017).

    Written by hand rather than with torchmetrics' multiclass_calibration_error, which uses
    left-closed bins [lo, hi) with a separate bin for confidence exactly 1.0. Vote fractions
    (k / n_votes) lie exactly on bin edges, where the two disagree, and float32 rounding of
    both the value and torchmetrics' edges decides the bin. Here a confidence within 1e-6 of
    a bin's upper edge counts as in that bin, so 6/10 stored as float32 lands in (0.5, 0.6].
    """
    probs, labels = per_image(probs, labels)
    conf, correct, bins = calibration_bins(probs, labels, n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    # sum_b |acc_b - conf_b| * n_b / N  ==  sum_b |acc_sum_b - conf_sum_b| / N (empty bins add 0)
    return float((acc_sum - conf_sum).abs().sum() / conf.shape[0])


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence, correct, bin) per image, float64, float64 and long: the ECE's binning (see above)."""
    conf, top = probs.double().max(dim=1).values, probs.argmax(dim=1)
    bins = (torch.ceil(conf * n_bins - 1e-6) - 1).clamp(0, n_bins - 1).long()
    return conf, (top == labels).double(), bins


def brier_score(probs, labels) -> float:
    """Multi-class Brier score: mean over images of sum_c (p_c - onehot_c)^2, range [0, 2]."""
    probs, labels = per_image(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


def classification_auroc(probs, labels) -> float:
    """AUROC of the class probabilities.

    C == 2: binary AUROC of probs[:, 1] (class 1 is the positive class).
    C > 2: macro one-vs-rest AUROC, averaged over the classes present in `labels`
    (torchmetrics' multiclass_auroc would average in a score of 0 for an absent class).
    NaN if only one class is present in labels.
    """
    probs, labels = per_image(probs, labels)
    if probs.shape[1] < 2:
        raise ValueError("need at least 2 classes")
    if labels.unique().numel() < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return auroc(probs[:, 1], labels == 1)
    present = labels.unique().tolist()
    return sum(auroc(probs[:, c], labels == c) for c in present) / len(present)


def confusion_groups(predictions, labels, positive: int = 1, num_classes: int | None = None) -> dict[str, Tensor]:
    """Boolean masks TP / TN / FP / FN for binary tasks, or correct / wrong for C > 2.

    num_classes defaults to max(label, prediction) + 1 (at least 2).
    """
    predictions, labels = per_image(predictions, labels)
    if num_classes is None:
        num_classes = max(2, int(max(predictions.max(), labels.max())) + 1)
    if num_classes > 2:
        return {"correct": predictions == labels, "wrong": predictions != labels}
    pred_pos, true_pos = predictions == positive, labels == positive
    return {
        "TP": pred_pos & true_pos,
        "TN": ~pred_pos & ~true_pos,
        "FP": pred_pos & ~true_pos,
        "FN": ~pred_pos & true_pos,
    }


def uncertainty_report(probs, labels, predictions, uncertainty) -> dict:
    """All scalar metrics in one JSON-serialisable dict (floats; NaN where undefined)."""
    probs, labels, predictions, uncertainty = per_image(probs, labels, predictions, uncertainty)
    return {
        "accuracy": float((predictions == labels).double().mean()),
        "auroc": classification_auroc(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "aurc": aurc(predictions, labels, uncertainty),
        "error_detection_auroc": error_detection_auroc(predictions, labels, uncertainty),
        "accuracy_filtered": filtered_accuracy(predictions, labels, uncertainty),
    }
