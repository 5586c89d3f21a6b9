import math

import pytest
import torch

from diffusion.schedule import ShiftedCosineSchedule

T = torch.linspace(0, 1, 1001, dtype=torch.float64)


@pytest.mark.parametrize("size", [16, 64, 128])
def test_variance_preserving(size):
    alpha, sigma = ShiftedCosineSchedule(size).alpha_sigma(T)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T), atol=1e-12, rtol=0)


def test_logsnr_is_strictly_decreasing_and_finite():
    lam = ShiftedCosineSchedule(128).logsnr(T)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all()


def test_logsnr_matches_the_closed_form_inside_the_clamp():
    schedule = ShiftedCosineSchedule(128, base=64)
    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=torch.float64)
    angle = schedule.t_min + t * (schedule.t_max - schedule.t_min)
    expected = -2 * torch.log(torch.tan(angle)) + 2 * math.log(64 / 128)
    torch.testing.assert_close(schedule.logsnr(t), expected)
    # the remap is symmetric, so the midpoint is exactly the shift (lam = 0 unshifted)
    assert schedule.logsnr(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(
        2 * math.log(0.5), abs=1e-12
    )
    # and the remap barely moves t: within 1e-3 of the unclamped cosine schedule
    unclamped = -2 * torch.log(torch.tan(math.pi * t / 2)) + 2 * math.log(0.5)
    assert (schedule.logsnr(t) - unclamped).abs().max() < 1e-2


def test_shift_is_two_log_base_over_size_at_every_t():
    base = ShiftedCosineSchedule(64, base=64).logsnr(T)
    for size in (16, 32, 128, 256):
        shifted = ShiftedCosineSchedule(size, base=64).logsnr(T)
        torch.testing.assert_close(shifted - base, torch.full_like(T, 2 * math.log(64 / size)))


def test_clamped_range():
    lam = ShiftedCosineSchedule(64).logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([15.0, -15.0], dtype=torch.float64))


def test_float32_input_gives_float32_output():
    assert ShiftedCosineSchedule(64).logsnr(torch.rand(4)).dtype == torch.float32


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="image_size"):
        ShiftedCosineSchedule(0)
