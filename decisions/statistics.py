"""Intervals and paired tests for comparing models (the statistics layer of studies).

Two sources of variance, kept apart (DESIGN.md, "Statistics for comparisons"): the test set, by a stratified
bootstrap over its images (`bootstrap_intervals`) and, for two models tested on the same images, a paired
bootstrap, McNemar's exact test and DeLong's test (`paired_comparison`), none of which sees seed luck; and the
training run, by a t-interval over seeds or folds (`t_interval`, `paired_differences`), which does not see the
size of the test set. Report both, and say which an interval is.

Inputs as in `decisions/uncertainty.py`, numpy arrays or torch tensors: labels (N,), probs (N, C) (a 1-D probs
is P(class 1) of a binary task), predictions (N,) the model's decisions, argmax(probs) if not given (pass a
diffusion classifier's majority votes: they can differ from the argmax of its vote fractions). Metrics are
fractions in [0, 1]; results are plain floats, ints, lists and dicts, ready for JSON.

Libraries where they exist: the metrics come from `decisions/uncertainty.py` and torchmetrics, intervals and
tests from scipy.stats. Written here: the stratified bootstrap (scipy.stats.bootstrap does not stratify), all
resamples at once as linear functions of a resample-count matrix, and the fast DeLong test (Sun and Xu 2014),
which neither scipy nor statsmodels provides.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from torchmetrics.functional.classification import multiclass_f1_score

from .uncertainty import calibration_bins, classification_auroc, expected_calibration_error

METRICS = ("accuracy", "macro_f1", "auroc", "ece")
PERCENT_METRICS = ("accuracy", "macro_f1")  # format_cell shows these in %, the others as 0.xxx
ECE_BINS = 15  # as uncertainty.expected_calibration_error


def as_arrays(labels, probs, predictions=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,) int64, probs (N, C) float64, predictions (N,) int64 (argmax of probs, first max, if None)."""
    labels = _numpy(labels).astype(np.int64)
    probs = _numpy(probs).astype(np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    predictions = probs.argmax(axis=1) if predictions is None else _numpy(predictions).astype(np.int64)
    n = labels.shape[0]
    if n == 0 or probs.shape[0] != n or predictions.shape != (n,):
        raise ValueError(f"need N >= 1 equally long inputs, got {labels.shape}, {probs.shape}, {predictions.shape}")
    return labels, probs, predictions


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------- metrics and the stratified bootstrap
def metric_values(labels, probs, predictions=None) -> dict[str, float]:
    """Accuracy and macro F1 of `predictions`; AUROC and ECE of `probs` (uncertainty.py's definitions).

    Macro F1 averages 2TP / (2TP + FP + FN) over the classes that occur in labels or predictions
    (torchmetrics' rule). AUROC: of probs[:, 1] for two classes, macro one-vs-rest for more. ECE: top-label,
    15 equal-width bins, confidence = max prob and correctness = argmax(probs) == label.
    """
    labels, probs, predictions = as_arrays(labels, probs, predictions)
    y, p, pred = torch.from_numpy(labels), torch.from_numpy(probs), torch.from_numpy(predictions)
    f1 = multiclass_f1_score(pred, y, num_classes=probs.shape[1], average="macro")
    return {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(f1),
        "auroc": classification_auroc(p, y),
        "ece": expected_calibration_error(p, y, n_bins=ECE_BINS),
    }


def stratified_indices(labels, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) image indices; each row resamples every class with replacement within itself.

    Row b keeps the images' class layout: labels[indices[b]] == labels, so the class counts never change.
    """
    labels = _numpy(labels)
    rng = np.random.default_rng(seed)
    indices = np.empty((n_resamples, labels.shape[0]), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        indices[:, members] = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
    return indices


def resample_metrics(labels, probs, predictions, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of `metric_values` on every resample (row of `indices`) at once: arrays (B,).

    Each metric is a sum over images weighted by how often the resample drew them (counts W, (B, N)), so
    2000 resamples are a few matrix products instead of 2000 calls. Stratified resamples keep every class.
    """
    labels, probs, predictions = as_arrays(labels, probs, predictions)
    b, n = indices.shape
    counts = np.bincount((indices + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(float)
    total = counts.sum(axis=1)
    classes = np.arange(probs.shape[1])
    is_label, is_pred = labels[:, None] == classes, predictions[:, None] == classes
    tp, fp, fn = (counts @ m for m in (is_label & is_pred, ~is_label & is_pred, is_label & ~is_pred))
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore"):  # 0 / 0 marks a class absent from labels and predictions: left out
        f1 = np.nanmean(np.where(denominator > 0, 2 * tp / denominator, np.nan), axis=1)
    conf, correct, bins = map(np.asarray, calibration_bins(torch.from_numpy(probs), torch.from_numpy(labels), ECE_BINS))
    # sum over bins of |sum_i in bin (correct_i - conf_i)|, per resample
    gaps = counts @ (np.eye(ECE_BINS)[bins] * (correct - conf)[:, None])
    if probs.shape[1] == 2:
        auc = _weighted_auroc(probs[:, 1], labels == 1, counts)
    else:  # macro one-vs-rest over the classes present (all of them in every stratified resample)
        auc = np.mean([_weighted_auroc(probs[:, c], labels == c, counts) for c in np.unique(labels)], axis=0)
    return {
        "accuracy": counts @ (predictions == labels) / total,
        "macro_f1": f1,
        "auroc": auc,
        "ece": np.abs(gaps).sum(axis=1) / total,
    }


def _weighted_auroc(scores: np.ndarray, positives: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties 1/2) of each resample, images weighted by their counts (B, N). O(B N)."""
    if positives.all() or not positives.any():
        return np.full(counts.shape[0], np.nan)
    negatives = np.flatnonzero(~positives)[np.argsort(scores[~positives], kind="stable")]
    below = np.cumsum(counts[:, negatives], axis=1)
    below = np.concatenate([np.zeros((counts.shape[0], 1)), below], axis=1)  # negative weight below each rank
    # a positive beats the negatives scored lower and half of those scored equal: the mean of the two bounds
    x, y = scores[positives], scores[negatives]
    wins = 0.5 * (below[:, np.searchsorted(y, x, side="left")] + below[:, np.searchsorted(y, x, side="right")])
    return (counts[:, positives] * wins).sum(axis=1) / (counts[:, positives].sum(axis=1) * below[:, -1])


def percentile_interval(estimate: float, resampled: np.ndarray, confidence: float) -> dict[str, float]:
    """{"estimate", "low", "high"}: the estimate on the whole test set and the percentiles of its resamples."""
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def bootstrap_intervals(
    labels, probs, predictions=None, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Test-set percentile intervals of each metric: {metric: {"estimate", "low", "high"}}.

    Stratified: each class is resampled within itself, so every resample has the test set's class counts
    (the AUROC stays defined, and class balance is not a source of spread). Seeded: same inputs, same result.
    """
    labels, probs, predictions = as_arrays(labels, probs, predictions)
    resampled = resample_metrics(labels, probs, predictions, stratified_indices(labels, n_resamples, seed))
    estimates = metric_values(labels, probs, predictions)
    return {m: percentile_interval(estimates[m], resampled[m], confidence) for m in METRICS}


# ---------------------------------------------------------------- seeds and folds
def t_interval(values, confidence: float = 0.95) -> dict[str, float]:
    """Student-t interval of the mean over seeds or folds: {"mean", "sd", "low", "high", "n"}.

    sd is the sample standard deviation (ddof 1). With n = 1 there is no spread to estimate: sd, low and
    high are NaN (say "one seed", do not print a zero-width interval).
    """
    values = _numpy(values).astype(np.float64).ravel()
    n = values.size
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "sd": float("nan"), "low": float("nan"), "high": float("nan"), "n": 1}
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / np.sqrt(n))
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "n": n}


