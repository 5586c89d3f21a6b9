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


def entropy(probs: Tensor, normalize: bool = False) -> Tensor:
    """Shannon entropy (nats) of each row of class probabilities: the paper's uncertainty (sec. 4.4) when
    they are vote fractions. normalize=True divides by log(C): 0 = certain, 1 = spread evenly."""
    probs = probs.float()
    value = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=1) + 0.0  # + 0.0: no "-0" in files
    return value / math.log(probs.shape[1]) if normalize else value


# ---- the vote rules: (errors (B, C, N), values per image D) -> class probabilities (B, C) -------------------
# One signature; the option value `classification.rule` is the function's name, and the outputs are keyed by
# it (`<rule>_prediction`, metrics.json's `<rule>_accuracy`). The prediction is the first argmax of the
# probabilities, so a rule's answer and its probabilities, entropy and score never disagree.


def majority(errors: Tensor, values_per_image: int) -> Tensor:
    """Majority vote (paper, Appendix A): the share of the evaluated steps each class won."""
    votes = vote_counts(errors)
    return votes.float() / votes.sum(dim=1, keepdim=True).clamp(min=1)


def mean(errors: Tensor, values_per_image: int) -> Tensor:
    """Mean error (Li et al. 2023, eq. 6): softmax over classes of minus the summed squared error, i.e. the
    per-value mean error over the evaluated steps times the D values of an image (their ELBO posterior)."""
    mean_error = errors.double().nanmean(dim=2).nan_to_num(nan=math.inf)
    return torch.softmax(-mean_error * values_per_image, dim=1).float()


VOTE_RULES = {"majority": majority, "mean": mean}


def summarize(errors: Tensor, rule: str = "majority", values_per_image: int = 1) -> dict[str, Tensor]:
    """Per-image outputs from an error matrix (see the module docstring for NaN and +inf).

    Returns prediction, probs (rows sum to 1), entropy and entropy_normalized (of probs), and score (the
    probability of class 1 with two classes, the positive class for ROC analysis; the winning one with
    more), all by `rule`; `<name>_prediction` of every rule in VOTE_RULES (the paper's Fig. 2 ablation
    on the same errors); votes (B, C), mean_error (B, C) over the evaluated steps (+inf for a pruned
    class) and steps (B,) evaluated. values_per_image: D = C x H x W of the input (the mean rule's scale).
    """
    if rule not in VOTE_RULES:
        raise ValueError(f"unknown classification rule {rule!r}; choose one of {list(VOTE_RULES)}")
    probs = {name: function(errors, values_per_image) for name, function in VOTE_RULES.items()}
    chosen = probs[rule]
    return {
        "prediction": first_argmax(chosen),
        **{f"{name}_prediction": first_argmax(p) for name, p in probs.items()},
        "votes": vote_counts(errors),
        "probs": chosen,
        "entropy": entropy(chosen),
        "entropy_normalized": entropy(chosen, normalize=True),
        "mean_error": errors.nanmean(dim=2),
        "steps": evaluated_steps(errors).sum(dim=1),
        "score": chosen[:, 1] if errors.shape[1] == 2 else chosen.max(dim=1).values,
    }
