"""Conformal refusal and the whole-set shift test (decisions/refusal.py): by hand, by exact enumeration,
and by simulation over many random calibration / test splits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from decisions.referral_and_sets import conformal_thresholds
from decisions.refusal import (
    apply_refusal,
    calibrate_refusal,
    conformal_pvalues,
    conformity_shift,
    detection_report,
    min_calibration_images,
    reference_half,
    refusal_threshold,
    shift_test,
)


def test_conformal_pvalues_by_hand_with_ties():
    calibration = [0.1, 0.4, 0.4, 0.9]
    # p = (1 + #{cal >= s}) / 5
    assert conformal_pvalues(calibration, [0.0, 0.4, 0.5, 0.9, 2.0]).tolist() == pytest.approx(
        [5 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5]
    )


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("n", [5, 19, 100, 101])
def test_the_refusal_threshold_agrees_with_the_p_values(alpha, n):
    calibration = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    probes = torch.cat([calibration, calibration + 1e-9, torch.tensor([-10.0, 10.0], dtype=torch.float64)])
    threshold = refusal_threshold(calibration, alpha)
    assert torch.equal(conformal_pvalues(calibration, probes) < alpha, probes > threshold)
    assert (threshold == math.inf) == (n < min_calibration_images(alpha))


def test_min_calibration_images():
    assert [min_calibration_images(a) for a in (0.01, 0.05, 0.1, 0.03)] == [100, 20, 10, 33]
    for alpha in (0.01, 0.05, 0.1, 0.03):  # with that many, the smallest p-value is just below alpha
        n = min_calibration_images(alpha)
        assert 1 / (n + 1) < alpha <= 1 / n


# ---------------------------------------------------------------- the guarantee, by simulation
SPLITS, N_CAL, N_TEST = 2000, 120, 60


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_false_refusals_stay_within_alpha_over_random_splits(alpha):
    """Exchangeable continuous scores: the refusal rate's mean over splits is exactly
    (ceil(alpha (n + 1)) - 1) / (n + 1) <= alpha; an off-by-one in the count (n instead of n + 1,
    > instead of >=) moves it by 1 / (n + 1), several standard errors."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(SPLITS, N_CAL + N_TEST, generator=g, dtype=torch.float64)
    refused = torch.stack([conformal_pvalues(s[:N_CAL], s[N_CAL:]) < alpha for s in scores]).double()
    mean, error = refused.mean(), refused.mean(dim=1).std() / math.sqrt(SPLITS)
    exact = (math.ceil(alpha * (N_CAL + 1) - 1e-9) - 1) / (N_CAL + 1)
    assert exact <= alpha and abs(float(mean) - exact) <= 4 * float(error), (float(mean), exact, float(error))


def synthetic_profiles(g, n: int, steps: int = 9, shift: float = 0.0) -> dict:
    """Error profiles whose log error falls with t as the diffusion model's does, plus noise."""
    t = torch.rand(n, steps, generator=g, dtype=torch.float64)
    log_error = -4.0 * t + 0.3 * torch.randn(n, steps, generator=g, dtype=torch.float64) + shift
    return {"step_errors": log_error.exp(), "step_times": t, "id": torch.randperm(10 * n, generator=g)[:n]}


def test_the_guarantee_holds_for_the_fitted_typicality_score():
    """The whole calibration path (reference half, time profile, calibration half) over random splits
    of exchangeable synthetic profiles: false refusals at most alpha on average."""
    g, alpha, rates = torch.Generator().manual_seed(2), 0.05, []
    for _ in range(300):
        validation, test = synthetic_profiles(g, 80), synthetic_profiles(g, 40)
        block = calibrate_refusal(validation, "typicality", alpha, 0.01, bins=4)
        assert block["n_reference"] == 40 and block["n_calibration"] == 40
        rates.append(float(apply_refusal(block, test)["out_of_distribution"].double().mean()))
    rates = torch.tensor(rates)
    exact = (math.ceil(alpha * 41 - 1e-9) - 1) / 41
    assert abs(float(rates.mean()) - exact) <= 4 * float(rates.std()) / math.sqrt(len(rates))
    # and images from elsewhere are refused
    shifted = apply_refusal(block, synthetic_profiles(g, 40, shift=1.5))
    assert shifted["out_of_distribution"].all() and (shifted["ood_pvalue"] == 1 / 41).all()


def test_reference_half_depends_on_the_ids_only():
    ids = torch.tensor([40, 3, 17, 8, 99, 23, 5])
    half = reference_half(ids)
    assert int(half.sum()) == 3
    shuffled = torch.tensor([2, 6, 0, 4, 1, 5, 3])
    assert torch.equal(reference_half(ids[shuffled]), half[shuffled])  # the same images, in another order
    many = torch.arange(50) * 7
    assert not torch.equal(reference_half(many, seed=1), reference_half(many))  # the seed decides, not the order


