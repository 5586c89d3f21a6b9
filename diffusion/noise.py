"""The shared (eps, t) pairs of the diffusion classifier (paper sec. 2.2), drawn on the denoiser's device.

Reproducibility contract: every number of the pair (eps_k, t_k) of image i is a function of
(seed, id_i, k) and its position alone, so an image gets the same pairs, hence the same errors and
votes, whatever the batch it sits in, the data order, the number of processes, the chunking of its
steps or an early exit. The same pairs serve every class (the classes differ only by the label).

How: a counter-based generator. Each pair has a 64-bit key, a splitmix64 hash of (seed, id, step);
element j of its noise is Box-Muller on two 24-bit uniforms, hashes of (key, j) with Wellons'
lowbias32 integer mixer. Every pair and element is computed at once in a few tensor ops on the
device the denoiser runs on: no Python loop per pair and no noise copied from the host.

Why our own scheme rather than torch's generators: a torch.Generator is a stream, so one stream
per (image, step) means one generator call per pair (measured 0.94 ms per pair on one CPU core
at the paper's 12 x 128 x 128, 0.47 s per image at N = 501, then ~400 MB per image to copy to the
GPU), and CUDA's Philox offsets advance with the kernel's launch shape, so pairs drawn together
would differ from the same pairs drawn one by one. A hash of the counter gives every value its
own address.

Across device types: the integer hashing is exact everywhere (int32 and int64 products wrap the
same way on CPU and GPU), so t and the uniforms behind eps are bit for bit the same on every
device; eps passes through log, sqrt, cos and sin, whose last bits may differ between the CPU's
and CUDA's math libraries (relative differences of order 1e-7). Same device type and seed: the
same pairs, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# 64-bit constants as signed int64 (torch has no uint64 arithmetic); products wrap modulo 2**64.
_GOLDEN64 = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX64_A = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX64_B = 0x94D049BB133111EB - (1 << 64)
_ID_FACTOR = _MIX64_A
_STEP_FACTOR = _MIX64_B
# 32-bit constants of lowbias32 and the Weyl increment, as signed int32
_MIX32_A = 0x7FEB352D
_MIX32_B = 0x846CA68B - (1 << 32)
_GOLDEN32 = 0x9E3779B9 - (1 << 32)
_SECOND_UNIFORM = 0x5BD1E995
_TIME_SALT = 0x2545F491
_UNIFORM_BITS = 24  # float32 holds 24-bit integers exactly


def _shift_right(x: Tensor, bits: int, width: int) -> Tensor:
    """Logical right shift of `width`-bit values held in signed integers (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (width - bits)) - 1)


def _wrap64(value: int) -> int:
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


def pair_keys(ids: Tensor, steps: Tensor, seed: int) -> Tensor:
    """int64 keys of image ids and step indices (broadcast against each other): splitmix64 of (seed, id, step).

    Steps >= 0 are the classification's; negative ones name other streams of the same image
    (explanations, the strata order), which can therefore never share a key with a real step."""
    steps = steps.to(ids.device, torch.int64)
    key = _wrap64(seed * _GOLDEN64) + ids.to(torch.int64) * _ID_FACTOR + steps * _STEP_FACTOR
    key = (key ^ _shift_right(key, 30, 64)) * _MIX64_A
    key = (key ^ _shift_right(key, 27, 64)) * _MIX64_B
    return key ^ _shift_right(key, 31, 64)


