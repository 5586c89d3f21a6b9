"""Deterministic DDIM sampling in continuous time, with classifier-free guidance (paper sec. 2.3, eq. 5).

For z_t = alpha_t * x + sigma_t * eps and a v-prediction v_hat, one DDIM step from t to s < t is

    x_hat = alpha_t * z_t - sigma_t * v_hat,   eps_hat = sigma_t * z_t + alpha_t * v_hat
    z_s   = alpha_s * x_hat + sigma_s * eps_hat

(Song et al. 2021 with eta = 0, written for v as in Salimans & Ho 2022). Guidance mixes the
conditional and unconditional (null-label) predictions as `(1 + w) * cond - w * uncond`.

Why not a diffusers scheduler: diffusers' DDIMScheduler is discrete-time (betas over 1000 integer
timesteps) and has no shifted-cosine schedule; this model is trained in continuous t with
alpha, sigma from `ShiftedCosineSchedule`, so mapping it onto a beta table would only approximate
the schedule the model learned. The exact continuous-time step is the three lines above.

Explanations (paper Fig. 4): noise the input to t0 (CheXpert 0.5, ISIC 0.3), then sample toward
each class from the *same* z_t0, so the images differ only by the condition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import VPredictor
from .parameterization import diffuse, eps_from_v, x_from_v
from .schedule import ShiftedCosineSchedule, broadcast_like


def sampling_times(t_start: float, steps: int) -> Tensor:
    """t_start = t_0 > t_1 > ... > t_steps = 0, evenly spaced (S + 1 values)."""
    return torch.linspace(t_start, 0.0, steps + 1)


def guided_velocity(
    denoiser: VPredictor,
    z: Tensor,
    t: Tensor,
    labels: Tensor,
    guidance_scale: float,
    null_label: int,
    max_batch: int = 256,
) -> Tensor:
    """`(1 + w) * v(z, t, c) - w * v(z, t, null)`; with w = 0 only the conditional forward runs.

    The conditional and unconditional inputs go through the denoiser together (2B rows, in chunks
    of `max_batch`), as one batch, so guidance costs one forward per step, not two.
    """
    if guidance_scale == 0:
        return _forward_in_chunks(denoiser, z, t, labels, max_batch)
    both = _forward_in_chunks(
        denoiser,
        torch.cat([z, z]),
        torch.cat([t, t]),
        torch.cat([labels, torch.full_like(labels, null_label)]),
        max_batch,
    )
    conditional, unconditional = both.chunk(2)
    return (1 + guidance_scale) * conditional - guidance_scale * unconditional


def _forward_in_chunks(denoiser: VPredictor, z: Tensor, t: Tensor, labels: Tensor, max_batch: int) -> Tensor:
    return torch.cat(
        [
            denoiser(z[i : i + max_batch], t[i : i + max_batch], labels[i : i + max_batch])
            for i in range(0, len(z), max_batch)
        ]
    )


@torch.no_grad()
def ddim_sample(
    denoiser: VPredictor,
    z: Tensor,
    labels: Tensor,
    schedule: ShiftedCosineSchedule,
    t_start: float,
    steps: int,
    guidance_scale: float = 0.0,
    null_label: int | None = None,
    max_batch: int = 256,
) -> Tensor:
    """Denoise z (at time t_start) toward `labels` in `steps` DDIM steps; returns the clean estimate x_hat.

    The result is the x_hat of the last step (at t = 0 the schedule's sigma is ~1e-3, not 0, so
    this is the model's estimate of the clean image rather than a last, slightly noisy z).
    `t_start = 0` or `steps = 0` returns z unchanged.
    """
    if not 0.0 <= t_start <= 1.0:
        raise ValueError(f"t_start must be in [0, 1], got {t_start}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if t_start == 0 or steps == 0:
        return z
    if guidance_scale != 0 and null_label is None:
        raise ValueError("guidance_scale != 0 needs the null label of the denoiser")
    times = sampling_times(t_start, steps).to(z.device)
    x_hat = z
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = t_now.expand(len(z))
        alpha, sigma = (broadcast_like(value, z) for value in schedule.alpha_sigma(t))
        v_hat = guided_velocity(denoiser, z, t.to(z.dtype), labels, guidance_scale, null_label, max_batch).to(z.dtype)
        x_hat, eps_hat = x_from_v(z, v_hat, alpha, sigma), eps_from_v(z, v_hat, alpha, sigma)
        alpha_next, sigma_next = (broadcast_like(value, z) for value in schedule.alpha_sigma(t_next.expand(len(z))))
        z = diffuse(x_hat, eps_hat, alpha_next, sigma_next)
    return x_hat


def noise_to(x: Tensor, eps: Tensor, t: float, schedule: ShiftedCosineSchedule) -> Tensor:
    """z_t = alpha_t * x + sigma_t * eps at one time t for the whole batch (t = 0: x itself)."""
    if t == 0:
        return x
    alpha, sigma = (
        broadcast_like(value, x) for value in schedule.alpha_sigma(torch.full((len(x),), t, device=x.device))
    )
    return diffuse(x, eps, alpha.to(x.dtype), sigma.to(x.dtype))