def test_too_few_calibration_images_is_said_not_hidden():
    g = torch.Generator().manual_seed(3)
    block = calibrate_refusal(synthetic_profiles(g, 30), "typicality", 0.01, 0.01, bins=4)
    assert not block["feasible"] and "ood_alpha=0.01 needs at least 100 calibration images, got 15" in block["reason"]
    assert not apply_refusal(block, synthetic_profiles(g, 10, shift=5.0))["out_of_distribution"].any()
    energy = {"energy": torch.randn(150, generator=g), "id": torch.arange(150)}
    block = calibrate_refusal(energy, "energy", 0.01, 0.01, bins=4)  # no profile: every image calibrates
    assert block["feasible"] and block["n_reference"] == 0 and block["n_calibration"] == 150


# ---------------------------------------------------------------- the whole-set test
def test_mann_whitney_u_counts_pairs_and_its_variance_is_the_exact_permutation_variance():
    calibration = torch.tensor([0.1, 0.4, 0.4, 0.9, 1.3], dtype=torch.float64)
    scores = torch.tensor([0.4, 0.95, 1.3, 2.0], dtype=torch.float64)
    pairs = sum(float(s > c) + 0.5 * float(s == c) for s in scores for c in calibration)
    result = shift_test(calibration, scores, level=0.05)
    assert result["u"] == pytest.approx(pairs)
    # every way to choose which 4 of the 9 values are "the images": the null distribution of U
    pooled, n, m = torch.cat([calibration, scores]), 5, 4
    us = []
    for chosen in itertools.combinations(range(9), m):
        inside = torch.zeros(9, dtype=torch.bool)
        inside[list(chosen)] = True
        us.append(sum(float(s > c) + 0.5 * float(s == c) for s in pooled[inside] for c in pooled[~inside]))
    us = torch.tensor(us, dtype=torch.float64)
    assert float(us.mean()) == pytest.approx(n * m / 2)
    z = (pairs - n * m / 2) / float(us.var(unbiased=False).sqrt())
    assert result["z"] == pytest.approx(z)
    assert result["pvalue"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))  # two-sided
    assert shift_test(calibration, scores, 0.05, "greater")["pvalue"] == pytest.approx(
        0.5 * math.erfc(z / math.sqrt(2))
    )
    assert result["mean_pvalue"] == pytest.approx(float(conformal_pvalues(calibration, scores).mean()))


def test_the_shift_test_rejects_at_most_its_level_under_exchangeability_and_catches_a_shift():
    g, level = torch.Generator().manual_seed(4), 0.05
    rejected = []
    for _ in range(1000):
        values = torch.randn(200, generator=g, dtype=torch.float64)
        rejected.append(shift_test(values[:100], values[100:], level)["shifted"])
    rate = sum(rejected) / len(rejected)
    assert rate <= level + 3 * math.sqrt(level * (1 - level) / len(rejected)), rate
    calibration = torch.randn(100, generator=g, dtype=torch.float64)
    assert shift_test(calibration, torch.randn(100, generator=g, dtype=torch.float64) + 0.8, level)["shifted"]


def test_detection_report_by_hand():
    inside, outside = [0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.6, 0.7]
    # pairs (out > in): 0.25 beats 2 of 4, the others all 4: 14 / 16
    report = detection_report(inside, outside)
    assert report["auroc"] == pytest.approx(14 / 16)
    # 95 % of the shifted images flagged: threshold at the lowest, 0.25; in-distribution >= 0.25: 0.3, 0.4
    assert report["fpr_at_95_tpr"] == pytest.approx(0.5)


@pytest.mark.parametrize("class_conditional", [False, True])
def test_the_conformity_check_holds_its_level_and_sees_a_change_of_labels(class_conditional):
    """A calibrated 3-class model (labels drawn from its probabilities): test sets exchangeable with the
    calibration set are flagged at most at the level; relabelling a third of one class's test images
    (what changes on a test split collected elsewhere, while the images look the same) is flagged."""
    g, level, flagged = torch.Generator().manual_seed(5), 0.05, []
    for _ in range(400):
        probs = torch.softmax(2.0 * torch.randn(300, 3, generator=g, dtype=torch.float64), -1)
        labels = torch.multinomial(probs, 1, generator=g)[:, 0]
        thresholds = conformal_thresholds(probs[:150], labels[:150], 0.1, class_conditional, 3)
        flagged.append(conformity_shift(thresholds, probs[150:], labels[150:], level)["shifted"])
    rate = sum(flagged) / len(flagged)
    assert rate <= level + 3 * math.sqrt(level * (1 - level) / len(flagged)), rate
    moved = labels[150:].clone()
    zeros = (moved == 0).nonzero()[:, 0]
    moved[zeros[: len(zeros) // 3]] = 1
    shifted = conformity_shift(thresholds, probs[150:], moved, level)
    assert shifted["shifted"]
