"""Whole-set shift checks (evaluation/set_shift.py): at most their stated level on sets exchangeable with the
validation images, over 600 random splits; at least 90 % power on 100-image sets shifted in each of the ways a
second hospital shifts them (more typical scores, another class mix, more confident votes); the two-sided score
test against scipy's Mann-Whitney."""

import numpy as np
import pytest
import torch
from scipy import stats

from evaluation.calibration import binomial_cdf
from evaluation.refusal import shift_test
from evaluation.set_shift import reference_outputs, set_shift, shift_message

CLASSES = ["normal", "pneumonia"]
N_STEPS = 21  # vote fractions take the values k / 21, with ties, as a diffusion classifier's do
REFERENCE, CALIBRATION_HALF, SET = 200, 100, 100


def outputs(rng: np.random.Generator, n: int, positive: float = 0.5, confidence: float = 1.0, typical: float = 0.0):
    """n images' vote fractions, predictions and typicality-like scores: the label mix `positive`, votes drawn
    around the label with a Beta whose sharpness grows with `confidence`, scores chi-square-like, lowered by
    `typical` standard deviations for a set that looks more typical than the validation images."""
    labels = rng.random(n) < positive
    share = rng.beta(4.0 * confidence, 2.0, n)  # the true class's share of the votes
    votes = np.round(np.where(labels, share, 1.0 - share) * N_STEPS) / N_STEPS
    probs = torch.tensor(np.stack([1.0 - votes, votes], axis=1))
    scores = rng.chisquare(8, n) / 8 - typical * np.sqrt(2 / 8)
    return {"probs": probs, "prediction": (probs[:, 1] > 0.5).long()}, torch.tensor(scores)


def fire_rate(sets: int, level: float, seed: int, **shift) -> float:
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(sets):
        reference, _ = outputs(rng, REFERENCE)
        _, calibration_scores = outputs(rng, CALIBRATION_HALF)
        shifted, scores = outputs(rng, SET, **shift)
        block = set_shift(reference_outputs(reference), calibration_scores, shifted, scores, level, CLASSES)
        fired += block["shifted"]
    return fired / sets


@pytest.mark.parametrize("level", [0.01, 0.05])
def test_exchangeable_sets_are_flagged_at_most_at_the_stated_level(level):
    sets = 600
    fired = round(fire_rate(sets, level, seed=int(level * 1000)) * sets)
    # Bonferroni keeps the chance of any flag at or below the level; more than this many flags out of 600 has
    # probability below 0.001 if it does
    limit = next(k for k in range(sets) if 1.0 - binomial_cdf(k, sets, level) < 1e-3)
    assert fired <= limit, f"{fired} of {sets} exchangeable sets flagged at level {level} (limit {limit})"


@pytest.mark.parametrize(
    "shift",
    [
        {"typical": 0.9},  # smoother images from elsewhere: scored *more* typical, the one-sided test's blind side
        {"positive": 0.85},  # another case mix: the predicted-class counts move
        {"confidence": 3.0},  # votes piled at the confident end (the pediatric set of issue 30)
    ],
    ids=["more_typical", "class_mix", "confident_votes"],
)
def test_shifted_sets_of_100_images_are_flagged_at_least_nine_times_in_ten(shift):
    assert fire_rate(200, 0.01, seed=7, **shift) >= 0.9


def test_the_score_test_is_two_sided_and_agrees_with_scipy():
    rng = np.random.default_rng(3)
    calibration = np.round(rng.normal(size=80), 1)  # rounded: ties, which the tie correction handles
    for offset in (-0.6, 0.0, 0.6):
        scores = np.round(rng.normal(offset, size=50), 1)
        ours = shift_test(calibration, scores, 0.01)
        theirs = stats.mannwhitneyu(
            scores, calibration, alternative="two-sided", method="asymptotic", use_continuity=False
        )
        assert ours["pvalue"] == pytest.approx(theirs.pvalue, rel=1e-9)
        greater = stats.mannwhitneyu(
            scores, calibration, alternative="greater", method="asymptotic", use_continuity=False
        )
        assert shift_test(calibration, scores, 0.01, "greater")["pvalue"] == pytest.approx(greater.pvalue, rel=1e-9)
    more_typical = shift_test(calibration, calibration[:50] - 1.0, 0.01)
    assert more_typical["shifted"] and more_typical["direction"] == "smaller"
    assert shift_test(calibration, calibration[:50] - 1.0, 0.01, "greater")["pvalue"] > 0.99


def test_the_warning_names_each_test_that_fired():
    rng = np.random.default_rng(0)
    reference, _ = outputs(rng, REFERENCE)
    _, calibration_scores = outputs(rng, CALIBRATION_HALF)
    shifted, scores = outputs(rng, SET, positive=0.95, typical=2.0)
    block = set_shift(reference_outputs(reference), calibration_scores, shifted, scores, 0.01, CLASSES)
    assert {"ood_score", "predicted_classes"} <= set(block["fired"])
    message = shift_message(block)
    assert "out-of-distribution scores smaller" in message and "predicted-class mix" in message
    assert block["correction"] == "Bonferroni over 3 tests" and block["per_test_level"] == pytest.approx(0.01 / 3)
