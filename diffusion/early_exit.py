"""Early exit and class pruning for the diffusion classifier (paper sec. 2.3, Appendix A; Li et al.).

An image's N steps are evaluated segment by segment (classify.py); at the decision points, step
indices fixed by the settings alone, the image's vote counts (B, C) are known. These functions
decide, per image, whether more steps can still change the prediction:

- "exact": stop once the majority-vote prediction over all N steps is certain whatever the
  remaining votes are. The prediction is identical to evaluating all N steps (a step's pair
  depends on (seed, id, step) alone, so its vote does not depend on when or whether others run).
- "sequential": stop once a sign test says the leader beats the runner-up at level alpha. Cheaper,
  but the prediction may differ from the full-N one.
- "none": always run all N steps.

Pruning (more than `prune_keep` classes): after `prune_after` steps only the classes of lowest mean
error stay in the vote. `kept` (B, C) masks them; a pruned class can win no more votes, so it takes
no part in either exit test.

Tie rule, as in voting.py: a tie in vote counts goes to the lowest class index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .voting import first_argmax

EXIT_RULES = ("none", "exact", "sequential")


def _all_kept(counts: Tensor, kept: Tensor | None) -> Tensor:
    return torch.ones_like(counts, dtype=torch.bool) if kept is None else kept.to(counts.device)


def leader_among(counts: Tensor, kept: Tensor) -> Tensor:
    """(B, C) -> (B,): the kept class with the most votes, the lowest index on ties."""
    return first_argmax(counts.masked_fill(~kept, -1))


def exact_decided(counts: Tensor, steps_done: int | Tensor, total_steps: int, kept: Tensor | None = None) -> Tensor:
    """(B, C) vote counts -> (B,) bool: is the majority vote over all `total_steps` already fixed?

    With r = total_steps - steps_done votes to come and L the current leader (lowest index among
    the max counts of the kept classes), a kept class c can take the prediction from L only by
    ending with more votes than L, or as many votes and a lower index. Its best case is all r
    votes (L gets none), so L is the final prediction for every completion iff, for every kept
    c != L,
        counts[L] > counts[c] + r,   or   counts[L] == counts[c] + r and L < c.
    Conversely, if some c fails this, the completion giving c all r votes makes c win, so the
    test is exact, not merely sufficient. Classes outside `kept` (pruned) get no more votes and
    are left out. `steps_done` may be an int or a (B,) tensor.
    """
    kept = _all_kept(counts, kept)
    remaining = total_steps - torch.as_tensor(steps_done, device=counts.device)
    if (remaining < 0).any():
        raise ValueError(f"steps_done exceeds total_steps={total_steps}")
    leader = leader_among(counts, kept)[:, None]
    lead = counts.gather(1, leader)
    reach = counts + remaining.reshape(-1, 1)  # each class's best possible final count
    index = torch.arange(counts.shape[1], device=counts.device)
    safe = (lead > reach) | ((lead == reach) & (leader < index)) | (index == leader) | ~kept
    return safe.all(dim=1)


def binomial_upper_tail(k: Tensor, n: Tensor) -> Tensor:
    """P(X >= k) for X ~ Binomial(n, 1/2), elementwise, in float64.

    Summed in log space: log pmf(j) = lgamma(n+1) - lgamma(j+1) - lgamma(n-j+1) - n log 2, then
    logsumexp over j = k..n. Summing the tail itself (never 1 - lower tail) avoids cancellation,
    so tiny tails keep their relative accuracy; lgamma's rounding grows with n log n, which leaves
    a relative error of about 2e-14 at n = 60, 2e-13 at n = 501 and 2e-12 at n = 3001 (measured
    against math.comb sums). Tails below ~1e-308 underflow to 0, far beyond any useful alpha.
    Memory is (elements x (max n + 1)) doubles: fine for a batch and N up to a few thousand.
    """
    k, n = torch.broadcast_tensors(torch.as_tensor(k, dtype=torch.float64), torch.as_tensor(n, dtype=torch.float64))
    if (n < 0).any():
        raise ValueError("n must be non-negative")
    flat_k, flat_n = k.reshape(-1, 1), n.reshape(-1, 1)
    if flat_n.numel() == 0:
        return torch.empty_like(k)
    j = torch.arange(int(flat_n.max().item()) + 1, dtype=torch.float64, device=n.device)
    log_pmf = torch.lgamma(flat_n + 1) - torch.lgamma(j + 1) - torch.lgamma(flat_n - j + 1) - flat_n * math.log(2)
    log_pmf = torch.where((j >= flat_k) & (j <= flat_n), log_pmf, -math.inf)  # lgamma(<=0) is inf: mask
    tail = torch.logsumexp(log_pmf, dim=1).exp()  # an empty tail (k > n) gives exp(-inf) = 0
    tail = torch.where(flat_k.squeeze(1) <= 0, 1.0, tail)  # whole distribution: exactly 1, not 1 +- ulp
    return tail.reshape(k.shape)


def sequential_decided(counts: Tensor, alpha: float, min_steps: int = 10, kept: Tensor | None = None) -> Tensor:
    """(B, C) vote counts -> (B,) bool: does a sign test put the leader ahead at level alpha?

    L is the leader and R the runner-up among the kept classes (both lowest index on ties). Among
    the n = counts[L] + counts[R] steps won by either, H0 says each was a fair coin between them;
    k = counts[L]. Stop when the one-sided p-value P(X >= k | X ~ Bin(n, 1/2)) <= alpha and at
    least `min_steps` steps (counts.sum(1)) are done. Steps won by other classes are left out,
    which is what makes the coin fair under H0; with C = 2 nothing is left out.

    Caveat: testing at every decision point is a sequential test with no multiplicity correction
    (no alpha spending), so the chance of stopping on the wrong leader is above alpha, growing
    with the number of looks. The cap of N steps bounds the number of looks, and min_steps and
    check_every keep the first, least reliable looks few. If the error rate matters, use "exact".
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    kept = _all_kept(counts, kept)
    leader = leader_among(counts, kept)
    others = counts.masked_fill(~kept, -1).scatter(1, leader[:, None], -1)  # one kept class leaves no runner-up
    k = counts.gather(1, leader[:, None]).squeeze(1)
    n = k + others.max(dim=1).values.clamp(min=0)
    p_value = binomial_upper_tail(k, n)
    return (p_value <= alpha) & (counts.sum(dim=1) >= min_steps)


def prune_classes(errors_so_far: Tensor, keep: int) -> Tensor:
    """(B, C, n1) errors of a first stage -> (B, C) bool mask of the `keep` classes kept per image.

    Li et al.'s adaptive evaluation: after n1 steps, only the `keep` classes with the lowest mean
    error go on to the next stage. Ties go to the lowest class index (a stable sort of the means).
    keep >= C keeps all.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    batch, num_classes = errors_so_far.shape[:2]
    order = errors_so_far.mean(dim=2).sort(dim=1, stable=True).indices[:, : min(keep, num_classes)]
    return torch.zeros(batch, num_classes, dtype=torch.bool, device=errors_so_far.device).scatter(1, order, True)
