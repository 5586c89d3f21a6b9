"""Intervals and paired tests against second code paths, closed forms and simulations with known truth."""

from __future__ import annotations

import json
import math
import statistics as pystats

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from decisions.statistics import (
    METRICS,
    bootstrap_intervals,
    delong,
    format_cell,
    metric_values,
    paired_comparison,
    paired_differences,
    resample_metrics,
    stratified_indices,
    t_interval,
)
from decisions.uncertainty import auroc, expected_calibration_error


def binary_set(rng, n=200, n_pos=80, p_correct=0.8, ties=True):
    """labels with fixed class counts, predictions right with probability p_correct, and probs."""
    labels = np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n - n_pos, dtype=np.int64)]
    correct = rng.random(n) < p_correct
    predictions = np.where(correct, labels, 1 - labels)
    p1 = np.clip(0.5 + 0.25 * (2 * predictions - 1) + rng.normal(0, 0.15, n), 0, 1)
    if ties:
        p1 = np.round(p1 * 10) / 10  # vote fractions of 10 votes: many ties
    return labels, np.stack([1 - p1, p1], axis=1), predictions


def mann_whitney(scores, positives):
    """AUROC as the fraction of (positive, negative) pairs ordered correctly, ties 1/2: the O(n^2) form."""
    x, y = scores[positives], scores[~positives]
    return float(((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])).mean())


