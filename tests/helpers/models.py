"""Small networks for the maths' tests, parameter counts by hand, and explanation records checked again."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF


class LabelledLinear(torch.nn.Module):
    """A small untrained denoiser whose output depends on z, t and the label (classes 0, 1; null label 2)."""

    def __init__(self, channels=3):
        super().__init__()
        self.mix = torch.nn.Conv2d(channels, channels, 1)
        self.label_shift = torch.nn.Embedding(3, channels)
        torch.nn.init.normal_(self.label_shift.weight)

    def forward(self, z, t, labels):
        return self.mix(z) * (1 + t.view(-1, 1, 1, 1)) + self.label_shift(labels)[:, :, None, None]


def dit_parameter_count(num_classes, in_channels, patch, hidden, depth, mlp_ratio=4.0, freq=256):
    """DiT parameter count by hand, layer by layer (weights + biases)."""
    mlp = int(hidden * mlp_ratio)
    patch_embed = in_channels * patch * patch * hidden + hidden
    t_embed = (freq * hidden + hidden) + (hidden * hidden + hidden)
    label_table = (num_classes + 1) * hidden
    block = (
        (hidden * 3 * hidden + 3 * hidden)  # attention qkv
        + (hidden * hidden + hidden)  # attention proj
        + (hidden * mlp + mlp)
        + (mlp * hidden + hidden)  # MLP
        + (hidden * 6 * hidden + 6 * hidden)  # adaLN: shift/scale/gate x 2
    )
    patch_out = patch * patch * in_channels
    final = (hidden * 2 * hidden + 2 * hidden) + (hidden * patch_out + patch_out)  # adaLN + linear
    return patch_embed + t_embed + label_table + depth * block + final


def flip_rate_of(arrays) -> float:
    """explain.json's flip rate recomputed from the raw .npz records: counterfactuals classified as their target."""
    flips = [
        int(row[target] == target)
        for a in arrays
        for row, factual in zip(a["flip_prediction"], a["factual"])
        for target in range(len(row))
        if target != factual
    ]
    return sum(flips) / len(flips)


def four_flips(images: torch.Tensor) -> list[torch.Tensor]:
    """The image, its horizontal, vertical and double flip, by torchvision (a second code path to the
    baselines' test-time flips)."""
    return [images, TF.horizontal_flip(images), TF.vertical_flip(images), TF.vertical_flip(TF.horizontal_flip(images))]
