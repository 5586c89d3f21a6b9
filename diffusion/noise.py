"""The shared (eps, t) pairs of the diffusion classifier (paper sec. 2.2).

Reproducibility contract: (eps_k, t_k) of image i come from a generator seeded by
(seed, id_i, k), so an image gets the same pairs, hence the same errors and votes, whatever the
batch it sits in, the data order, the number of processes or an early exit. Noise is drawn on the
CPU, so it is also the same on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def seed_per_rank(world_size: int, rank: int) -> None:
    """Give each DDP rank its own training noise: seed_everything seeds every rank alike, so each
    would draw the same t and eps for its different images. One seed per rank (DiT does
    seed * world + rank), drawn from the common state so a run stays reproducible; a single
    process is left untouched."""
    if world_size > 1:
        common = int(torch.randint(2**62, (1,)))
        torch.manual_seed(common + rank)
