"""Out-of-distribution scores (decisions/ood_scores.py) against hand computations and second code paths."""

from __future__ import annotations

import math

import pytest
import torch

from decisions.ood_scores import TimeProfile, ood_score
from diffusion.engine import ClassifierSettings, classify_images, step_profile, step_times
from diffusion.schedule import ShiftedCosineSchedule

NAN, INF = float("nan"), float("inf")


def test_step_profile_takes_the_lowest_class_and_keeps_skipped_steps_skipped():
    errors = torch.tensor([[[0.3, NAN, 0.2], [0.1, NAN, 0.5], [INF, NAN, INF]]])  # class 2 pruned, step 1 skipped
    assert step_profile(errors)[0, 0] == pytest.approx(0.1) and step_profile(errors)[0, 2] == pytest.approx(0.2)
    assert step_profile(errors)[0, 1].isnan()


def test_time_profile_by_hand():
    # bins over [0, 1] seen from t = 0 and t = 1: two bins, [0, 0.5) and [0.5, 1]
    errors = torch.tensor([[math.e, math.e**3, NAN], [math.e**2, math.e**5, math.e**7]])
    times = torch.tensor([[0.0, 0.6, 0.3], [0.2, 1.0, 0.9]])
    profile = TimeProfile.fit(errors, times, bins=2)
    assert (profile.low, profile.high) == (0.0, 1.0)
    # bin 0: log errors 1, 2 (the NaN step is not a point); bin 1: 3, 5, 7
    assert profile.mean == pytest.approx([1.5, 5.0]) and profile.std == pytest.approx([math.sqrt(0.5), 2.0])
    z = profile.z(torch.tensor([[math.e**4, math.e**9]]), torch.tensor([[0.1, 0.75]]))
    assert z[0].tolist() == pytest.approx([(4 - 1.5) / math.sqrt(0.5), (9 - 5) / 2])
    outputs = {
        "step_errors": torch.tensor([[math.e**4, math.e**9, NAN]]),
        "step_times": torch.tensor([[0.1, 0.75, 0.2]]),
    }
    expected = [(4 - 1.5) / math.sqrt(0.5), 2.0]
    assert ood_score("typicality", outputs, profile).item() == pytest.approx((expected[0] ** 2 + 4.0) / 2)
    assert ood_score("excess_error", outputs, profile).item() == pytest.approx(sum(expected) / 2)
    assert ood_score("best_error", outputs).item() == pytest.approx((math.e**4 + math.e**9) / 2)


def test_a_bin_without_points_borrows_from_the_nearest_and_edges_clamp():
    times = torch.tensor([[0.0, 0.05, 0.95, 1.0, 0.97]])
    errors = torch.tensor([[1.0, math.e**2, math.e, math.e**3, math.e**2]])
    profile = TimeProfile.fit(errors, times, bins=4)  # bins 1 and 2 are empty
    assert profile.mean == pytest.approx([1.0, 1.0, 2.0, 2.0]) and profile.std[1] == profile.std[0]
    assert profile.bin_of(torch.tensor([-0.5, 0.0, 0.26, 0.99, 2.0])).tolist() == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError, match="no bin of the time profile has 2 points"):
        TimeProfile.fit(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), bins=2)


def test_baseline_scores_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    outputs = {"probs": probs, "entropy": torch.tensor([0.3, 0.7]), "energy": torch.tensor([-4.0, -1.0])}
    assert ood_score("msp", outputs).tolist() == pytest.approx([0.1, 0.5])
    assert ood_score("energy", outputs).tolist() == [-4.0, -1.0]
    assert ood_score("entropy", outputs).tolist() == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError, match="needs a time profile"):
        ood_score("typicality", outputs)
    with pytest.raises(ValueError, match="unknown out-of-distribution score"):
        ood_score("likelihood", outputs)


@pytest.mark.parametrize("settings", [ClassifierSettings(num_steps=7), ClassifierSettings(num_steps=7, stratified=True,
                                      t_range=(0.2, 0.7), seed=3)])  # fmt: skip
def test_step_times_are_the_times_the_engine_drew(settings):
    seen = []

    def recording(z, t, labels):  # the pairs of an image sit side by side, one per class
        seen.append(t[::2].clone())
        return torch.zeros_like(z)

    ids = torch.tensor([5, 11, 2])
    classify_images(recording, torch.zeros(3, 4, 8, 8), ids, 2, ShiftedCosineSchedule(8), settings)
    assert torch.equal(torch.cat(seen).view(3, 7), step_times(ids, settings))
