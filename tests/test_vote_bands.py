"""tools/vote_bands.py: per t-band vote accuracy, error gap and band accuracy against numbers worked out by hand."""

import pytest
import torch

from tools.vote_bands import band_table


def test_band_numbers_match_a_hand_count():
    # two images (labels 0 and 1), two classes, four steps: two in [0, 0.5), two in [0.5, 1]
    times = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.3, 0.4, 0.7, 1.0]])
    errors = torch.tensor(
        [
            [
                [1.0, 1.0, 1.0, 3.0],
                [2.0, 3.0, 0.5, 1.0],
            ],  # image 0: low band class 0 wins twice; high band class 1 twice
            [[2.0, 1.0, 4.0, 4.0], [1.0, 2.0, 1.0, 2.0]],  # image 1: low band one win each; high band class 1 twice
        ]
    )
    labels = torch.tensor([0, 1])
    low, high = band_table(errors, times, labels, bands=2)
    assert (low["steps"], high["steps"]) == (4, 4)
    assert low["vote_accuracy"] == pytest.approx(3 / 4) and high["vote_accuracy"] == pytest.approx(2 / 4)
    # gap per image = mean over the band's steps of (other - true) / true
    gap_low = ((1 / 1 + 2 / 1) / 2 + ((2 - 1) / 1 + (1 - 2) / 2) / 2) / 2
    gap_high = (((0.5 - 1) / 1 + (1 - 3) / 3) / 2 + ((4 - 1) / 1 + (4 - 2) / 2) / 2) / 2
    assert low["error_gap"] == pytest.approx(gap_low) and high["error_gap"] == pytest.approx(gap_high)
    # band majority votes: low band image 0 -> 0 (right), image 1 a 1 : 1 tie -> class 0 (wrong); high: 1, 1
    assert low["band_accuracy"] == pytest.approx(1 / 2) and high["band_accuracy"] == pytest.approx(1 / 2)
