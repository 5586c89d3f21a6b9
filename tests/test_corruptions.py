"""Corruptions of the out-of-distribution benchmark (datamodules/corruptions.py) against second code paths."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.corruptions import (
    BLUR_SIGMA,
    CORRUPTIONS,
    NOISE_STD,
    blur,
    contrast,
    corrupt,
    crop_and_zoom,
    gaussian_noise,
    inversion,
    jpeg,
    rotation,
)

IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_every_corruption_keeps_shape_and_range_and_changes_the_images(kind, severity):
    out = corrupt(IMAGES, kind, severity)
    assert out.shape == IMAGES.shape and out.dtype == IMAGES.dtype
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert (out - IMAGES).abs().mean() > 0.01


def test_unknown_kind_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(IMAGES, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(IMAGES, "blur", 4)


def test_noise_has_its_standard_deviation_and_a_seed():
    flat = torch.zeros(1, 3, 256, 256)
    for severity, std in zip((1, 2, 3), NOISE_STD):
        noise = gaussian_noise(flat, severity)  # std 0.4 at zero is clipped only beyond 2.5 std
        assert float(noise.std()) == pytest.approx(std, rel=0.02)
    assert torch.equal(gaussian_noise(IMAGES, 2, seed=5), gaussian_noise(IMAGES, 2, seed=5))
    assert not torch.equal(gaussian_noise(IMAGES, 2, seed=5), gaussian_noise(IMAGES, 2, seed=6))


def test_blur_is_a_separable_gaussian_with_reflected_edges():
    for severity in (1, 3):
        sigma = BLUR_SIGMA[severity - 1] * 32
        radius = math.ceil(3 * sigma)
        r = torch.arange(-radius, radius + 1, dtype=torch.float32)
        weights = torch.exp(-(r**2) / (2 * sigma**2))
        weights = weights / weights.sum()
        padded = F.pad(IMAGES, (radius,) * 4, mode="reflect")
        rows = F.conv2d(padded, weights.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        expected = F.conv2d(rows, weights.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        torch.testing.assert_close(blur(IMAGES, severity), expected, atol=1e-5, rtol=0)


def test_contrast_inversion_rotation_and_crop_by_hand():
    mean = IMAGES.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast(IMAGES, 3), mean + 0.2 * (IMAGES - mean))
    torch.testing.assert_close(inversion(IMAGES, 3), -IMAGES)
    torch.testing.assert_close(inversion(IMAGES, 1), -0.4 * IMAGES)
    assert torch.equal(rotation(IMAGES, 3), IMAGES.transpose(-2, -1).flip(-2))  # 90 degrees counter-clockwise
    corners = rotation(torch.ones(1, 3, 32, 32), 1)
    assert corners[..., 0, 0].eq(-1).all() and corners[..., 16, 16].eq(1).all()  # filled black, centre kept
    # a linear ramp stays a ramp, centred, its slope per pixel halved: 50 % of the side zoomed 2x
    ramp = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32)
    zoomed = crop_and_zoom(ramp, 3)[0, 0, 0]
    assert float(zoomed[20] - zoomed[10]) / 10 == pytest.approx((2 / 31) / 2, rel=1e-4)
    assert float(zoomed[15] + zoomed[16]) == pytest.approx(0.0, abs=1e-6)


def test_jpeg_is_a_real_jpeg_round_trip():
    pixels = ((IMAGES[:1] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=5)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    expected = torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1
    # two libjpeg encoders (PIL's and torchvision's): the same quantisation, rounding may differ by a level
    assert (jpeg(IMAGES[:1], 3)[0] - expected).abs().mean() < 2 / 255
    losses = [float((jpeg(IMAGES, s) - IMAGES).abs().mean()) for s in (1, 2, 3)]
    assert losses[0] < losses[1] < losses[2]
