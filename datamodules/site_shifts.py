"""Simulated site shifts at three severities: the images a second hospital would send, without downloading any.

The corruptions (datamodules/corruptions.py) damage images; a new site instead images the same anatomy with
another detector, another processing curve and window, another field of view and collimation, and burns its own
annotations in. These shifts are plausible on purpose: they measure whether an out-of-distribution warning
sees a new site before its accuracy drops (the "Shift that a second hospital brings" notes of shared/DESIGN.md).

Every function takes images (B, C, H, W) in [-1, 1], as every datamodule gives them, a severity 1, 2 or 3 (3 the
strongest) and a seed, and returns images of the same shape, dtype and device in [-1, 1]. Spatial strengths are
fractions of the image side, so a severity means the same at 28 and at 256 pixels. Every shift acts on all channels
alike, so greyscale X-rays (three identical channels) stay greyscale. Where a shift draws at random (band widths,
text and its place) it draws from a generator seeded by `seed`, per call, so a seed gives the same images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.corruptions import SEVERITIES, _level, apply_named

__all__ = [  # SEVERITIES is re-exported: the same three levels as the corruptions
    "SEVERITIES",
    "SITE_SHIFTS",
    "burned_in_text",
    "collimation",
    "field_of_view",
    "gamma",
    "resolution",
    "site_shift",
    "windowing",
]

RESOLUTION_FACTOR = (1.5, 2.0, 3.0)  # the detector's pixel pitch, in pixels of the image
GAMMA = (0.75, 0.6, 0.45)  # u ** gamma on [0, 1]: below 1 brightens the mid-tones, ends kept
WINDOW = ((0.09, 0.94), (0.17, 0.87), (0.25, 0.80))  # [lo, hi] of [0, 1] kept: 85, 70, 55 %, a little off-centre
FIELD_OF_VIEW = (0.85, 0.75, 0.65)  # the fraction of the side the whole image shrinks to
COLLIMATION = (0.06, 0.10, 0.15)  # the band on each edge, as a fraction of the side
COLLIMATION_JITTER = 0.2  # each band's width varies by up to +-20 % of it, per image and edge
TEXT_HEIGHT = (0.045, 0.06, 0.075)  # of the side: the glyph height of the annotation line
TEXT_CHARACTERS = (4, 8, 12)  # characters in the annotation line
MARKER_HEIGHT = (0.08, 0.1, 0.12)  # of the side: the laterality marker in a corner
TEXT_MARGIN = 0.04  # of the side: text keeps off the edge, as a technologist places it

# 5 x 7 dot-matrix glyphs, rows top to bottom: enough for laterality markers, projections and dates
FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "R": "11110 10001 10001 11110 10100 10010 10001",
}
LINE_ALPHABET = "0123456789AP"


def resolution(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Shrunk to 1/1.5, 1/2 or 1/3 of the side (antialiased) and enlarged back (bilinear): a coarser detector."""
    factor = _level(RESOLUTION_FACTOR, severity)
    height, width = images.shape[-2:]
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    # a larger detector element integrates the light over its area: antialiased, not point-sampled; not mode="area",
    # whose windows at a factor of 1.5 are 2 or 3 pixels, unevenly placed: it moved smooth images more than at 2
    small = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)


