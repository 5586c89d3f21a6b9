"""Denoisers: `network(num_classes, in_channels, sample_size)`, called as `f(z, t, labels) -> v_hat`."""

from .dit import DiT
from .unet import ClassConditionalUNet

__all__ = ["ClassConditionalUNet", "DiT"]
