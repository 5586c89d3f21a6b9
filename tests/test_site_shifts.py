"""Simulated site shifts (datamodules/site_shifts.py) against closed forms and second code paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.site_shifts import (
    COLLIMATION,
    COLLIMATION_JITTER,
    FONT,
    RESOLUTION_FACTOR,
    SITE_SHIFTS,
    WINDOW,
    _rendered,
    burned_in_text,
    collimation,
    field_of_view,
    gamma,
    resolution,
    site_shift,
    windowing,
)


def _smooth(batch: int = 4, channels: int = 3, side: int = 32) -> torch.Tensor:
    """Greyscale-like images in [-0.8, 0.8]: a bright blob on a gradient with a few ribs, no pixel at -1 or +1."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    shifts = torch.linspace(-0.3, 0.3, batch)[:, None, None]
    image = 0.5 * torch.exp(-2 * ((x - shifts) ** 2 + y**2)) + 0.2 * torch.sin(6 * y) + 0.1 * x - 0.2
    return image[:, None].expand(batch, channels, side, side).clamp(-0.8, 0.8).contiguous()


IMAGES = _smooth()


@pytest.mark.parametrize("kind", list(SITE_SHIFTS))
@pytest.mark.parametrize("severity", [1, 2, 3])
@pytest.mark.parametrize("channels, side", [(3, 28), (1, 32)])
def test_every_shift_keeps_shape_dtype_range_and_greyscale(kind, severity, channels, side):
    images = _smooth(2, channels, side)
    out = site_shift(images, kind, severity)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(out, out[:, :1].expand_as(out))  # greyscale stays greyscale


@pytest.mark.parametrize("kind", list(SITE_SHIFTS))
def test_every_shift_is_deterministic_for_a_seed(kind):
    assert torch.equal(site_shift(IMAGES, kind, 2, seed=3), site_shift(IMAGES, kind, 2, seed=3))
    if kind in ("collimation", "burned_in_text"):  # the two that draw at random
        assert not torch.equal(site_shift(IMAGES, kind, 2, seed=3), site_shift(IMAGES, kind, 2, seed=4))


@pytest.mark.parametrize("kind", list(SITE_SHIFTS))
def test_every_shift_changes_the_image_more_at_higher_severity(kind):
    changes = [float((site_shift(IMAGES, kind, s) - IMAGES).abs().mean()) for s in (1, 2, 3)]
    assert changes[0] > 1e-3
    assert changes[0] < changes[1] < changes[2]


def test_unknown_kind_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown site shift 'fog'.*'resolution'.*'burned_in_text'"):
        site_shift(IMAGES, "fog", 1)
    for kind in SITE_SHIFTS:
        with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3\)"):
            site_shift(IMAGES, kind, 4)


def test_gamma_is_the_closed_form():
    for severity, g in zip((1, 2, 3), (0.75, 0.6, 0.45)):  # the values the docstring names
        torch.testing.assert_close(gamma(IMAGES, severity), ((IMAGES + 1) / 2) ** g * 2 - 1)
    ends = gamma(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3), 3).flatten()
    assert ends[0] == -1.0 and ends[2] == 1.0 and ends[1] > 0.0  # black and white kept, mid-tones brighter


def test_windowing_clips_and_stretches_its_window():
    ramp = torch.linspace(-1, 1, 201).view(1, 1, 1, -1)
    for severity, kept in zip((1, 2, 3), (0.85, 0.70, 0.55)):
        lo, hi = WINDOW[severity - 1]
        assert hi - lo == pytest.approx(kept) and 0 <= lo < hi <= 1
        # piecewise, written apart: black below the window, white above, a straight line through it
        level = (ramp + 1) / 2
        inside = 2 * (level - lo) / (hi - lo) - 1
        expected = torch.where(level <= lo, -1.0, torch.where(level >= hi, 1.0, inside))
        torch.testing.assert_close(windowing(ramp, severity), expected)
        assert windowing(ramp, severity).diff().min() >= 0  # grey levels keep their order


