"""Continuous-time, variance-preserving noise schedule (paper sec. 2.1).

The shifted-cosine logSNR of simple diffusion (Hoogeboom et al. 2023, ref. [25]):

    lam(t) = -2 * log(tan(pi * t / 2)) + 2 * log(base / size)

`size` is the side of the *model input* (after the wavelet), `base` the resolution at which the
plain cosine schedule is right (64). Larger inputs get a negative shift, i.e. more noise at the
same t, because neighbouring pixels of a large image are redundant and survive more noise.

Like simple diffusion we remap t onto [t_min, t_max] so that the unshifted logSNR stays inside
[logsnr_min, logsnr_max] and `tan` never reaches 0 or infinity.

`DiscreteSchedule` presents a pre-trained model's discrete DDPM schedule (Stable Diffusion) in the
same continuous-time form, so the classifier and the sampler run on it unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ShiftedCosineSchedule:
    """logSNR(t) and the variance-preserving (alpha, sigma) pair derived from it."""

    def __init__(self, image_size: int, base: int = 64, logsnr_min: float = -15.0, logsnr_max: float = 15.0):
        if image_size <= 0 or base <= 0:
            raise ValueError(f"schedule needs positive sizes, got image_size={image_size}, base={base}")
        self.image_size = image_size
        self.base = base
        self.shift = 2.0 * math.log(base / image_size)
        self.t_min = math.atan(math.exp(-0.5 * logsnr_max))
        self.t_max = math.atan(math.exp(-0.5 * logsnr_min))

    def logsnr(self, t: Tensor) -> Tensor:
        """Monotone decreasing in t; t = 0 is (almost) clean, t = 1 (almost) pure noise."""
        angle = self.t_min + t.double() * (self.t_max - self.t_min)
        return (-2.0 * torch.log(torch.tan(angle)) + self.shift).to(t.dtype)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam), so alpha^2 + sigma^2 = 1 exactly."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def __repr__(self) -> str:
        return f"ShiftedCosineSchedule(image_size={self.image_size}, base={self.base}, shift={self.shift:.3f})"


class DiscreteSchedule:
    """The checkpoint's DDPM schedule seen in continuous time: t in [0, 1) -> timestep floor(t * T).

    floor makes t ~ U[0, 1) exactly uniform over the T training timesteps, as in fine-tuning, and
    alpha^2 = alphas_cumprod[timestep], sigma^2 = 1 - alpha^2 (variance preserving).
    """

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.double()

    def timesteps(self, t: Tensor) -> Tensor:
        return (t.double() * len(self.alphas_cumprod)).long().clamp(0, len(self.alphas_cumprod) - 1)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_squared = self.alphas_cumprod.to(t.device)[self.timesteps(t)]
        return alpha_squared.sqrt().to(t.dtype), (1 - alpha_squared).sqrt().to(t.dtype)


def broadcast_like(per_sample: Tensor, images: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) so per-sample scalars multiply image batches."""
    return per_sample.reshape(-1, *([1] * (images.ndim - 1)))
