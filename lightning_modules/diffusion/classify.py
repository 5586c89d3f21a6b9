"""The diffusion classifier's error matrix (paper sec. 2.2, eq. 4, Appendix A).

For each image, N (eps, t) pairs are drawn and shared by every class; the image is noised once per
pair and denoised once per class, all classes in one batched forward of C*B inputs. The result
is an error matrix (B, C, N) that `voting.py` turns into a class.

Reproducibility contract: (eps_k, t_k) of image i come from a generator seeded by
(seed, id_i, k), so an image gets the same errors whatever the batch it sits in, the data order or
the number of processes. Noise is drawn on the CPU, so it is also the same on every device.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .parameterization import diffuse, eps_from_v, v_target, x_from_v
from .schedule import ShiftedCosineSchedule, broadcast_like

ERROR_SPACES = ("eps", "x", "v")
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z, t, labels) -> v_hat

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, sample_id: int, step: int) -> int:
    """A 63-bit seed for (seed, sample id, step): splitmix64 of a mixed key, so nearby ids and
    steps give unrelated streams (a plain sum would make (id=1, k=0) equal (id=0, k=1))."""
    key = (seed * 0x9E3779B97F4A7C15 + sample_id * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & _MASK64
    key = ((key ^ (key >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    key = ((key ^ (key >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (key ^ (key >> 31)) & ((1 << 63) - 1)


def shared_noise(ids: Tensor, steps: range, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """t of shape (B, K) in [0, 1) and eps of shape (B, K, *shape), on the CPU, one stream per (id, step)."""
    times = torch.empty(len(ids), len(steps))
    noises = torch.empty(len(ids), len(steps), *shape)
    generator = torch.Generator()
    for row, sample_id in enumerate(ids.tolist()):
        for column, step in enumerate(steps):
            generator.manual_seed(step_seed(seed, int(sample_id), step))
            times[row, column] = torch.rand((), generator=generator)
            noises[row, column] = torch.randn(shape, generator=generator)
    return times, noises


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


@torch.no_grad()
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
    """Errors (B, C, N) of denoising x under each class at N shared (eps, t) pairs.

    Several steps go into one forward when C*B is small, up to `max_forward_batch` inputs; one
    step (C*B inputs) is the least a forward takes.
    """
    batch = x.shape[0]
    errors = torch.empty(batch, num_classes, num_steps, device=x.device)
    steps_per_forward = max(1, max_forward_batch // (num_classes * batch))
    class_labels = torch.arange(num_classes, device=x.device)
    for start in range(0, num_steps, steps_per_forward):
        steps = range(start, min(start + steps_per_forward, num_steps))
        t, eps = shared_noise(ids, steps, tuple(x.shape[1:]), seed)
        t, eps = t.to(x.device, x.dtype).flatten(), eps.to(x.device, x.dtype).flatten(0, 1)  # (B*K,), (B*K, ...)
        x_rep = x.repeat_interleave(len(steps), dim=0)
        alpha, sigma = (broadcast_like(value, x_rep) for value in schedule.alpha_sigma(t))
        z = diffuse(x_rep, eps, alpha, sigma)
        # class-major stacking: rows [c * B*K : (c+1) * B*K] are class c
        repeat = lambda tensor: tensor.repeat(num_classes, *([1] * (tensor.ndim - 1)))
        labels = class_labels.repeat_interleave(z.shape[0])
        v_hat = denoiser(repeat(z), repeat(t), labels)
        err = reconstruction_error(v_hat, repeat(z), repeat(x_rep), repeat(eps), repeat(alpha), repeat(sigma), space)
        errors[:, :, steps.start : steps.stop] = err.view(num_classes, batch, len(steps)).permute(1, 0, 2)
    return errors