def gamma(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """((x + 1) / 2) ** g * 2 - 1, g = 0.75, 0.6, 0.45: another scanner's processing curve."""
    unit = ((images + 1.0) / 2.0).clamp(0.0, 1.0)  # rounding must not hand pow a negative base
    return unit.pow(_level(GAMMA, severity)) * 2.0 - 1.0


def windowing(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """The window [lo, hi] of the [0, 1] range stretched to the full range, the ends saturated."""
    lo, hi = _level(WINDOW, severity)
    unit = (images + 1.0) / 2.0
    return ((unit - lo) / (hi - lo)).clamp(0.0, 1.0) * 2.0 - 1.0


def field_of_view(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """The whole image shrunk to 85, 75 or 65 % of the side (antialiased) and centred on black (-1)."""
    fraction = _level(FIELD_OF_VIEW, severity)
    height, width = images.shape[-2:]
    small_h, small_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    small = F.interpolate(images, size=(small_h, small_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (height - small_h) // 2, (width - small_w) // 2
    out = torch.full_like(images, -1.0)
    out[..., top : top + small_h, left : left + small_w] = small.clamp(-1.0, 1.0)
    return out


def _open_fraction(size: int, near: Tensor, far: Tensor) -> Tensor:
    """(B, size): how much of each pixel lies between a band of `near` pixels at 0 and one of `far` at the end."""
    start = torch.arange(size, dtype=near.dtype, device=near.device)
    # pixels cut by a band's edge are partly covered: a one-pixel penumbra, and a width that is not a whole pixel
    return (start + 1.0 - near[:, None]).clamp(0.0, 1.0) * (size - far[:, None] - start).clamp(0.0, 1.0)


def collimation(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Black (-1) bands over 6, 10 or 15 % of the side at each edge, each band's width +-20 % per image."""
    fraction = _level(COLLIMATION, severity)
    height, width = images.shape[-2:]
    jitter = torch.rand(images.shape[0], 4, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    bands = (fraction * (1.0 + COLLIMATION_JITTER * jitter)).to(images.device)
    rows = _open_fraction(height, bands[:, 0] * height, bands[:, 1] * height)
    columns = _open_fraction(width, bands[:, 2] * width, bands[:, 3] * width)
    open_ = (rows[:, :, None] * columns[:, None, :])[:, None].to(images.dtype)
    return open_ * images - (1.0 - open_)  # exactly x where open, exactly -1 where covered


def _rendered(text: str, height: float) -> Tensor:
    """(h, w) coverage in [0, 1] of `text` in the dot-matrix font, its glyphs `height` pixels tall."""
    rows = [[int(bit) for bit in "0".join(row)] for row in zip(*(FONT[c].split() for c in text))]
    bitmap = torch.tensor(rows, dtype=torch.float32)
    scale = math.ceil(height / 7.0)
    big = bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # crisp nearest-neighbour enlargement
    size = (max(1, round(height)), max(1, round(height * bitmap.shape[1] / 7.0)))
    # area-averaged to the exact size: small images get grey strokes, as a large film's text after downsampling
    return F.interpolate(big[None, None], size=size, mode="area")[0, 0]


def _stamp(canvas: Tensor, glyphs: Tensor, top: int, left: int) -> None:
    h, w = min(glyphs.shape[0], canvas.shape[0] - top), min(glyphs.shape[1], canvas.shape[1] - left)
    region = canvas[top : top + h, left : left + w]
    torch.maximum(region, glyphs[:h, :w], out=region)


def _draw(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=generator))


def _annotation(height: int, width: int, severity: int, generator: torch.Generator) -> Tensor:
    """(H, W) coverage of one image's annotations: a laterality marker in a corner and a line of characters."""
    canvas = torch.zeros(height, width)
    side, margin = min(height, width), round(TEXT_MARGIN * min(height, width))
    marker = _rendered("LR"[_draw(generator, 2)], _level(MARKER_HEIGHT, severity) * side)
    marker_top = margin if _draw(generator, 2) == 0 else max(0, height - margin - marker.shape[0])
    marker_left = margin if _draw(generator, 2) == 0 else max(0, width - margin - marker.shape[1])
    _stamp(canvas, marker, marker_top, marker_left)
    characters = _level(TEXT_CHARACTERS, severity)
    text = "".join(LINE_ALPHABET[_draw(generator, len(LINE_ALPHABET))] for _ in range(characters))
    line = _rendered(text, _level(TEXT_HEIGHT, severity) * side)
    # the line runs along the edge the marker does not use, so that neither hides the other
    line_top = max(0, height - margin - line.shape[0]) if marker_top == margin else margin
    line_left = margin + _draw(generator, max(1, width - 2 * margin - line.shape[1] + 1))
    _stamp(canvas, line, line_top, line_left)
    return canvas


def burned_in_text(images: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Bright (+1) annotations burned in: an L or R marker in a corner and a line of 4, 8 or 12 characters."""
    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]
    coverage = torch.stack([_annotation(height, width, severity, generator) for _ in range(images.shape[0])])
    coverage = coverage[:, None].to(images)
    return (images + coverage * (1.0 - images)).clamp(-1.0, 1.0)  # towards white, never darker


SHIFT_KINDS = (resolution, gamma, windowing, field_of_view, collimation, burned_in_text)
SITE_SHIFTS = {kind.__name__: kind for kind in SHIFT_KINDS}


def site_shift(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """`images` as a second site would give them: `kind` (a key of SITE_SHIFTS) at `severity`."""
    return apply_named(SITE_SHIFTS, "site shift", images, kind, severity, seed)
