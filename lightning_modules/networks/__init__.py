"""Denoisers: `network(num_classes, in_channels, sample_size)`, called as `f(z, t, labels) -> v_hat`."""

from .base import Denoiser
from .dit import DiT
from .unet import ClassConditionalUNet

__all__ = ["ClassConditionalUNet", "DiT", "Denoiser"]
