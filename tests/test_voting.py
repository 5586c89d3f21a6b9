import math

import pytest
import torch

from diffusion.voting import majority_vote, mean_error_rule, predict, step_votes, vote_counts, vote_entropy


def hand_made_errors() -> torch.Tensor:
    """Image 0: class 1 wins 3 of 5 steps by a hair, class 0 wins 2 steps by a mile.
    Majority says 1 (3 votes), mean error says 0 (mean 1.2 vs 3.0).
    Image 1: unanimous for class 0."""
    return torch.tensor(
        [
            [[1.0, 1.0, 1.0, 1.0, 2.0], [0.9, 0.9, 0.9, 6.0, 6.3]],
            [[0.1, 0.2, 0.3, 0.4, 0.5], [1.1, 1.2, 1.3, 1.4, 1.5]],
        ]
    )


def test_majority_and_mean_disagree_on_a_case_built_for_it():
    errors = hand_made_errors()
    assert step_votes(errors).tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert vote_counts(errors).tolist() == [[2, 3], [5, 0]]
    assert majority_vote(errors).tolist() == [1, 0]
    assert mean_error_rule(errors).tolist() == [0, 0]
    assert predict(errors, "majority").tolist() == [1, 0]
    assert predict(errors, "mean").tolist() == [0, 0]


def test_three_classes_plurality():
    # steps won: class 2, 2, 0, 1, 2 -> class 2 has the plurality with 3 votes
    errors = torch.tensor([[[0.5, 0.5, 0.1, 0.9, 0.9], [0.9, 0.9, 0.9, 0.1, 0.9], [0.1, 0.1, 0.5, 0.5, 0.1]]])
    assert vote_counts(errors).tolist() == [[1, 1, 3]]
    assert majority_vote(errors).tolist() == [2]


def test_tie_rules_go_to_the_lowest_class_index():
    # a step whose errors tie votes for the lowest tied class
    assert step_votes(torch.tensor([[[1.0], [1.0], [2.0]]])).tolist() == [[0]]
    # a tie in vote counts: classes 1 and 2 both have two votes -> 1
    errors = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 5.0, 5.0], [5.0, 5.0, 1.0, 1.0]]])
    assert vote_counts(errors).tolist() == [[0, 2, 2]]
    assert majority_vote(errors).tolist() == [1]
    # a tie in mean error -> the lower class
    assert mean_error_rule(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])).tolist() == [0]


def test_vote_entropy_closed_forms():
    counts = torch.tensor([[10, 0], [5, 5], [3, 1], [2, 2]])
    expected = [0.0, math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2)]
    torch.testing.assert_close(vote_entropy(counts), torch.tensor(expected))
    torch.testing.assert_close(vote_entropy(counts, normalize=True), torch.tensor(expected) / math.log(2))
    assert vote_entropy(torch.tensor([[1, 1, 1]]), normalize=True).item() == pytest.approx(1.0)


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="majority"):
        predict(hand_made_errors(), "median")
