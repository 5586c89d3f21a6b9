"""The diffusion classifier's error matrix (paper sec. 2.2, eq. 4, Appendix A).

For each image, N (eps, t) pairs are drawn (noise.py) and shared by every class; the image is noised once per
pair and denoised once per class, all classes in one batched forward of C*B inputs. The result
is an error matrix (B, C, N) that `voting.py` turns into a class.
Optional early exit and class pruning (early_exit.py) skip steps that cannot change the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .early_exit import EXIT_RULES, exact_decided, prune_classes, sequential_decided, stratified_times
from .noise import shared_noise, step_seed  # noqa: F401  (step_seed: part of this module's interface)
from .parameterization import diffuse, eps_from_v, v_target, x_from_v
from .schedule import ShiftedCosineSchedule, broadcast_like
from .voting import RULES, vote_counts

ERROR_SPACES = ("eps", "x", "v")
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z, t, labels) -> v_hat

def reconstruction_error(v_hat: Tensor, z: Tensor, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, space: str) -> Tensor:
    """Per-sample mean squared error in eps space (paper Appendix A), x space or v space."""
    if space == "eps":
        prediction, target = eps_from_v(z, v_hat, alpha, sigma), eps
    elif space == "x":
        prediction, target = x_from_v(z, v_hat, alpha, sigma), x
    elif space == "v":
        prediction, target = v_hat, v_target(x, eps, alpha, sigma)
    else:
        raise ValueError(f"unknown error space {space!r}; choose one of {ERROR_SPACES}")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class ClassifierSettings:
    """How an image is classified; every field is a `model.init_args` option of the same name.

    Args:
        num_steps: N, the (eps, t) pairs per image (paper: 501).
        rule: "majority" (paper, Appendix A) or "mean" (Li et al.); ties go to the lowest class index.
        error_space: "eps" (paper), "x" or "v".
        seed: seed of the shared (eps, t) pairs; with the image id and the step it fixes them.
        stratified: draw t_k from stratum perm[k] of [0, 1) (one t per stratum, order shuffled
            per image) instead of uniformly: lower variance at small N.
        early_exit: "none"; "exact" (stop once no class can overtake the leader: the same
            majority-vote prediction as the full N); "sequential" (stop once a binomial test says
            the leader holds with confidence 1 - alpha).
        alpha: significance of the sequential test.
        min_steps: steps before the sequential test may stop an image.
        prune_after: with more than 2 classes, after this many steps keep only the `prune_keep`
            classes of lowest mean error (Li et al.'s adaptive evaluation); 0 never prunes.
        prune_keep: classes kept by pruning.
        max_forward_batch: most inputs per denoiser forward (bounds memory).
    """

    num_steps: int = 501
    rule: str = "majority"
    error_space: str = "eps"
    seed: int = 0
    stratified: bool = False
    early_exit: str = "none"
    alpha: float = 0.01
    min_steps: int = 10
    prune_after: int = 0
    prune_keep: int = 2
    max_forward_batch: int = 256

    def __post_init__(self):
        for name, value, allowed in (("rule", self.rule, RULES), ("error_space", self.error_space, ERROR_SPACES),
                                     ("early_exit", self.early_exit, EXIT_RULES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.num_steps < 1 or self.max_forward_batch < 1:
            raise ValueError(f"num_steps={self.num_steps} and max_forward_batch={self.max_forward_batch} must be >= 1")
        if self.early_exit != "none" and self.rule != "majority":
            raise ValueError(f"early_exit={self.early_exit!r} decides a majority vote; it needs rule='majority'")


def step_errors(
    denoiser: Denoiser, x: Tensor, ids: Tensor, steps: range, class_sets: Tensor, schedule: ShiftedCosineSchedule,
    settings: ClassifierSettings,
) -> Tensor:
    """Errors (B, K, S) of image b under class class_sets[b, k] at the S steps, all in batched forwards.

    Inputs are stacked image-major ((image, step), class), so a forward of `max_forward_batch`
    inputs holds every class of the same noised image side by side.
    """
    batch, kept = class_sets.shape
    t, eps = shared_noise(ids, steps, tuple(x.shape[1:]), settings.seed)
    if settings.stratified:
        t = torch.stack([stratified_times(settings.seed, int(i), settings.num_steps)[steps.start : steps.stop] for i in ids.tolist()])
    t, eps = t.to(x.device, x.dtype).flatten(), eps.to(x.device, x.dtype).flatten(0, 1)  # (B*S,), (B*S, ...)
    x_rep = x.repeat_interleave(len(steps), dim=0)
    alpha, sigma = (broadcast_like(value, x_rep) for value in schedule.alpha_sigma(t))
    z = diffuse(x_rep, eps, alpha, sigma)
    labels = class_sets.to(x.device).repeat_interleave(len(steps), dim=0).flatten()  # (B*S*K,)
    errors = []
    for start in range(0, labels.numel(), settings.max_forward_batch):
        rows = torch.arange(start, min(start + settings.max_forward_batch, labels.numel()), device=x.device)
        source = rows // kept  # the (image, step) pair each input row noises
        v_hat = denoiser(z[source], t[source], labels[rows])
        errors.append(reconstruction_error(v_hat, z[source], x_rep[source], eps[source], alpha[source], sigma[source], settings.error_space))
    return torch.cat(errors).view(batch, len(steps), kept).transpose(1, 2)


@torch.no_grad()
def classify_images(
    denoiser: Denoiser, x: Tensor, ids: Tensor, num_classes: int, schedule: ShiftedCosineSchedule, settings: ClassifierSettings
) -> dict[str, Tensor]:
    """Run the diffusion classifier on a batch of model inputs x (already wavelet-transformed).

    Returns `errors` (B, C, N), NaN where a step was not evaluated (early exit) and +inf for
    classes pruned away, so `voting.summarize` can take votes and means over it directly; and
    `forwards` (B,), the denoiser inputs each image used. Images still running all share the same
    step index, so a chunk of steps is one slice for all of them.
    """
    batch, total = x.shape[0], settings.num_steps
    errors = torch.full((batch, num_classes, total), float("nan"), device=x.device)
    class_sets = torch.arange(num_classes, device=x.device).expand(batch, -1).clone()
    forwards = torch.zeros(batch, dtype=torch.long, device=x.device)
    running = torch.ones(batch, dtype=torch.bool, device=x.device)
    prune_at = settings.prune_after if 0 < settings.prune_after < total and num_classes > settings.prune_keep else 0
    done = 0
    while done < total and running.any():
        index = running.nonzero().flatten()
        sets = class_sets[index]
        stop = min(done + max(1, settings.max_forward_batch // sets.numel()), total)
        if done < prune_at < stop:
            stop = prune_at  # the first stage ends exactly where pruning happens
        errors[index.unsqueeze(1), sets, done:stop] = step_errors(
            denoiser, x[index], ids[index], range(done, stop), sets, schedule, settings
        )
        forwards[index] += sets.numel() // len(index) * (stop - done)
        done = stop
        if done == prune_at:
            class_sets = prune_classes(errors[:, :, :done], settings.prune_keep).to(x.device)
            pruned = torch.ones(batch, num_classes, dtype=torch.bool, device=x.device).scatter(1, class_sets, False)
            errors[pruned] = float("inf")
        if settings.early_exit == "none" or done < prune_at:
            continue  # no exit before pruning: pruning could drop an exited image's leader
        counts = vote_counts(errors[index, :, :done])
        # a pruned class can win no more votes: keep it out of the "can anyone overtake?" check
        counts = counts.masked_fill(errors[index, :, 0].isinf(), -(total + 1))
        decided = (
            exact_decided(counts, done, total)
            if settings.early_exit == "exact"
            else sequential_decided(counts, settings.alpha, settings.min_steps)
        )
        running[index[decided]] = False
    return {"errors": errors, "forwards": forwards}


def error_matrix(
    denoiser: Denoiser,
    x: Tensor,
    ids: Tensor,
    num_classes: int,
    num_steps: int,
    schedule: ShiftedCosineSchedule,
    seed: int = 0,
    space: str = "eps",
    max_forward_batch: int = 256,
) -> Tensor:
    """The full (B, C, N) error matrix: every step, every class (no early exit, no pruning)."""
    settings = ClassifierSettings(num_steps=num_steps, error_space=space, seed=seed, max_forward_batch=max_forward_batch)
    return classify_images(denoiser, x, ids, num_classes, schedule, settings)["errors"]