def macro_f1(labels, predictions, num_classes):
    f1 = []
    for c in range(num_classes):
        tp = np.sum((predictions == c) & (labels == c))
        fp, fn = np.sum((predictions == c) & (labels != c)), np.sum((predictions != c) & (labels == c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


# ---------------------------------------------------------------- metrics and the stratified bootstrap
def test_metric_values_against_references():
    rng = np.random.default_rng(1)
    labels, probs, predictions = binary_set(rng)
    values = metric_values(labels, probs, predictions)
    assert values["accuracy"] == np.mean(predictions == labels)
    assert values["macro_f1"] == pytest.approx(macro_f1(labels, predictions, 2), abs=1e-6)
    assert values["auroc"] == pytest.approx(mann_whitney(probs[:, 1], labels == 1), abs=1e-6)
    assert values["ece"] == pytest.approx(expected_calibration_error(torch.tensor(probs), torch.tensor(labels)))
    # predictions default to argmax(probs); torch tensors and a 1-D P(class 1) are accepted alike
    default = metric_values(labels, probs)
    assert default["accuracy"] == np.mean(probs.argmax(1) == labels)
    assert metric_values(torch.tensor(labels), torch.tensor(probs[:, 1])) == default


@pytest.mark.parametrize("num_classes", [2, 3])
def test_resample_metrics_equal_metric_values_on_each_resample(num_classes):
    rng = np.random.default_rng(num_classes)
    n = 120
    labels = rng.integers(0, num_classes, n)
    probs = rng.dirichlet(np.ones(num_classes), n)
    probs[np.arange(n), labels] += 0.4
    probs = np.round(probs / probs.sum(1, keepdims=True), 1)  # ties
    predictions = np.where(rng.random(n) < 0.2, rng.integers(0, num_classes, n), probs.argmax(1))
    indices = stratified_indices(labels, 20, seed=3)
    vectorised = resample_metrics(labels, probs, predictions, indices)
    for b, rows in enumerate(indices):
        one = metric_values(labels[rows], probs[rows], predictions[rows])
        for m in METRICS:
            assert vectorised[m][b] == pytest.approx(one[m], abs=1e-6), (m, b)
        assert vectorised["auroc"][b] != vectorised["auroc"][b - 1]  # the resamples differ


def test_stratified_resamples_keep_class_counts_and_seed():
    labels = np.random.default_rng(0).integers(0, 3, 97)
    indices = stratified_indices(labels, 500, seed=7)
    counts = np.bincount(labels, minlength=3)
    assert indices.shape == (500, 97)
    assert all((np.bincount(labels[rows], minlength=3) == counts).all() for rows in indices)
    assert len({tuple(rows) for rows in indices}) == 500  # with replacement, and a fresh draw per row
    assert (stratified_indices(labels, 500, seed=7) == indices).all()
    assert (stratified_indices(labels, 500, seed=8) != indices).any()


@pytest.mark.slow  # 12 s of resampling: make test-all
def test_bootstrap_interval_coverage_of_a_known_accuracy():
    # The true accuracy is p exactly: each image is right with probability p, the class counts fixed.
    rng, p = np.random.default_rng(2024), 0.777
    covered = []
    for k in range(1000):
        labels, probs, predictions = binary_set(rng, p_correct=p)
        interval = bootstrap_intervals(labels, probs, predictions, n_resamples=1000, seed=k)["accuracy"]
        covered.append(interval["low"] <= p <= interval["high"])
    coverage = np.mean(covered)
    print(f"bootstrap coverage of the accuracy at 95 %: {coverage:.3f}")
    assert 0.93 <= coverage <= 0.97


def test_bootstrap_intervals_shape_and_json():
    labels, probs, predictions = binary_set(np.random.default_rng(5), n=500, n_pos=150)
    result = bootstrap_intervals(labels, probs, predictions)
    assert set(result) == set(METRICS)
    estimates = metric_values(labels, probs, predictions)
    for m, interval in result.items():
        assert interval["estimate"] == estimates[m]
        assert interval["low"] <= interval["estimate"] <= interval["high"], m
    assert json.loads(json.dumps(result)) == result
    assert bootstrap_intervals(torch.tensor(labels), torch.tensor(probs), torch.tensor(predictions)) == result


# ---------------------------------------------------------------- DeLong
def placement_covariance(labels, scores_a, scores_b):
    """DeLong, DeLong and Clarke-Pearson (1988) as written: structural components from all n_pos * n_neg pairs."""
    positives = labels == 1
    v10, v01 = [], []
    for s in (scores_a, scores_b):
        x, y = s[positives], s[~positives]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        v10.append(psi.mean(axis=1))  # per positive
        v01.append(psi.mean(axis=0))  # per negative
    return np.cov(v10) / positives.sum() + np.cov(v01) / (~positives).sum()


@pytest.mark.parametrize("seed", range(5))
def test_delong_against_the_quadratic_placement_form(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    labels = (rng.random(n) < 0.4).astype(np.int64)
    labels[:2] = [0, 1]
    scores_a = np.round(labels + rng.normal(0, 1, n), 0)  # few distinct values: heavy ties
    scores_b = np.round(0.5 * labels + rng.normal(0, 1, n), 1)
    result = delong(labels, scores_a, scores_b)
    cov = placement_covariance(labels, scores_a, scores_b)
    assert result["var_a"] == pytest.approx(cov[0, 0], rel=1e-9)
    assert result["var_b"] == pytest.approx(cov[1, 1], rel=1e-9)
    assert result["covariance"] == pytest.approx(cov[0, 1], rel=1e-9, abs=1e-15)
    for key, scores in (("auc_a", scores_a), ("auc_b", scores_b)):
        assert result[key] == pytest.approx(mann_whitney(scores, labels == 1), abs=1e-12)
        assert result[key] == pytest.approx(auroc(torch.tensor(scores), torch.tensor(labels)), abs=1e-6)
    z = (result["auc_a"] - result["auc_b"]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert result["pvalue"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)


def test_delong_identical_scores():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    result = delong(labels, scores, scores)
    assert result["z"] == 0.0 and result["pvalue"] == 1.0
    assert result["var_a"] == result["var_b"] == pytest.approx(result["covariance"])


def test_delong_null_rejection_rate_near_its_level():
    # two correlated scores with the same AUROC by construction (same signal, noise of the same law)
    rng = np.random.default_rng(11)
    rejections = []
    for _ in range(400):
        labels = np.r_[np.ones(60, dtype=np.int64), np.zeros(90, dtype=np.int64)]
        shared = rng.normal(0, 1, 150)
        scores_a, scores_b = (labels + shared + rng.normal(0, 1, 150) for _ in range(2))
        rejections.append(delong(labels, scores_a, scores_b)["pvalue"] < 0.05)
    rate = np.mean(rejections)
    print(f"DeLong rejection rate under the null at 0.05: {rate:.3f}")
    assert 0.02 <= rate <= 0.08


# ---------------------------------------------------------------- McNemar and the paired comparison
def test_mcnemar_against_binomtest():
    rng = np.random.default_rng(3)
    labels, probs_a, predictions_a = binary_set(rng, p_correct=0.8)
    predictions_b = np.where(rng.random(200) < 0.15, 1 - predictions_a, predictions_a)
    result = paired_comparison(labels, probs_a, probs_a, predictions_a, predictions_b)["mcnemar"]
    pairs = [(int(a == y), int(b == y)) for a, b, y in zip(predictions_a, predictions_b, labels)]
    only_a, only_b = pairs.count((1, 0)), pairs.count((0, 1))
    assert (result["b10"], result["b01"]) == (only_a, only_b)
    assert result["pvalue"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)


def test_mcnemar_exact_p_by_hand():
    # 14 images: A right on 2 that B gets wrong, B right on 8 that A gets wrong, 4 concordant
    labels = np.array([0, 1] * 7)
    right_a = np.array([1, 1] + [0] * 8 + [1, 1, 0, 0], dtype=bool)
    right_b = np.array([0, 0] + [1] * 8 + [1, 1, 0, 0], dtype=bool)
    predictions_a, predictions_b = np.where(right_a, labels, 1 - labels), np.where(right_b, labels, 1 - labels)
    probs = np.full((14, 2), 0.5)
    result = paired_comparison(labels, probs, probs, predictions_a, predictions_b)
    assert result["mcnemar"]["b10"] == 2 and result["mcnemar"]["b01"] == 8
    # two-sided: outcomes as unlikely as 2 of 10 are 0, 1, 2, 8, 9, 10 successes
    by_hand = 2 * (math.comb(10, 0) + math.comb(10, 1) + math.comb(10, 2)) / 2**10
    assert result["mcnemar"]["pvalue"] == pytest.approx(by_hand, rel=1e-12)
    assert result["accuracy_difference"]["estimate"] == pytest.approx(-6 / 14)
    assert result["auroc"]["z"] == 0.0 and result["auroc"]["pvalue"] == 1.0  # the same probs for both
    # only one class among the labels: McNemar still, no AUROC
    one_class = paired_comparison(np.zeros(14, dtype=np.int64), probs, probs, 1 - right_a, 1 - right_b)
    assert one_class["mcnemar"] == result["mcnemar"] and one_class["auroc"] is None
    # no discordant pair: nothing to test, p = 1
    assert paired_comparison(labels, probs, probs, predictions_a, predictions_a)["mcnemar"]["pvalue"] == 1.0


def test_paired_comparison_refuses_different_images():
    labels, probs, predictions = binary_set(np.random.default_rng(4), n=20, n_pos=8)
    ids_a = list(range(20))
    ids_b = [i for i in ids_a if i not in (4, 9, 12)] + [77, 78, 79]
    ids_b = ids_b[:-2]  # 3 only in A, 1 only in B, and the lengths differ too
    with pytest.raises(ValueError) as error:
        paired_comparison(labels, probs, probs[:18], ids_a=ids_a, ids_b=ids_b)
    message = str(error.value)
    assert "\n" not in message
    assert message == "the runs tested different images: 3 ids only in A (e.g. [4, 9, 12]), 1 only in B (e.g. [77])"
    with pytest.raises(ValueError, match="unique"):
        paired_comparison(labels, probs, np.r_[probs, probs[:1]], ids_a=ids_a, ids_b=ids_a + [0])
    with pytest.raises(ValueError, match="both runs or of neither"):
        paired_comparison(labels, probs, probs, ids_a=ids_a)


def test_paired_comparison_aligns_ids_given_in_another_order():
    rng = np.random.default_rng(6)
    labels, probs_a, predictions_a = binary_set(rng, n=300, n_pos=120)
    _, probs_b, predictions_b = binary_set(rng, n=300, n_pos=120, p_correct=0.75)
    ids = np.array([f"patient{i:03d}/image.png" for i in range(300)])
    aligned = paired_comparison(labels, probs_a, probs_b, predictions_a, predictions_b, ids, ids, n_resamples=500)
    order = rng.permutation(300)
    shuffled = paired_comparison(
        labels, probs_a, probs_b[order], predictions_a, predictions_b[order], ids, ids[order], n_resamples=500
    )
    assert shuffled == aligned
    assert paired_comparison(labels, probs_a, probs_b, predictions_a, predictions_b, n_resamples=500) == aligned
    assert json.loads(json.dumps(aligned)) == aligned


def test_paired_bootstrap_uses_the_same_resamples_for_both_models():
    rng = np.random.default_rng(8)
    labels, probs_a, predictions_a = binary_set(rng)
    _, probs_b, predictions_b = binary_set(rng, p_correct=0.7)
    result = paired_comparison(labels, probs_a, probs_b, predictions_a, predictions_b, n_resamples=300, seed=5)
    indices = stratified_indices(labels, 300, seed=5)
    accuracy_a = resample_metrics(labels, probs_a, predictions_a, indices)["accuracy"]
    accuracy_b = resample_metrics(labels, probs_b, predictions_b, indices)["accuracy"]
    low, high = np.percentile(accuracy_a - accuracy_b, [2.5, 97.5])
    assert result["accuracy_difference"]["low"] == pytest.approx(low, abs=1e-12)
    assert result["accuracy_difference"]["high"] == pytest.approx(high, abs=1e-12)


def test_paired_accuracy_difference_coverage():
    # per image: both right, only A, only B, both wrong; accuracy A = 0.82, B = 0.75, difference 0.07 exactly
    rng, joint, truth = np.random.default_rng(99), [0.70, 0.12, 0.05, 0.13], 0.07
    labels = np.r_[np.ones(80, dtype=np.int64), np.zeros(120, dtype=np.int64)]
    probs = np.full((200, 2), 0.5)
    covered = []
    for k in range(500):
        outcome = rng.choice(4, size=200, p=joint)
        right_a, right_b = np.isin(outcome, (0, 1)), np.isin(outcome, (0, 2))
        predictions_a, predictions_b = np.where(right_a, labels, 1 - labels), np.where(right_b, labels, 1 - labels)
        result = paired_comparison(labels, probs, probs, predictions_a, predictions_b, n_resamples=1000, seed=k)
        covered.append(result["accuracy_difference"]["low"] <= truth <= result["accuracy_difference"]["high"])
    coverage = np.mean(covered)
    print(f"paired bootstrap coverage of the accuracy difference at 95 %: {coverage:.3f}")
    assert 0.92 <= coverage <= 0.98


# ---------------------------------------------------------------- seeds and folds, table cells
def test_t_interval_hand_formula():
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    result = t_interval(values)
    mean, sd = pystats.mean(values), pystats.stdev(values)
    half = 2.776445 * sd / math.sqrt(5)  # t_{0.975, 4} from a printed table
    assert result["n"] == 5
    assert result["mean"] == pytest.approx(mean) and result["sd"] == pytest.approx(sd)
    assert result["low"] == pytest.approx(mean - half, rel=1e-6) and result["high"] == pytest.approx(mean + half)
    assert t_interval(torch.tensor(values), confidence=0.90)["high"] == pytest.approx(mean + 2.131847 * sd / 5**0.5)
    one = t_interval([0.8])
    assert one["mean"] == 0.8 and one["n"] == 1 and all(math.isnan(one[k]) for k in ("sd", "low", "high"))
    with pytest.raises(ValueError):
        t_interval([])


def test_paired_differences_by_seed():
    a, b = [0.81, 0.84, 0.79, 0.86], [0.80, 0.80, 0.78, 0.83]
    result = paired_differences(a, b)
    differences = [x - y for x, y in zip(a, b)]
    assert result["differences"] == pytest.approx(differences)
    expected = t_interval(differences)
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    with pytest.raises(ValueError):
        paired_differences(a, b[:3])


def test_format_cell():
    summary = {"mean": 0.823, "sd": 0.012, "low": 0.794, "high": 0.852, "n": 5}
    assert format_cell(summary) == "82.3 ± 1.2 [79.4, 85.2]"
    assert format_cell(summary, "macro_f1") == "82.3 ± 1.2 [79.4, 85.2]"
    assert format_cell(summary, "auroc") == "0.823 ± 0.012 [0.794, 0.852]"
    assert format_cell({"estimate": 0.0412, "low": 0.031, "high": 0.0526}, "ece") == "0.041 [0.031, 0.053]"
    assert format_cell({"estimate": 0.07, "low": -0.01, "high": 0.15}, "accuracy_difference") == "7.0 [-1.0, 15.0]"
    assert format_cell(t_interval([0.8]), "accuracy") == "80.0"
