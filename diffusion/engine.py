"""The diffusion classifier's error matrix (paper sec. 2.2, eq. 4, Appendix A).

For each image, N (eps, t) pairs are drawn (noise.py) and shared by every class; the image is
noised once per pair and denoised once per class, the classes side by side in batched forwards.
The result is an error matrix (B, C, N) that voting.py turns into a class.

Early exit and pruning (early_exit.py) are decided only at step indices fixed by the settings
(`decision_points`: multiples of `check_every`, from the pruning step on), and the steps between
two of them are evaluated for every image still running. So an image's errors, votes, forwards
and prediction depend on (weights, settings, image, id) alone: not on the batch size, the other
images of the batch, the data order or the number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .early_exit import EXIT_RULES, exact_decided, prune_classes, sequential_decided
from .noise import normals, pair_keys, stratified_times, uniform_times
from .parameterization import diffuse, eps_from_v, v_target, x_from_v
from .schedule import broadcast_like
from .voting import VOTE_RULES, vote_counts

ERROR_SPACES = ("eps", "x", "v")
ERROR_NORMS = ("l2", "l1")
HAAR_BANDS = ("LL", "LH", "HL", "HH")  # diffusion/wavelet.py's band-major channel order
# Test-time views of the pixels (B, C, H, W), each classified with its own shared pairs (view_seed)
VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda images: images,
    "hflip": lambda images: images.flip(-1),
}
VIEW_SEED_STRIDE = 7919  # view j draws its (eps, t) pairs with seed + j * 7919: pairs of their own
VPredictor = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z, t, labels) -> v_hat: a network (networks.Denoiser) in use


class NonFiniteOutputError(FloatingPointError):
    """The denoiser returned NaN or inf; the message names the image id, the step and the class."""


def channel_weights(band_weights, channels: int, device=None) -> Tensor | None:
    """(channels,) weights of the wavelet input's channels from one weight per Haar band (LL, LH, HL, HH), each
    band's C channels alike (band-major layout, diffusion/wavelet.py), scaled to mean 1 so that equal weights give
    the plain mean; None for None."""
    if band_weights is None:
        return None
    if channels % len(HAAR_BANDS):
        raise ValueError(f"classification.band_weights needs Haar wavelet input (4C channels), got {channels} channels")
    weights = torch.tensor(band_weights, dtype=torch.float32, device=device).repeat_interleave(channels // 4)
    return weights / weights.mean()


def reconstruction_error(
    v_hat: Tensor,
    z: Tensor,
    x: Tensor,
    eps: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    space: str,
    norm: str = "l2",
    weights: Tensor | None = None,
) -> Tensor:
    """Mean squared (norm "l2", paper Appendix A) or absolute ("l1", Li et al.'s choice on some small data sets)
    error over each image's (C, H, W) in eps space (the paper's), x space or v space; `weights` (C,) weighs the
    channels (channel_weights: per Haar band). Leading dimensions broadcast, e.g. (P, K, ...) predictions against
    (P, 1, ...) targets."""
    if space == "eps":
        prediction, target = eps_from_v(z, v_hat, alpha, sigma), eps
    elif space == "x":
        prediction, target = x_from_v(z, v_hat, alpha, sigma), x
    elif space == "v":
        prediction, target = v_hat, v_target(x, eps, alpha, sigma)
    else:
        raise ValueError(f"unknown error space {space!r}; choose one of {ERROR_SPACES}")
    difference = prediction.float() - target.float()
    per_value = difference.pow_(2) if norm == "l2" else difference.abs_()
    if weights is None:
        return per_value.mean(dim=(-3, -2, -1))
    return (per_value.mean(dim=(-2, -1)) * weights).mean(dim=-1)


@dataclass
class ClassifierSettings:
    """How an image is classified; every field is a `model.init_args.classification` option."""

    num_steps: int = 501
    """N, the (eps, t) pairs per image (paper: 501)."""
    rule: str = "majority"
    """"majority" (paper, Appendix A) or "mean" (Li et al.); ties go to the lowest class index."""
    error_space: str = "eps"
    """"eps" (paper), "x" or "v"."""
    seed: int = 0
    """Seed of the shared (eps, t) pairs; with the image id and the step it fixes them."""
    stratified: bool = False
    """Draw t_k from one stratum of [0, 1) per step (order shuffled per image): lower variance at small N."""
    t_range: tuple[float, float] = (0.0, 1.0)
    """The interval t is drawn from (the paper: all of it); Li et al. and Clark & Jaini found the middle
    of the schedule the most informative for classification."""
    error_norm: str = "l2"
    """"l2", the squared error (paper), or "l1", the absolute error (Li et al. on some small data sets)."""
    band_weights: tuple[float, float, float, float] | None = None
    """Weights of the Haar bands (LL, LH, HL, HH) in the error (wavelet models only); null weighs every value alike
    (paper). E.g. [1, 0.5, 0.5, 0.5] lets the low-frequency band count twice as much as each detail band."""
    early_exit: str = "none"
    """"none"; "exact" (stop once no class can overtake the leader: the full-N majority vote, fewer
    forwards); "sequential" (stop once a binomial test puts the leader ahead at level alpha)."""
    alpha: float = 0.01
    """Significance of the sequential test."""
    min_steps: int = 10
    """Steps before the sequential test may stop an image."""
    check_every: int = 10
    """Steps between two early-exit decisions (at steps check_every, 2 check_every, ...). Smaller
    stops images sooner; larger gives fuller forward batches (GPUs: 25-50)."""
    prune_after: int = 0
    """With more than prune_keep classes, keep only the prune_keep classes of lowest mean error after
    this many steps (Li et al.'s adaptive evaluation); 0 never prunes. No exit before it."""
    prune_keep: int = 2
    """Classes kept by pruning."""
    views: tuple[str, ...] = ("identity",)
    """Test-time views (VIEWS: "identity", "hflip"), each with N pairs of its own; their errors are voted
    together (V x N steps, V x N x C forwards). The paper: the image alone. Equal forwards: halve num_steps."""
    max_forward_batch: int = 256
    """Most inputs per denoiser forward (bounds memory); any value gives the same results."""

    def __post_init__(self):
        for name, value, allowed in (
            ("rule", self.rule, tuple(VOTE_RULES)),
            ("error_space", self.error_space, ERROR_SPACES),
            ("error_norm", self.error_norm, ERROR_NORMS),
            ("early_exit", self.early_exit, EXIT_RULES),
        ):
            if value not in allowed:
                raise ValueError(f"classification.{name}={value!r} is not one of {allowed}")
        for name in ("num_steps", "max_forward_batch", "check_every", "prune_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"classification.{name}={getattr(self, name)} must be >= 1")
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(
                f"classification.t_range={list(self.t_range)} must be [low, high] with 0 <= low < high <= 1"
            )
        if self.band_weights is not None and (
            len(self.band_weights) != len(HAAR_BANDS) or min(self.band_weights) < 0 or sum(self.band_weights) <= 0
        ):
            raise ValueError(
                f"classification.band_weights={list(self.band_weights)} must be 4 weights >= 0 (LL, LH, HL, HH), "
                "not all 0"
            )
        unknown = [view for view in self.views if view not in VIEWS]
        if unknown or not self.views or len(set(self.views)) != len(self.views):
            raise ValueError(f"classification.views={list(self.views)} must be distinct names of {tuple(VIEWS)}")
        if len(self.views) > 1 and self.early_exit != "none":
            raise ValueError("early exit decides one view's votes; with several views use early_exit: none")
        if self.early_exit != "none" and self.rule != "majority":
            raise ValueError(f"early_exit={self.early_exit!r} decides a majority vote; it needs rule='majority'")

    def view_settings(self, index: int) -> ClassifierSettings:
        """The settings view `index` is classified with: one view and its own seed (the first view keeps seed)."""
        return dataclasses.replace(self, views=(self.views[index],), seed=self.seed + index * VIEW_SEED_STRIDE)

    def prune_step(self, num_classes: int) -> int:
        """The step count after which classes are pruned; 0 when they are not."""
        return self.prune_after if 0 < self.prune_after < self.num_steps and num_classes > self.prune_keep else 0

    def decision_points(self, num_classes: int) -> list[int]:
        """Step counts after which early exit may stop an image: multiples of check_every below N,
        never before pruning. They depend on the settings alone, never on the batch."""
        if self.early_exit == "none":
            return []
        first = self.prune_step(num_classes)
        return [k for k in range(self.check_every, self.num_steps, self.check_every) if k >= first]

    def segment_ends(self, num_classes: int) -> list[int]:
        """Where the evaluation pauses: every decision point, the pruning step, and N."""
        ends = {*self.decision_points(num_classes), self.prune_step(num_classes), self.num_steps} - {0}
        return sorted(ends)


def pair_times(keys: Tensor, image_rows: Tensor, steps: Tensor, strata: Tensor | None, t_range) -> Tensor:
    """t of each (image, step) pair: the pair's own uniform time, or its stratum's (strata (B, N)),
    mapped onto t_range."""
    unit = uniform_times(keys) if strata is None else strata[image_rows, steps].float()
    low, high = t_range
    return unit if (low, high) == (0.0, 1.0) else low + (high - low) * unit


def step_times(ids: Tensor, settings: ClassifierSettings) -> Tensor:
    """(B, N) the t of every (eps, t) pair of the images, the times segment_errors draws."""
    steps = torch.arange(settings.num_steps, device=ids.device)
    rows = torch.arange(len(ids), device=ids.device)[:, None]
    strata = stratified_times(ids, settings.num_steps, settings.seed) if settings.stratified else None
    return pair_times(
        pair_keys(ids.reshape(-1, 1), steps, settings.seed), rows, steps[None, :], strata, settings.t_range
    )


def step_profile(errors: Tensor) -> Tensor:
    """(B, C, N) error matrix -> (B, N): the lowest class's error at each step (a pruned class, +inf,
    never is; a step early exit skipped stays NaN)."""
    skipped = errors.isnan().all(dim=1)
    return errors.nan_to_num(nan=float("inf")).min(dim=1).values.masked_fill(skipped, float("nan"))


def segment_errors(
    denoiser: VPredictor,
    x: Tensor,
    ids: Tensor,
    steps: Tensor,
    classes: Tensor,
    schedule,
    settings: ClassifierSettings,
    strata: Tensor | None = None,
) -> Tensor:
    """Errors (B, K, S) of image b under class classes[b, k] at each of the S steps.

    The (image, step) pairs are taken image-major, in pieces of max_forward_batch // K pairs, so
    one forward holds every class of the same noised image side by side. Each pair's noise comes
    from its own key, so the pieces can be cut anywhere: the result does not depend on them.
    """
    batch, kept = classes.shape
    pairs_per_forward = max(1, settings.max_forward_batch // kept)
    weights = channel_weights(settings.band_weights, x.shape[1], x.device)
    out = torch.empty(batch * len(steps), kept, device=x.device)
    for start in range(0, batch * len(steps), pairs_per_forward):
        pair = torch.arange(start, min(start + pairs_per_forward, batch * len(steps)), device=x.device)
        image, step = pair // len(steps), steps[pair % len(steps)]
        keys = pair_keys(ids[image], step, settings.seed)
        t = pair_times(keys, image, step, strata, settings.t_range).to(x.dtype)
        eps = normals(keys, tuple(x.shape[1:])).to(x.dtype)
        alpha, sigma = (broadcast_like(value, eps) for value in schedule.alpha_sigma(t))
        z = diffuse(x[image], eps, alpha, sigma)
        # each pair once per class in the forward; its targets broadcast over the K predictions
        v_hat = denoiser(z.repeat_interleave(kept, dim=0), t.repeat_interleave(kept), classes[image].flatten())
        grouped = lambda value: value.unsqueeze(1)  # noqa: E731
        out[pair] = reconstruction_error(
            v_hat.view(len(pair), kept, *x.shape[1:]), grouped(z), grouped(x[image]), grouped(eps), grouped(alpha),
            grouped(sigma), settings.error_space, settings.error_norm, weights,
        )  # fmt: skip
    return out.view(batch, len(steps), kept).transpose(1, 2)


def check_finite(errors: Tensor, ids: Tensor, classes: Tensor, steps: Tensor) -> None:
    """Refuse NaN or inf from the network: NaN would read as "step not evaluated", inf as "pruned"."""
    bad = ~torch.isfinite(errors)
    if bad.any():
        image, slot, step = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteOutputError(
            f"the denoiser's output gave a reconstruction error of {float(errors[image, slot, step])} for image id "
            f"{int(ids[image])} at step {int(steps[step])}, class {int(classes[image, slot])} "
            f"({int(bad.sum())} non-finite errors in this segment): the weights or the input are broken"
        )


@torch.no_grad()
def classify_images(
    denoiser: VPredictor, x: Tensor, ids: Tensor, num_classes: int, schedule, settings: ClassifierSettings
) -> dict[str, Tensor]:
    """Run the diffusion classifier on a batch of model inputs x (already wavelet-transformed).

    Returns `errors` (B, C, N): NaN where a step was not evaluated (early exit), +inf for a class
    pruned away (on every evaluated step), so voting.summarize can take votes and means over it
    directly; and `forwards` (B,), the denoiser inputs each image used.
    """
    batch, total = x.shape[0], settings.num_steps
    ids = ids.to(x.device)
    errors = torch.full((batch, num_classes, total), float("nan"), device=x.device)
    kept = torch.ones(batch, num_classes, dtype=torch.bool, device=x.device)
    forwards = torch.zeros(batch, dtype=torch.long, device=x.device)
    running = torch.ones(batch, dtype=torch.bool, device=x.device)
    strata = stratified_times(ids, total, settings.seed) if settings.stratified else None
    decisions, prune_at, done = set(settings.decision_points(num_classes)), settings.prune_step(num_classes), 0
    for end in settings.segment_ends(num_classes):
        index = running.nonzero().flatten()
        if len(index) == 0:
            break
        steps = torch.arange(done, end, device=x.device)
        classes = kept[index].nonzero()[:, 1].view(len(index), -1)  # the same number kept by every image
        found = segment_errors(
            denoiser,
            x[index],
            ids[index],
            steps,
            classes,
            schedule,
            settings,
            None if strata is None else strata[index],
        )
        check_finite(found, ids[index], classes, steps)
        segment = torch.full((len(index), num_classes, len(steps)), float("inf"), device=x.device)
        errors[index, :, done:end] = segment.scatter(1, classes.unsqueeze(-1).expand_as(found), found)
        forwards[index] += classes.shape[1] * len(steps)
        done = end
        if done == prune_at:  # no image has stopped yet: every row holds steps 0 .. done - 1
            kept = prune_classes(errors[:, :, :done], settings.prune_keep)
            errors[:, :, :done] = errors[:, :, :done].masked_fill(~kept.unsqueeze(-1), float("inf"))
        if done in decisions:
            counts = vote_counts(errors[index, :, :done])
            decided = (
                exact_decided(counts, done, total, kept[index])
                if settings.early_exit == "exact"
                else sequential_decided(counts, settings.alpha, settings.min_steps, kept[index])
            )
            running[index[decided]] = False
    return {"errors": errors, "forwards": forwards}