def paired_differences(values_a, values_b, confidence: float = 0.95) -> dict:
    """Differences a - b paired by seed (or fold), with the t_interval of their mean and its keys."""
    a, b = _numpy(values_a).astype(np.float64).ravel(), _numpy(values_b).astype(np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"need one value per seed for both models, got {a.size} and {b.size}")
    return {"differences": (a - b).tolist(), **t_interval(a - b, confidence)}


# ---------------------------------------------------------------- two models on the same test images
def delong(labels, scores_a, scores_b) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs (binary labels, 1 = positive), in O(N log N).

    The fast form of Sun and Xu (2014): the placement values come from midranks (ties count 1/2) among
    the positives, the negatives and all images, instead of comparing every positive with every negative.
    z = (auc_a - auc_b) / sqrt(var_a + var_b - 2 covariance), two-sided normal p-value. Zero variance of the
    difference gives z = 0 and p = 1 for equal AUROCs (identical scores), NaN otherwise.
    """
    positives = _numpy(labels).astype(np.int64) == 1
    scores = np.stack([_numpy(scores_a), _numpy(scores_b)]).astype(np.float64)
    m, n = int(positives.sum()), int((~positives).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both positives and negatives")
    x, y = scores[:, positives], scores[:, ~positives]
    rank_x, rank_y = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rank_all = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    auc = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (rank_all[:, :m] - rank_x) / n  # per positive: fraction of negatives it beats
    v01 = 1.0 - (rank_all[:, m:] - rank_y) / m  # per negative: fraction of positives that beat it
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = auc[0] - auc[1]
    z = diff / np.sqrt(var_diff) if var_diff > 1e-15 else (0.0 if diff == 0 else float("nan"))
    values = (auc[0], auc[1], cov[0, 0], cov[1, 1], cov[0, 1], z, 2 * stats.norm.sf(abs(z)))
    return {k: float(v) for k, v in zip(("auc_a", "auc_b", "var_a", "var_b", "covariance", "z", "pvalue"), values)}


def mcnemar(correct_a, correct_b) -> dict[str, float]:
    """McNemar's exact test: a two-sided binomial test (p = 1/2) on the discordant pairs.

    b10 = images only A got right, b01 = images only B got right. No discordant pair gives p = 1.
    """
    a, b = _numpy(correct_a).astype(bool), _numpy(correct_b).astype(bool)
    b10, b01 = int((a & ~b).sum()), int((~a & b).sum())
    p = stats.binomtest(b10, b10 + b01, 0.5).pvalue if b10 + b01 > 0 else 1.0
    return {"b01": b01, "b10": b10, "pvalue": float(p)}


def align_ids(ids_a, ids_b) -> np.ndarray:
    """The permutation that puts B's images in A's order; ValueError (one line) if the images differ."""
    ids_a, ids_b = _numpy(ids_a).tolist(), _numpy(ids_b).tolist()
    only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
    if only_a or only_b:
        raise ValueError(
            f"the runs tested different images: {len(only_a)} ids only in A (e.g. {_examples(only_a)}), "
            f"{len(only_b)} only in B (e.g. {_examples(only_b)})"
        )
    if len(ids_a) != len(ids_b) or len(set(ids_a)) != len(ids_a):
        raise ValueError(
            f"image ids must be unique: A has {len(ids_a)} ids ({len(set(ids_a))} distinct), "
            f"B has {len(ids_b)} ({len(set(ids_b))} distinct)"
        )
    position = {image: i for i, image in enumerate(ids_b)}
    return np.array([position[image] for image in ids_a], dtype=np.int64)


def _examples(ids: set, k: int = 3) -> list:
    return sorted(ids, key=lambda v: (type(v).__name__, v))[:k]  # by type first: ints and strings do not compare


def paired_comparison(
    labels,
    probs_a,
    probs_b,
    predictions_a=None,
    predictions_b=None,
    ids_a=None,
    ids_b=None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Model A against model B on the same test images: differences are always a - b.

    - "accuracy_difference": {"estimate", "low", "high"}, a paired stratified bootstrap (both models see the
      same resampled images, so their correlation narrows the interval);
    - "mcnemar": {"b01", "b10", "pvalue"}, see `mcnemar`;
    - "auroc": `delong` of probs[:, 1] plus "difference"; None unless both classes of a binary task occur.
    labels are in A's order. With ids (both or neither), B's arrays are put in A's order first; runs that
    tested different images are refused.
    """
    if (ids_a is None) != (ids_b is None):
        raise ValueError("give the image ids of both runs or of neither")
    labels, probs_a, predictions_a = as_arrays(labels, probs_a, predictions_a)
    if ids_a is not None:
        order = align_ids(ids_a, ids_b)
        probs_b = _numpy(probs_b)[order]
        predictions_b = None if predictions_b is None else _numpy(predictions_b)[order]
    _, probs_b, predictions_b = as_arrays(labels, probs_b, predictions_b)
    correct_a, correct_b = predictions_a == labels, predictions_b == labels
    indices = stratified_indices(labels, n_resamples, seed)
    resampled = correct_a[indices].mean(axis=1) - correct_b[indices].mean(axis=1)
    diff = correct_a.mean() - correct_b.mean()
    auc = None
    if probs_a.shape[1] == probs_b.shape[1] == 2 and np.unique(labels).size == 2:
        auc = delong(labels, probs_a[:, 1], probs_b[:, 1])
        auc["difference"] = auc["auc_a"] - auc["auc_b"]
    return {
        "n": int(labels.shape[0]),
        "accuracy_a": float(correct_a.mean()),
        "accuracy_b": float(correct_b.mean()),
        "accuracy_difference": percentile_interval(diff, resampled, confidence),
        "mcnemar": mcnemar(correct_a, correct_b),
        "auroc": auc,
    }


# ---------------------------------------------------------------- tables
def format_cell(summary: dict, metric: str = "accuracy") -> str:
    """A table cell: "mean ± sd [low, high]" of a t_interval, "estimate [low, high]" of a bootstrap.

    Accuracy and macro F1 (and their differences) in % with one decimal, "82.3 ± 1.2 [79.4, 85.2]";
    AUROC, ECE and the rest as fractions with three, "0.912 ± 0.004 [0.905, 0.919]". One seed (NaN sd)
    gives the mean alone.
    """
    scale, digits = (100.0, 1) if metric.removesuffix("_difference") in PERCENT_METRICS else (1.0, 3)
    keys = ("mean" if "mean" in summary else "estimate", "sd", "low", "high")
    centre, sd, low, high = (f"{summary.get(k, np.nan) * scale:.{digits}f}" for k in keys)
    if "sd" not in summary:
        return f"{centre} [{low}, {high}]"
    return centre if np.isnan(summary["sd"]) else f"{centre} ± {sd} [{low}, {high}]"
