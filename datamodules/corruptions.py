"""Corrupted copies of images at three severities: shifted sets for the out-of-distribution benchmark.

Every function takes images (B, C, H, W) in [-1, 1], as every datamodule gives them, and a severity
1, 2 or 3 (3 the strongest), and returns images of the same shape in [-1, 1]. Spatial strengths are
fractions of the image side, so a severity means the same at 32 and at 256 pixels. The kinds and
their order of strength follow ImageNet-C (Hendrycks & Dietterich 2019) where it has them; inversion,
rotation and crop-and-zoom stand for a mis-set window, a mis-oriented film and a mis-framed field of
view. Severity 3 of inversion is the full inversion, of rotation 90 degrees.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

SEVERITIES = (1, 2, 3)
NOISE_STD = (0.1, 0.2, 0.4)  # in [-1, 1] units: 0.05, 0.1, 0.2 of the [0, 1] range
BLUR_SIGMA = (1 / 64, 1 / 32, 3 / 64)  # of the side: 0.5, 1 and 1.5 pixels at 32 pixels
CONTRAST = (0.6, 0.4, 0.2)  # what is left of each pixel's distance to the image mean
INVERSION = (0.7, 0.85, 1.0)  # blend towards the negative: 1 - 2 w times the image
ROTATION_DEGREES = (30.0, 60.0, 90.0)
CROP_KEPT = (0.8, 0.65, 0.5)  # the central fraction of the side that is zoomed back to full size
JPEG_QUALITY = (30, 15, 5)


def _level(values: tuple, severity: int):
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return values[severity - 1]


def gaussian_noise(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Additive Gaussian noise, clipped to [-1, 1]; the same seed gives the same noise."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    return (images + _level(NOISE_STD, severity) * noise).clamp(-1.0, 1.0)


def blur(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Gaussian blur with a standard deviation of 1/64, 1/32 or 3/64 of the side (reflected edges)."""
    sigma = _level(BLUR_SIGMA, severity) * images.shape[-1]
    size = 2 * int(torch.tensor(3.0 * sigma).ceil()) + 1
    return TF.gaussian_blur(images, kernel_size=[size, size], sigma=[sigma, sigma])


def contrast(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Every pixel moved towards its image's mean: mean + c (x - mean), c = 0.6, 0.4, 0.2."""
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    return mean + _level(CONTRAST, severity) * (images - mean)


def inversion(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """(1 - w) x + w (-x), w = 0.7, 0.85, 1: a negative at reduced contrast, then the full negative."""
    return (1.0 - 2.0 * _level(INVERSION, severity)) * images


def rotation(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Rotated counter-clockwise by 30, 60 or 90 degrees about the centre; corners filled with black (-1)."""
    degrees = _level(ROTATION_DEGREES, severity)
    if degrees == 90.0:  # exact, no interpolation
        return torch.rot90(images, 1, dims=(-2, -1))
    return TF.rotate(images, degrees, interpolation=TF.InterpolationMode.BILINEAR, fill=-1.0)


def crop_and_zoom(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """The central 80, 65 or 50 % of the side, enlarged back to the full size (bilinear)."""
    side = images.shape[-1]
    kept = round(side * _level(CROP_KEPT, severity))
    cropped = TF.center_crop(images, [kept, kept])
    return TF.resize(cropped, [side, side], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)


def jpeg(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Saved as JPEG at quality 30, 15 or 5 (8-bit, each image on its own) and decoded again."""
    quality = _level(JPEG_QUALITY, severity)
    pixels = ((images.detach().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    decoded = [decode_jpeg(encode_jpeg(image, quality=quality)) for image in pixels]
    return (torch.stack(decoded).float() / 127.5 - 1.0).to(images)


CORRUPTION_KINDS = (gaussian_noise, blur, contrast, inversion, rotation, crop_and_zoom, jpeg)
CORRUPTIONS = {kind.__name__: kind for kind in CORRUPTION_KINDS}


def corrupt(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """`images` corrupted by `kind` (a key of CORRUPTIONS) at `severity`."""
    return apply_named(CORRUPTIONS, "corruption", images, kind, severity, seed)


def apply_named(table: dict, what: str, images: Tensor, kind: str, severity: int, seed: int) -> Tensor:
    """table[kind](images, severity, seed), or an error naming the kinds there are."""
    if kind not in table:
        raise ValueError(f"unknown {what} {kind!r}; choose one of {tuple(table)}")
    return table[kind](images, severity, seed)
