"""voting.summarize, the one path from an error matrix to per-image outputs, on hand-made errors:
NaN (step not evaluated), +inf (class pruned), ties, entropies and scores computed by hand."""

import math

import pytest
import torch

from diffusion import voting
from diffusion.voting import entropy, summarize, vote_counts

NAN, INF = float("nan"), float("inf")


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
    out = summarize(hand_made_errors())
    assert out["votes"].tolist() == [[2, 3], [5, 0]]
    assert out["prediction"].tolist() == out["majority_prediction"].tolist() == [1, 0]
    assert out["mean_prediction"].tolist() == [0, 0]
    assert summarize(hand_made_errors(), "mean")["prediction"].tolist() == [0, 0]
    torch.testing.assert_close(out["mean_error"], torch.tensor([[1.2, 3.0], [0.3, 1.3]]))
    torch.testing.assert_close(out["probs"], torch.tensor([[0.4, 0.6], [1.0, 0.0]]))
    h = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    torch.testing.assert_close(out["entropy"], torch.tensor([h, 0.0]))
    torch.testing.assert_close(out["entropy_normalized"], torch.tensor([h / math.log(2), 0.0]))
    torch.testing.assert_close(out["score"], torch.tensor([0.6, 0.0]))  # two classes: class 1's fraction
    assert out["steps"].tolist() == [5, 5]


def test_steps_not_evaluated_take_no_part():
    # image 0 stopped after 3 steps (early exit): the NaN columns neither vote nor enter the mean
    errors = torch.tensor(
        [
            [[1.0, 2.0, 1.0, NAN, NAN], [2.0, 1.0, 2.0, NAN, NAN]],
            [[5.0, 5.0, 5.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0, 9.0]],
        ]
    )
    out = summarize(errors)
    assert out["votes"].tolist() == [[2, 1], [1, 4]] and out["steps"].tolist() == [3, 5]
    torch.testing.assert_close(out["probs"][0], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(out["mean_error"][0], torch.tensor([4 / 3, 5 / 3]))
    assert out["prediction"].tolist() == [0, 1]


def test_a_pruned_class_wins_nothing_and_is_never_predicted():
    # class 0 had the lowest errors of all before it was pruned: +inf on every evaluated step
    errors = torch.tensor([[[INF, INF, INF, NAN], [1.0, 3.0, 1.0, NAN], [2.0, 2.0, 2.0, NAN], [3.0, 1.0, 3.0, NAN]]])
    out = summarize(errors)
    assert out["votes"].tolist() == [[0, 2, 0, 1]] and out["steps"].tolist() == [3]
    assert out["prediction"].tolist() == [1] and out["mean_prediction"].tolist() == [1]  # means 5/3, 2, 7/3
    assert out["mean_error"][0, 0] == INF and out["probs"][0, 0] == 0
    torch.testing.assert_close(out["score"], torch.tensor([2 / 3]))  # more than two classes: the winning fraction
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    torch.testing.assert_close(out["entropy_normalized"], torch.tensor([h / math.log(4)]))


def test_tie_rules_go_to_the_lowest_class_index():
    # a step whose errors tie votes for the lowest tied class
    assert vote_counts(torch.tensor([[[1.0], [1.0], [2.0]]])).tolist() == [[1, 0, 0]]
    # a tie in vote counts: classes 1 and 2 both have two votes -> 1
    errors = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 5.0, 5.0], [5.0, 5.0, 1.0, 1.0]]])
    out = summarize(errors)
    assert out["votes"].tolist() == [[0, 2, 2]] and out["prediction"].tolist() == [1]
    # a tie in mean error -> the lower class
    assert summarize(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]), "mean")["prediction"].tolist() == [0]


def test_three_classes_plurality():
    # steps won: class 2, 2, 0, 1, 2 -> class 2 has the plurality with 3 votes
    errors = torch.tensor([[[0.5, 0.5, 0.1, 0.9, 0.9], [0.9, 0.9, 0.9, 0.1, 0.9], [0.1, 0.1, 0.5, 0.5, 0.1]]])
    out = summarize(errors)
    assert out["votes"].tolist() == [[1, 1, 3]] and out["prediction"].tolist() == [2]
    torch.testing.assert_close(out["score"], torch.tensor([0.6]))


def test_vote_entropy_closed_forms():
    counts = torch.tensor([[10, 0], [5, 5], [3, 1], [2, 2]])
    expected = [0.0, math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2)]
    fractions = counts / counts.sum(dim=1, keepdim=True)
    torch.testing.assert_close(entropy(fractions), torch.tensor(expected))
    torch.testing.assert_close(entropy(fractions, normalize=True), torch.tensor(expected) / math.log(2))
    assert entropy(torch.full((1, 3), 1 / 3), normalize=True).item() == pytest.approx(1.0)


def test_the_mean_rule_gives_li_et_al_posterior_and_its_own_entropy_and_score():
    # mean errors 1.2 / 3.0 and 0.3 / 1.3 per value; D = 2 values per image: p(c) = softmax(-2 * mean error)
    out = summarize(hand_made_errors(), "mean", values_per_image=2)
    p0 = 1 / (1 + math.exp(-2 * 1.8)), 1 / (1 + math.exp(-2 * 1.0))
    torch.testing.assert_close(out["probs"], torch.tensor([[p0[0], 1 - p0[0]], [p0[1], 1 - p0[1]]]))
    assert out["prediction"].tolist() == [0, 0]  # the probabilities' argmax, unlike the majority's [1, 0]
    torch.testing.assert_close(out["score"], out["probs"][:, 1])
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in p0]
    torch.testing.assert_close(out["entropy"], torch.tensor(h))


def test_a_new_rule_is_one_function(monkeypatch):
    """Registered in VOTE_RULES, a rule is an option value, an output key and a metrics.json accuracy."""
    from diffusion.engine import ClassifierSettings
    from reports.results import test_metrics

    def last_step(errors, values_per_image):  # the class with the lowest error at the last evaluated step
        return voting.majority(errors[..., -1:], values_per_image)

    monkeypatch.setitem(voting.VOTE_RULES, "last_step", last_step)
    ClassifierSettings(num_steps=5, rule="last_step")  # accepted as an option value
    out = summarize(hand_made_errors(), "last_step")
    assert out["prediction"].tolist() == out["last_step_prediction"].tolist() == [0, 0]  # 2.0 < 6.3, 0.5 < 1.5
    metrics = test_metrics(out | {"label": torch.tensor([0, 1])}, 2)
    assert metrics["last_step_accuracy"] == metrics["accuracy"] == 0.5 and metrics["majority_accuracy"] == 0.0


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="majority"):
        summarize(hand_made_errors(), "median")
