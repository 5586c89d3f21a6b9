"""The networks, pure torch: denoisers built as `network(num_classes, in_channels, sample_size)` and
called as `f(z, t, labels) -> v_hat` (unet, dit), the baselines' backbones by name (backbones), and
Stable Diffusion's parts presented as such a denoiser (stable_diffusion)."""

from .base import Denoiser
from .dit import DiT
from .unet import ClassConditionalUNet

__all__ = ["ClassConditionalUNet", "DiT", "Denoiser"]
