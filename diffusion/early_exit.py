"""Early exit and cheaper step schedules for the diffusion classifier (paper sec. 2.3, Appendix A).

An image's N steps are evaluated in chunks; after each chunk the running vote counts (B, C) are
known. These functions decide, per image, whether more steps can still change the prediction:

- "exact": stop once the majority-vote prediction over all N steps is certain whatever the
  remaining votes are. The prediction is identical to evaluating all N steps (the per-step seeding
  of `noise.py` makes a step's votes independent of when or whether later steps run).
- "sequential": stop once a sign test says the leader beats the runner-up at level alpha. Cheaper,
  but the prediction may differ from the full-N one.
- "none": always run all N steps.

Tie rule, as in `voting.py`: a tie in vote counts goes to the lowest class index.
Also here: stratified t (lower-variance estimate per step budget) and Li et al.'s class pruning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .noise import step_seed  # not from .classify: classify imports this module

EXIT_RULES = ("none", "exact", "sequential")

# step_seed(seed, id, k) seeds step k's (eps, t) for k >= 0; k = -1 never names a real step, so the
# stratification permutation gets a stream of its own that no step's noise draw shares.
STRATA_STEP = -1


def _leader(counts: Tensor) -> Tensor:
    """(B, C) -> (B,): first index of the maximum, the rule `voting.majority_vote` applies."""
    best = counts.max(dim=1, keepdim=True).values
    index = torch.arange(counts.shape[1], device=counts.device).expand_as(counts)
    return torch.where(counts == best, index, counts.shape[1]).min(dim=1).values


def exact_decided(counts: Tensor, steps_done: int | Tensor, total_steps: int) -> Tensor:
    """(B, C) vote counts -> (B,) bool: is the majority vote over all `total_steps` already fixed?

    With r = total_steps - steps_done votes to come and L the current leader (lowest index among
    the max counts), a class c can take the prediction from L only by ending with more votes than
    L, or as many votes and a lower index. Its best case is all r votes (L gets none), so L is the
    final prediction for every completion iff, for every c != L,
        counts[L] > counts[c] + r,   or   counts[L] == counts[c] + r and L < c.
    Conversely, if some c fails this, the completion giving c all r votes makes c win, so the
    test is exact, not merely sufficient. `steps_done` may be an int or a (B,) tensor.
    """
    remaining = total_steps - torch.as_tensor(steps_done, device=counts.device)
    if (remaining < 0).any():
        raise ValueError(f"steps_done exceeds total_steps={total_steps}")
    leader = _leader(counts)[:, None]
    lead = counts.gather(1, leader)
    reach = counts + remaining.reshape(-1, 1)  # each class's best possible final count
    index = torch.arange(counts.shape[1], device=counts.device)
    safe = (lead > reach) | ((lead == reach) & (leader < index)) | (index == leader)
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


def sequential_decided(counts: Tensor, alpha: float, min_steps: int = 10) -> Tensor:
    """(B, C) vote counts -> (B,) bool: does a sign test put the leader ahead at level alpha?

    L is the leader and R the runner-up (both lowest index on ties). Among the n = counts[L] +
    counts[R] steps won by either, H0 says each was a fair coin between them; k = counts[L]. Stop
    when the one-sided p-value P(X >= k | X ~ Bin(n, 1/2)) <= alpha and at least `min_steps`
    steps (counts.sum(1)) are done. Steps won by other classes are left out, which is what makes
    the coin fair under H0; with C = 2 nothing is left out.

    Caveat: testing after every chunk is a sequential test with no multiplicity correction (no
    alpha spending), so the chance of stopping on the wrong leader is above alpha, growing with
    the number of looks. The paper's cap of N steps bounds the number of looks, and min_steps
    keeps the first, least reliable looks out. If the error rate matters, use "exact".
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    leader = _leader(counts)
    others = counts.scatter(1, leader[:, None], -1)  # hide the leader; C = 1 leaves no runner-up
    k = counts.gather(1, leader[:, None]).squeeze(1)
    n = k + others.max(dim=1).values.clamp(min=0)
    p_value = binomial_upper_tail(k, n)
    return (p_value <= alpha) & (counts.sum(dim=1) >= min_steps)


def stratified_times(seed: int, sample_id: int, num_steps: int) -> Tensor:
    """(num_steps,) float64 t in [0, 1): step k draws from stratum perm[k] of num_steps equal ones.

    t_k = (perm[k] + u_k) / num_steps, perm a random permutation and u_k ~ U[0, 1), both from a
    generator seeded by step_seed(seed, sample_id, STRATA_STEP): deterministic per image, and a
    different order per image so that an early exit after a prefix of steps still sees t spread
    over [0, 1) rather than, say, only small t. Every stratum is hit once over all num_steps.
    float64 so that floor(t * num_steps) == perm exactly; a cast to float32 can move t by one ulp,
    possibly across a stratum edge, which does not matter to the estimate.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    generator = torch.Generator().manual_seed(step_seed(seed, sample_id, STRATA_STEP))
    perm = torch.randperm(num_steps, generator=generator).to(torch.float64)
    u = torch.rand(num_steps, generator=generator, dtype=torch.float64)
    t = (perm + u) / num_steps
    # u within an ulp of 1 can round t onto the next stratum (or t onto 1.0): about 2^-45 per step,
    # and then the stratum's midpoint keeps the one-per-stratum promise.
    return torch.where(torch.floor(t * num_steps) == perm, t, (perm + 0.5) / num_steps)


def prune_classes(errors_so_far: Tensor, keep: int) -> Tensor:
    """(B, C, n1) errors of a first stage -> (B, keep) class indices kept per image, ascending.

    Li et al.'s adaptive evaluation: after n1 steps, only the `keep` classes with the lowest mean
    error go on to the next stage. Ties go to the lowest class index (a stable sort of the means);
    a NaN mean sorts last, so a class whose errors blew up is pruned first. keep >= C keeps all.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    batch, num_classes = errors_so_far.shape[:2]
    if keep >= num_classes:
        return torch.arange(num_classes, device=errors_so_far.device).expand(batch, num_classes).clone()
    order = errors_so_far.mean(dim=2).sort(dim=1, stable=True).indices
    return order[:, :keep].sort(dim=1).values
