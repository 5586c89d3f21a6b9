"""Training objective: v-prediction MSE with min-SNR-gamma weighting (Hang et al. 2023, ref. [24]).

The paper's weighting is min(snr, gamma) on the x-error. Since x - x_hat = sigma * (v_hat - v) and
sigma^2 = 1 / (snr + 1), the same weighting on the v-error is min(snr, gamma) / (snr + 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def min_snr_weight(logsnr: Tensor, gamma: float = 5.0) -> Tensor:
    snr = torch.exp(logsnr)
    return torch.clamp(snr, max=gamma) / (snr + 1.0)


def weighted_v_loss(v_pred: Tensor, v_true: Tensor, logsnr: Tensor, gamma: float | None = 5.0) -> Tensor:
    """Per-sample mean squared error over (C, H, W), weighted, averaged over the batch.

    gamma=None disables the weighting (plain v-MSE).
    """
    per_sample = (v_pred.float() - v_true.float()).pow(2).flatten(1).mean(dim=1)
    if gamma is not None:
        per_sample = per_sample * min_snr_weight(logsnr.float(), gamma)
    return per_sample.mean()


def drop_labels(labels: Tensor, null_label: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Classifier-free-guidance label dropout: each label becomes `null_label` with probability p."""
    if p <= 0.0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def training_times(
    n: int,
    t_range: tuple[float, float] = (0.0, 1.0),
    share: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t of n training images: a `share` of them (each image with that probability) uniform on t_range, the band
    the classification votes in; the others uniform on [0, 1] (the paper: all of them), so the model still
    learns every t that sampling from noise and the explanations pass through."""
    low, high = t_range
    t = torch.rand(n, device=device, generator=generator)
    if (low, high) == (0.0, 1.0) or share <= 0.0:
        return t
    in_band = torch.rand(n, device=device, generator=generator) < share
    return torch.where(in_band, low + (high - low) * t, t)


def discriminative_loss(errors: Tensor, labels: Tensor, tau: float) -> Tensor:
    """Cross-entropy of softmax(-e / tau) across classes (Li, Kumar & Pathak 2025's discriminative fine-tune),
    with e each class's reconstruction error relative to the image's mean over classes (detached): errors (B, C)
    of one shared (eps, t) per image, so tau is a share of the error (0.02: a 2 % gap is one logit) whatever the
    error's scale at that t."""
    relative = errors / errors.mean(dim=1, keepdim=True).detach()
    return torch.nn.functional.cross_entropy(-relative / tau, labels)
