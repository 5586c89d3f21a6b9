"""The contract every denoiser keeps, so the training and classification code never asks which one."""

from __future__ import annotations

from torch import Tensor, nn


class Denoiser(nn.Module):
    """`f(z, t, labels) -> v_hat` on (B, in_channels, sample_size, sample_size) inputs.

    Built as `Denoiser(num_classes, in_channels, sample_size, **options)`. `t` is continuous time
    in [0, 1] of shape (B,); `labels` are class indices in [0, num_classes], where `num_classes`
    itself is the null label of classifier-free guidance. The network never drops labels itself.
    """

    num_classes: int
    in_channels: int
    sample_size: int

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError
