"""Whole-set shift checks (decisions/set_shift.py): at most their stated level on sets exchangeable with the
validation images, over 600 random splits; at least 90 % power on 100-image sets shifted in each of the ways a
second hospital shifts them (more typical scores, another class mix, more confident votes); the two-sided score
test against scipy's Mann-Whitney."""

import numpy as np
import pytest
import torch
from scipy import stats

from decisions.referral_and_sets import binomial_cdf
from decisions.refusal import shift_test
from decisions.set_shift import hotelling_test, reference_outputs, set_shift, shift_message

CLASSES = ["normal", "pneumonia"]
N_STEPS = 21  # vote fractions take the values k / 21, with ties, as a diffusion classifier's do
REFERENCE, CALIBRATION_HALF, SET = 200, 100, 100
BAND_MIXING = [[1.0, 0.5, 0.2, 0.0], [0.0, 1.0, 0.5, 0.2], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 1.0]]


def outputs(rng: np.random.Generator, n: int, positive: float = 0.5, confidence: float = 1.0, typical: float = 0.0,
            offset: float = 0.0):  # fmt: skip
    """n images' vote fractions, predictions, typicality-like scores and error-profile band offsets: the label mix
    `positive`, votes drawn around the label with a Beta whose sharpness grows with `confidence`, scores
    chi-square-like, lowered by `typical` standard deviations for a set that looks more typical than the validation
    images, and 4 correlated band offsets (a few noisy steps each), the first moved by `offset`."""
    labels = rng.random(n) < positive
    share = rng.beta(4.0 * confidence, 2.0, n)  # the true class's share of the votes
    votes = np.round(np.where(labels, share, 1.0 - share) * N_STEPS) / N_STEPS
    probs = torch.tensor(np.stack([1.0 - votes, votes], axis=1))
    scores = rng.chisquare(8, n) / 8 - typical * np.sqrt(2 / 8)
    bands = rng.normal(size=(n, 4)) @ np.array(BAND_MIXING) * 0.6 + np.array([offset, 0.0, 0.0, 0.0])
    return {"probs": probs, "prediction": (probs[:, 1] > 0.5).long(), "bands": bands}, torch.tensor(scores)


def fire_rate(sets: int, level: float, seed: int, **shift) -> float:
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(sets):
        reference, _ = outputs(rng, REFERENCE)
        calibration, calibration_scores = outputs(rng, CALIBRATION_HALF)
        shifted, scores = outputs(rng, SET, **shift)
        block = set_shift(reference_outputs(reference), calibration_scores, shifted, scores, level, CLASSES,
                          calibration["bands"], shifted["bands"])  # fmt: skip
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
        {"offset": 0.5},  # one t-band of the errors moved by 0.7 of its spread over images: another processing curve
    ],
    ids=["more_typical", "class_mix", "confident_votes", "error_profile"],
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


def test_hotellings_test_is_the_pooled_t_test_squared_in_one_dimension_and_sees_a_mean_shift():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(80, 1)), rng.normal(0.3, size=(60, 1))
    assert hotelling_test(a, b)["pvalue"] == pytest.approx(stats.ttest_ind(a[:, 0], b[:, 0]).pvalue, rel=1e-9)
    many = rng.normal(size=(100, 4))
    assert hotelling_test(many, rng.normal(size=(100, 4)) + [1.0, 0, 0, 0])["pvalue"] < 1e-6
