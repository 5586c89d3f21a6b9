"""From an error matrix to a class: majority vote (paper sec. 2.3, Appendix A) or mean error (ref. [10]).

`errors` has shape (B, C, N): image, class, (eps, t) step. Lower is better.

Tie rule, everywhere: the lowest class index wins. A step whose errors tie votes for the lowest
tied class (torch.argmin returns the first minimum), and a tie in the vote count (or in the mean
error) goes to the lowest tied class. With two classes and an odd N, as in the paper's N = 501,
vote-count ties cannot happen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RULES = ("majority", "mean")


def step_votes(errors: Tensor) -> Tensor:
    """(B, C, N) -> (B, N): the class with the lowest error at each step."""
    return errors.argmin(dim=1)


def vote_counts(errors: Tensor) -> Tensor:
    """(B, C, N) -> (B, C) number of steps each class won."""
    num_classes = errors.shape[1]
    return torch.nn.functional.one_hot(step_votes(errors), num_classes).sum(dim=1)


def _first_argmax(values: Tensor) -> Tensor:
    # torch.argmax does not promise the first index on ties on every device; make it explicit.
    best = values.max(dim=1, keepdim=True).values
    index = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values == best, index, values.shape[1]).min(dim=1).values


def majority_vote(errors: Tensor) -> Tensor:
    return _first_argmax(vote_counts(errors))


def mean_error_rule(errors: Tensor) -> Tensor:
    return _first_argmax(-errors.mean(dim=2))


def predict(errors: Tensor, rule: str = "majority") -> Tensor:
    if rule == "majority":
        return majority_vote(errors)
    if rule == "mean":
        return mean_error_rule(errors)
    raise ValueError(f"unknown classification rule {rule!r}; choose one of {RULES}")


def vote_entropy(counts: Tensor, normalize: bool = False) -> Tensor:
    """Shannon entropy (nats) of the vote fractions: the paper's uncertainty (sec. 4.4).

    normalize=True divides by log(C), so 0 = unanimous and 1 = votes spread evenly.
    """
    fractions = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    entropy = -(fractions * torch.log(fractions.clamp(min=1e-12))).sum(dim=1)
    return entropy / math.log(counts.shape[1]) if normalize else entropy



def summarize(errors: Tensor, rule: str = "majority") -> dict[str, Tensor]:
    """Per-image outputs from an error matrix that may hold NaN (steps skipped by early exit) and
    +inf (classes pruned away).

    Returns prediction (by `rule`), majority_prediction and mean_error_prediction (both rules, for
    the paper's Fig. 2 ablation), votes (B, C), probs (vote fractions, rows sum to 1), entropy and
    entropy_normalized (of the vote fractions), mean_error (B, C) over the evaluated steps, steps
    (B,) evaluated, and score: the vote fraction of class 1 with two classes (the positive class,
    for ROC analysis), the winning vote fraction with more classes.
    """
    if rule not in RULES:
        raise ValueError(f"unknown classification rule {rule!r}; choose one of {RULES}")
    evaluated = ~errors.isnan().all(dim=1)  # (B, N)
    winners = torch.nn.functional.one_hot(errors.nan_to_num(nan=float("inf")).argmin(dim=1), errors.shape[1])
    votes = (winners * evaluated.unsqueeze(-1)).sum(dim=1)  # (B, C)
    mean_error = errors.nanmean(dim=2)
    by_rule = {"majority": _first_argmax(votes), "mean": _first_argmax(-mean_error.nan_to_num(nan=float("inf")))}
    probs = votes.float() / votes.sum(dim=1, keepdim=True).clamp(min=1)
    return {
        "prediction": by_rule[rule],
        "majority_prediction": by_rule["majority"],
        "mean_error_prediction": by_rule["mean"],
        "votes": votes,
        "probs": probs,
        "entropy": vote_entropy(votes),
        "entropy_normalized": vote_entropy(votes, normalize=True),
        "mean_error": mean_error,
        "steps": evaluated.sum(dim=1),
        "score": probs[:, 1] if errors.shape[1] == 2 else probs.max(dim=1).values,
    }
