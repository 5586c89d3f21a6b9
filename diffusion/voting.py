"""From an error matrix to a class: majority vote (paper sec. 2.3, Appendix A) or mean error (ref. [10]).

`errors` has shape (B, C, N): image, class, (eps, t) step; lower is better. Two markers:
NaN = the step was not evaluated (early exit: the whole column is NaN), +inf = the class was
pruned away (its whole row is +inf). The engine (classify.py) raises on a NaN or inf coming out of
the network, so a marker here is never a broken forward.

This is the one place votes are counted: validation, test, predict, early exit and the benchmark
all call `vote_counts` / `summarize`.

Tie rule, everywhere: the lowest class index wins. A step whose errors tie votes for the lowest
tied class, and a tie in the vote count (or in the mean error) goes to the lowest tied class.
With two classes and an odd N, as in the paper's N = 501, vote-count ties cannot happen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RULES = ("majority", "mean")


def first_argmax(values: Tensor) -> Tensor:
    """(B, C) -> (B,): the index of the maximum, the lowest one on ties (torch.argmax does not
    promise the first index on every device)."""
    best = values.max(dim=1, keepdim=True).values
    index = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values == best, index, values.shape[1]).min(dim=1).values


def evaluated_steps(errors: Tensor) -> Tensor:
    """(B, C, N) -> (B, N) bool: the steps that were evaluated (not all-NaN)."""
    return ~errors.isnan().all(dim=1)


def vote_counts(errors: Tensor) -> Tensor:
    """(B, C, N) -> (B, C): the evaluated steps each class won (lowest error; ties to the lowest class).
    A pruned class (+inf) wins no step."""
    winners = errors.nan_to_num(nan=math.inf).argmin(dim=1)  # argmin returns the first minimum
    votes = torch.nn.functional.one_hot(winners, errors.shape[1]) * evaluated_steps(errors).unsqueeze(-1)
    return votes.sum(dim=1)


def vote_entropy(counts: Tensor, normalize: bool = False) -> Tensor:
    """Shannon entropy (nats) of the vote fractions: the paper's uncertainty (sec. 4.4).

    normalize=True divides by log(C), so 0 = unanimous and 1 = votes spread evenly.
    """
    fractions = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    entropy = -(fractions * torch.log(fractions.clamp(min=1e-12))).sum(dim=1) + 0.0  # + 0.0: no "-0" in files
    return entropy / math.log(counts.shape[1]) if normalize else entropy


def summarize(errors: Tensor, rule: str = "majority") -> dict[str, Tensor]:
    """Per-image outputs from an error matrix (see the module docstring for NaN and +inf).

    Returns prediction (by `rule`), majority_prediction and mean_error_prediction (both rules, for
    the paper's Fig. 2 ablation), votes (B, C), probs (vote fractions, rows sum to 1), entropy and
    entropy_normalized (of the vote fractions), mean_error (B, C) over the evaluated steps (+inf
    for a pruned class), steps (B,) evaluated, and score: the vote fraction of class 1 with two
    classes (the positive class, for ROC analysis), the winning vote fraction with more classes.
    """
    if rule not in RULES:
        raise ValueError(f"unknown classification rule {rule!r}; choose one of {RULES}")
    votes = vote_counts(errors)
    mean_error = errors.nanmean(dim=2)
    by_rule = {"majority": first_argmax(votes), "mean": first_argmax(-mean_error.nan_to_num(nan=math.inf))}
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
        "steps": evaluated_steps(errors).sum(dim=1),
        "score": probs[:, 1] if errors.shape[1] == 2 else probs.max(dim=1).values,
    }
