"""Out-of-distribution scores: how unlike its training images an image looks to the model that classifies it.

Every score is computed from the per-image outputs classification produces anyway (no extra
forwards), and higher always means more unusual. `decisions/refusal.py` turns a score into a
conformal p-value and a refusal.

Diffusion classifiers give, per image, `step_errors` (B, N): at each of the N shared (eps, t) steps
the lowest reconstruction error over the classes (NaN where early exit skipped the step), and
`step_times` (B, N), that step's t. The error falls steeply with t, and since every image draws its
own times, the raw mean error mixes how unusual an image is with which times it drew. So:

  typicality     (the default) mean over the steps of z_k^2, z_k = (log e_k - m(t_k)) / s(t_k), with m
                 and s the mean and standard deviation of the log error at that t over reference images
                 (a `TimeProfile`). Two-sided: an image reconstructed better than usual (blurred, flat,
                 low contrast) is as atypical as one reconstructed worse (Nalisnick et al. 2019's
                 typicality test; reconstructions from several t as in DDPM-OOD, Graham et al. 2023).
  excess_error   mean of z_k: one-sided, only worse-than-usual reconstructions count.
  best_error     mean over the steps of the lowest class's error: no reference, t left in.

Discriminative baselines give `probs` and `entropy` (reports/results.py) and `energy`:

  energy         (their default) -logsumexp of the logits (Liu et al. 2020), averaged over MC-dropout
                 passes and test-time flips where configured.
  msp            1 - the maximum softmax probability (Hendrycks & Gimpel 2017).
  entropy        the softmax entropy, or the MC-dropout entropy where configured.

The default of each family was chosen with `python -m tools.ood_benchmark` on validation images and
shifted sets (the README's table), never on test labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

DIFFUSION_SCORES = ("typicality", "excess_error", "best_error")
BASELINE_SCORES = ("energy", "msp", "entropy")
NEEDS_PROFILE = ("typicality", "excess_error")
MIN_POINTS_PER_BIN = 2  # a standard deviation needs two
LOG_FLOOR = 1e-12  # errors are positive; this keeps log finite for an exact reconstruction


@dataclass
class TimeProfile:
    """The mean and standard deviation of the log reconstruction error as a function of t.

    Fitted on reference images: their (log error, t) points binned into `len(mean)` equal bins
    between the smallest and largest t seen. A bin with fewer than two points takes the values of
    the nearest bin that has them. A t outside [low, high] falls into the edge bin.
    """

    low: float
    high: float
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, step_errors: Tensor, step_times: Tensor, bins: int) -> TimeProfile:
        evaluated = ~step_errors.isnan()
        log_errors = step_errors[evaluated].double().clamp(min=LOG_FLOOR).log()
        times = step_times[evaluated].double()
        if bins < 1:
            raise ValueError(f"a time profile needs at least one bin, got {bins}")
        if len(times) < MIN_POINTS_PER_BIN:
            raise ValueError(f"a time profile needs at least {MIN_POINTS_PER_BIN} evaluated steps, got {len(times)}")
        profile = cls(float(times.min()), float(times.max()), [0.0] * bins, [1.0] * bins)
        index = profile.bin_of(times)
        counts = torch.bincount(index, minlength=bins)
        sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, log_errors)
        squares = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, log_errors**2)
        filled = (counts >= MIN_POINTS_PER_BIN).nonzero().flatten()
        if len(filled) == 0:
            raise ValueError(f"no bin of the time profile has {MIN_POINTS_PER_BIN} points: use fewer bins")
        # each bin borrows from the nearest filled bin (itself when it is filled)
        nearest = filled[(torch.arange(bins)[:, None] - filled[None, :]).abs().argmin(dim=1)]
        n = counts[nearest].double()
        mean = sums[nearest] / n
        variance = (squares[nearest] - n * mean**2) / (n - 1)  # unbiased
        profile.mean, profile.std = mean.tolist(), variance.clamp(min=LOG_FLOOR).sqrt().tolist()
        return profile

    def bin_of(self, times: Tensor) -> Tensor:
        bins = len(self.mean)
        width = max(self.high - self.low, 1e-12)
        return ((times.double() - self.low) / width * bins).floor().long().clamp(0, bins - 1)

    def z(self, step_errors: Tensor, step_times: Tensor) -> Tensor:
        """(B, N) standardised log errors; NaN where the step was not evaluated."""
        index = self.bin_of(step_times)
        mean = torch.tensor(self.mean, dtype=torch.float64)[index]
        std = torch.tensor(self.std, dtype=torch.float64)[index]
        return (step_errors.double().clamp(min=LOG_FLOOR).log() - mean) / std

    def as_dict(self) -> dict:
        return asdict(self)


BANDS = 4  # t-bands of the error-profile offsets the whole-set check compares (decisions/set_shift.py)


def band_offsets(outputs: dict, profile: TimeProfile, bands: int = BANDS) -> Tensor:
    """(B, bands) the mean signed z of each image's steps in each of `bands` equal bands of the profile's t range
    (0 where an image drew no step in a band). Per image the mean z of a band is noisy (a few steps at N = 21), but
    a set's mean of it is not: a systematic offset of a whole set, such as another scanner's processing curve, shows
    in it long before single images stand out."""
    z = profile.z(outputs["step_errors"], outputs["step_times"])
    width = max(profile.high - profile.low, 1e-12)
    band = ((outputs["step_times"].double() - profile.low) / width * bands).floor().long().clamp(0, bands - 1)
    evaluated = ~z.isnan()
    sums = torch.zeros(len(z), bands, dtype=torch.float64).scatter_add_(1, band, z.nan_to_num(0.0))
    counts = torch.zeros(len(z), bands, dtype=torch.float64).scatter_add_(1, band, evaluated.double())
    return sums / counts.clamp(min=1)


def typicality(outputs: dict, profile: TimeProfile) -> Tensor:
    return profile.z(outputs["step_errors"], outputs["step_times"]).pow(2).nanmean(dim=1)


def excess_error(outputs: dict, profile: TimeProfile) -> Tensor:
    return profile.z(outputs["step_errors"], outputs["step_times"]).nanmean(dim=1)


def best_error(outputs: dict, profile=None) -> Tensor:
    return outputs["step_errors"].double().nanmean(dim=1)


def energy(outputs: dict, profile=None) -> Tensor:
    return outputs["energy"].double()


def msp(outputs: dict, profile=None) -> Tensor:
    return 1.0 - outputs["probs"].double().max(dim=1).values


def entropy(outputs: dict, profile=None) -> Tensor:
    return outputs["entropy"].double()


SCORES = {
    "typicality": typicality,
    "excess_error": excess_error,
    "best_error": best_error,
    "energy": energy,
    "msp": msp,
    "entropy": entropy,
}


def ood_score(name: str, outputs: dict, profile: TimeProfile | None = None) -> Tensor:
    """(B,) float64 scores `name` of per-image outputs; higher = more unusual."""
    if name not in SCORES:
        raise ValueError(f"unknown out-of-distribution score {name!r}; choose one of {tuple(SCORES)}")
    if name in NEEDS_PROFILE and profile is None:
        raise ValueError(f"the {name} score needs a time profile fitted on reference images")
    return SCORES[name](outputs, profile)
