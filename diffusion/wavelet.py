"""Single-stage 2D Haar wavelet transform as a batched torch op (paper B.3/B.4).

The denoiser works on 4C x H/2 x W/2 wavelet coefficients instead of C x H x W pixels, which
quarters the spatial size of the model (simple diffusion's trick). Peer code ran `pywt.dwt2` per
image on the CPU inside `__getitem__`; here it is a stride-2 convolution with pywt's own filters,
so it runs batched on the model's device and is exactly invertible (Haar is orthonormal).

Channel layout of the output is band-major: [LL (C channels), LH (C), HL (C), HH (C)], where the
bands are pywt's (cA, cH, cV, cD) of `pywt.dwt2(image, 'haar')`. The LL band of an image in
[-1, 1] spans [-2, 2]: never clip in wavelet space.
"""

from __future__ import annotations

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _band_kernels(filter_low: list[float], filter_high: list[float], reverse: bool) -> Tensor:
    """(4, 1, 2, 2) kernels in pywt's band order cA, cH (detail along rows), cV, cD.

    pywt convolves, torch correlates: analysis filters are reversed, synthesis ones are not.
    """
    low = torch.tensor(filter_low[::-1] if reverse else filter_low, dtype=torch.float64)
    high = torch.tensor(filter_high[::-1] if reverse else filter_high, dtype=torch.float64)
    rows_cols = [(low, low), (high, low), (low, high), (high, high)]
    return torch.stack([torch.outer(r, c) for r, c in rows_cols]).unsqueeze(1)


class HaarWavelet(nn.Module):
    """Forward (`encode`) and inverse (`decode`) single-level Haar DWT for (B, C, H, W) batches."""

    def __init__(self):
        super().__init__()
        haar = pywt.Wavelet("haar")
        self.register_buffer("analysis", _band_kernels(haar.dec_lo, haar.dec_hi, reverse=True), persistent=False)
        self.register_buffer("synthesis", _band_kernels(haar.rec_lo, haar.rec_hi, reverse=False), persistent=False)

    def encode(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        if height % 2 or width % 2:
            raise ValueError(f"the Haar transform needs even image sides, got {height}x{width}")
        kernel = self.analysis.to(images.dtype).repeat(channels, 1, 1, 1)
        bands = F.conv2d(images, kernel, stride=2, groups=channels)  # channel-major: c0 bands, c1 bands...
        return (
            bands.view(batch, channels, 4, height // 2, width // 2)
            .transpose(1, 2)
            .reshape(batch, 4 * channels, height // 2, width // 2)
        )

    def decode(self, coefficients: Tensor) -> Tensor:
        batch, bands_channels, height, width = coefficients.shape
        if bands_channels % 4:
            raise ValueError(f"wavelet coefficients need 4*C channels, got {bands_channels}")
        channels = bands_channels // 4
        channel_major = (
            coefficients.view(batch, 4, channels, height, width)
            .transpose(1, 2)
            .reshape(batch, bands_channels, height, width)
        )
        kernel = self.synthesis.to(coefficients.dtype).repeat(channels, 1, 1, 1)
        return F.conv_transpose2d(channel_major, kernel, stride=2, groups=channels)


class IdentityTransform(nn.Module):
    """Stand-in when the wavelet is switched off: the model sees pixels."""

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, coefficients: Tensor) -> Tensor:
        return coefficients


class GreyscaleTransform(nn.Module):
    """Grey images seen as one channel: the model learns 4 wavelet bands instead of 12 (3 equal copies),
    and spends no capacity keeping the copies equal nor paints colour into grey reconstructions.

    encode: the channel mean of (B, C, H, W) images, then `inner` (the wavelet or the identity);
    decode: `inner`'s inverse, repeated to the `channels` of the images (grey stays grey)."""

    def __init__(self, inner: nn.Module, channels: int = 3):
        super().__init__()
        self.inner, self.channels = inner, channels

    def encode(self, images: Tensor) -> Tensor:
        return self.inner.encode(images.mean(dim=1, keepdim=True))

    def decode(self, coefficients: Tensor) -> Tensor:
        return self.inner.decode(coefficients).expand(-1, self.channels, -1, -1)