def test_field_of_view_centres_a_downscaled_copy_on_black():
    for severity, fraction in zip((1, 2, 3), (0.85, 0.75, 0.65)):
        out = field_of_view(IMAGES, severity)
        inside = out[0, 0] > -1.0  # the input has no black pixel, so the copy is where the output is not black
        rows, columns = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        size = round(32 * fraction)
        assert len(rows) == len(columns) == size and inside.sum() == size * size
        assert abs(int(rows[0]) - (31 - int(rows[-1]))) <= 1 and abs(int(columns[0]) - (31 - int(columns[-1]))) <= 1
        box = out[..., rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        expected = F.interpolate(IMAGES, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(box, expected)
        assert out.eq(-1.0).sum() == IMAGES.numel() - IMAGES.shape[0] * 3 * size * size


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_collimation_blackens_the_borders_and_keeps_the_centre(side, severity):
    images = _smooth(8, 3, side)
    out = collimation(images, severity, seed=1)
    fraction = COLLIMATION[severity - 1]
    black = math.floor(fraction * (1 - COLLIMATION_JITTER) * side)  # always covered, whatever the draw
    kept = math.ceil(fraction * (1 + COLLIMATION_JITTER) * side)  # never covered
    assert black >= 1
    for band in (out[..., :black, :], out[..., -black:, :], out[..., :black], out[..., -black:]):
        assert band.eq(-1.0).all()
    assert torch.equal(out[..., kept:-kept, kept:-kept], images[..., kept:-kept, kept:-kept])
    assert (out <= images).all()  # the band edge's penumbra only darkens
    top_rows = out[:, 0, :, side // 2].eq(-1.0).sum(-1)
    assert len(set(top_rows.tolist())) > 1  # each image its own collimator


def test_resolution_keeps_constants_and_coarse_blocks():
    for value in (-1.0, 0.3, 1.0):
        torch.testing.assert_close(resolution(torch.full((1, 3, 28, 28), value), 3), torch.full((1, 3, 28, 28), value))
    generator = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 1, 4, 4, generator=generator) * 1.6 - 0.8
    image = blocks.repeat_interleave(12, -2).repeat_interleave(12, -1).expand(1, 3, 48, 48)
    pixels = torch.rand(1, 3, 48, 48, generator=generator) * 1.6 - 0.8
    offset = torch.arange(48) % 12
    to_edge = torch.minimum(offset, 11 - offset)
    to_edge = torch.minimum(to_edge[:, None], to_edge[None, :])  # pixels from the nearest block edge
    for severity, factor in zip((1, 2, 3), RESOLUTION_FACTOR):
        change = (resolution(image, severity) - image).abs()
        assert change[..., to_edge > factor].max() < 1e-6  # only a detector pixel's reach from an edge moves
        assert change.mean() < 0.2 * (resolution(pixels, severity) - pixels).abs().mean()


def test_burned_in_text_only_brightens_a_small_growing_fraction():
    images = _smooth(8, 3, 64)
    fractions = []
    for severity in (1, 2, 3):
        out = burned_in_text(images, severity, seed=2)
        assert (out >= images).all()
        fractions.append(float((out > images).float().mean()))
    assert 0.002 < fractions[0] < fractions[1] < fractions[2] < 0.1
    # strokes a few pixels wide are full white; at 64 pixels they are thinner than a pixel, so grey
    assert burned_in_text(_smooth(1, 1, 256), 3).eq(1.0).any() and not burned_in_text(images, 1).eq(1.0).any()


def test_glyphs_are_the_dot_matrix_enlarged_by_nearest_neighbour():
    def bitmap(char):
        return torch.tensor([[float(bit) for bit in row] for row in FONT[char].split()])

    gap = torch.zeros(7, 1)
    expected = torch.kron(torch.cat([bitmap("L"), gap, bitmap("R")], 1), torch.ones(3, 3))
    assert torch.equal(_rendered("LR", 21), expected)
    assert all(len(rows) == 7 * 6 - 1 and set(rows) <= {"0", "1", " "} for rows in FONT.values())