def _mix32(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Wellons' lowbias32 on int32, in place: a bijection of 32-bit values that mixes every bit.
    `scratch`, an int32 tensor of x's shape, saves allocating one per shift (large x: most of the cost)."""
    scratch = torch.empty_like(x) if scratch is None else scratch
    for shift, factor in ((16, _MIX32_A), (15, _MIX32_B), (16, None)):
        torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(scratch)
        if factor is not None:
            x.mul_(factor)
    return x


def _low_and_high(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The two 32-bit halves of int64 keys, as int32 (wrapping)."""
    low = (keys & 0xFFFFFFFF).to(torch.int32)  # values >= 2**31 wrap to negative: the same 32 bits
    return low, _shift_right(keys, 32, 64).to(torch.int32)


def _key_streams(keys: Tensor) -> Tensor:
    """One 32-bit stream number per 64-bit key, from both halves of it."""
    low, high = _low_and_high(keys)
    return _mix32(low ^ _mix32(high ^ _TIME_SALT))


def _unit_interval(bits: Tensor, offset: float, out: Tensor | None = None) -> Tensor:
    """24 of the 32 hashed bits -> float32 in [0, 1): (integer + offset) / 2**24 (bits are overwritten)."""
    bits.bitwise_right_shift_(32 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    out = torch.empty(bits.shape, dtype=torch.float32, device=bits.device) if out is None else out
    return out.copy_(bits).add_(offset).mul_(2.0**-_UNIFORM_BITS)


def uniform_times(keys: Tensor) -> Tensor:
    """One t in [0, 1) per key (any shape)."""
    return _unit_interval(_mix32(_key_streams(keys) ^ _SECOND_UNIFORM), 0.0)


def normals(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(*keys.shape, *shape) standard normals: element j of key k is a function of (k, j) alone.

    Element pair j of a key is Box-Muller on two uniforms: lowbias32 of (golden-ratio counter j XOR
    the key's stream number), and lowbias32 of that. The XOR (not a sum) matters: with a sum, two
    keys whose stream numbers differ by a multiple of the counter step would give shifted copies
    of each other's noise; with XOR two keys share only a few scattered values by chance.
    """
    size = math.prod(shape)
    half = (size + 1) // 2
    streams = _key_streams(keys.reshape(-1, 1))
    first = (torch.arange(half, dtype=torch.int32, device=keys.device) * _GOLDEN32) ^ streams
    scratch = torch.empty_like(first)
    _mix32(first, scratch)
    second = _mix32(torch.bitwise_xor(first, _SECOND_UNIFORM), scratch)
    radius = _unit_interval(first, 0.5).log_().mul_(-2.0).sqrt_()  # the +0.5 keeps log away from 0
    angle = _unit_interval(second, 0.0).mul_(2.0 * math.pi)
    out = torch.empty(len(streams), 2 * half, device=keys.device)
    torch.cos(angle, out=out[:, :half]).mul_(radius)
    torch.sin(angle, out=out[:, half:]).mul_(radius)
    return out[:, :size].reshape(*keys.shape, *shape)


def image_keys(images: Tensor) -> Tensor:
    """(B,) int64 noise keys of images (B, C, H, W) in [-1, 1]: a digest of the image's content alone.

    Keying the (eps, t) pairs by the image rather than by its row in a folder or CSV gives an image
    the same pairs, hence the same votes, entropy and refusal, whatever else is listed with it, in
    whatever order, under whatever folder name (two identical files are still two rows: their row ids
    differ, only their noise is shared). The pixels are quantised to 8 bits first, so the key of an
    image decoded from an 8-bit file survives a cast to float16 or bfloat16; every element's
    hash goes into an integer sum (exact and order-free, so the same on every device and reduction
    order), twice with different mixers for 64 bits, then splitmix64. Non-negative, as data ids are.
    """
    levels = ((images.detach().float().flatten(1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.int32)
    size = levels.shape[1]
    position = torch.arange(size, dtype=torch.int32, device=images.device).mul_(_GOLDEN32)
    hashed = _mix32(levels ^ _mix32(position ^ _TIME_SALT))
    low = hashed.to(torch.int64).sum(dim=1)
    high = _mix32(hashed ^ _SECOND_UNIFORM).to(torch.int64).sum(dim=1)
    keys = pair_keys(low * _ID_FACTOR + high, torch.full_like(low, size), 0)
    return keys & ((1 << 62) - 1)


def shared_noise(ids: Tensor, steps: Tensor | range, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """t of shape (B, S) in [0, 1) and eps of shape (B, S, *shape), on the device of `ids`."""
    steps = torch.as_tensor(list(steps) if isinstance(steps, range) else steps, dtype=torch.int64, device=ids.device)
    keys = pair_keys(ids.reshape(-1, 1), steps, seed)
    return uniform_times(keys), normals(keys, shape)


# Reserved streams: every draw of the suite is a key of (seed, id, step); classification uses seeds
# >= 0, ids of data >= 0 and steps 0 .. N - 1, so these never meet a classification pair.
EXPLANATION_STEP = -1  # the stream of an image's explanation noise (further draws: -2, -3, ...)
STRATA_STEPS = -(1 << 40)  # and below: the keys that order an image's strata, far from any draw
VALIDATION_LOSS_SEED = -1  # the noise of fit's validation loss, one (t, eps) per image
SAMPLES_FROM_NOISE_ID = -1_000_000  # and above: the ids of the monitoring samples drawn from pure noise


def stratified_times(ids: Tensor, num_steps: int, seed: int) -> Tensor:
    """(B, N) times, step k of image i in stratum order[i, k] of [0, 1) cut into N: one t per stratum.

    The order is the argsort of keys of (seed, id, STRATA_STEPS - s), so it is the image's own,
    whatever else is classified with it; within its stratum t_k is step k's own uniform time,
    shrunk into the stratum."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    strata = torch.arange(num_steps, device=ids.device)
    column = ids.reshape(-1, 1)
    order = pair_keys(column, STRATA_STEPS - strata, seed).argsort(dim=1, stable=True)
    within = uniform_times(pair_keys(column, strata, seed)).double()  # float64: t stays inside its stratum
    return (order + within) / num_steps
