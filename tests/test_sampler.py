"""The guided DDIM sampler against closed forms: identity at t0 = 0, the plain conditional DDIM
written out independently, exact recovery with an oracle denoiser, and the probability-flow map of
Gaussian data."""

import math

import pytest
import torch

from diffusion.sampler import ddim_sample, guided_velocity, noise_to, sampling_times
from diffusion.schedule import ShiftedCosineSchedule
from tests.helpers.models import LabelledLinear

SCHEDULE = ShiftedCosineSchedule(image_size=8)
NULL = 2  # LabelledLinear's null label: two classes


def alpha_sigma(t: float):
    lam = float(SCHEDULE.logsnr(torch.tensor([t], dtype=torch.float64)))
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def test_t0_zero_or_no_steps_returns_the_input_unchanged():
    z = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([0, 1])
    assert ddim_sample(LabelledLinear(), z, labels, SCHEDULE, 0.0, 10, 7.5, NULL) is z
    assert ddim_sample(LabelledLinear(), z, labels, SCHEDULE, 0.5, 0, 7.5, NULL) is z
    assert noise_to(z, torch.randn_like(z), 0.0, SCHEDULE) is z


def test_zero_guidance_equals_the_plain_conditional_ddim_written_out():
    torch.manual_seed(0)
    model, z0 = LabelledLinear(), torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 1, 1])
    steps, t_start = 7, 0.6
    sampled = ddim_sample(model, z0, labels, SCHEDULE, t_start, steps, guidance_scale=0.0, null_label=NULL)
    # reference: eta = 0 DDIM from the eps/x parameterisation, one time at a time
    z, x_hat = z0.double(), None
    times = [t_start * (1 - k / steps) for k in range(steps + 1)]
    for t_now, t_next in zip(times[:-1], times[1:]):
        a, s = alpha_sigma(t_now)
        a_next, s_next = alpha_sigma(t_next)
        v = model(z.float(), torch.full((3,), t_now), labels).double()
        x_hat = a * z - s * v
        eps_hat = (z - a * x_hat) / s
        z = a_next * x_hat + s_next * eps_hat
    torch.testing.assert_close(sampled.double(), x_hat, atol=1e-4, rtol=1e-4)


def test_guidance_mixes_conditional_and_unconditional_as_paper_eq_5():
    model, z = LabelledLinear(), torch.randn(2, 3, 8, 8)
    t, labels, w = torch.tensor([0.3, 0.7]), torch.tensor([1, 0]), 7.5
    expected = (1 + w) * model(z, t, labels) - w * model(z, t, torch.full_like(labels, NULL))
    torch.testing.assert_close(guided_velocity(model, z, t, labels, w, NULL), expected)
    torch.testing.assert_close(guided_velocity(model, z, t, labels, w, NULL, max_batch=1), expected)
    torch.testing.assert_close(guided_velocity(model, z, t, labels, 0.0, NULL), model(z, t, labels))


@pytest.mark.parametrize("steps", [1, 4, 64])
@pytest.mark.parametrize("guidance", [0.0, 7.5])
def test_a_denoiser_that_predicts_the_true_v_recovers_the_clean_image(steps, guidance):
    clean = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 4 - 2  # wavelet range, never clipped

    def oracle(z, t, labels):  # v = alpha*eps - sigma*x with eps implied by z and the clean image
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in SCHEDULE.alpha_sigma(t.double()))
        target = clean.repeat(len(z) // len(clean), 1, 1, 1)  # guidance stacks [cond; uncond] rows
        eps = (z - alpha * target) / sigma
        return alpha * eps - sigma * target

    eps = torch.randn_like(clean)
    z = noise_to(clean, eps, 0.8, SCHEDULE)
    sampled = ddim_sample(oracle, z, torch.tensor([0, 1]), SCHEDULE, 0.8, steps, guidance, NULL)
    # float32 times in the sampler vs float64 in the oracle: agreement to ~1e-7
    torch.testing.assert_close(sampled, clean, atol=1e-6, rtol=0)


def test_deterministic_ddim_follows_the_probability_flow_of_gaussian_data():
    """For data x ~ N(mu_c, s^2) per class, the optimal v is known in closed form and the probability
    flow ODE maps z_1 to x = mu_c + s * (z_1 - alpha_1 mu_c) / sqrt(alpha_1^2 s^2 + sigma_1^2)."""
    mu = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)  # class 0, class 1, null (the mixture is ignored)
    spread = 0.3

    def optimal_v(z, t, labels):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in SCHEDULE.alpha_sigma(t.double()))
        m = mu[labels].view(-1, 1, 1, 1)
        x_mean = m + alpha * spread**2 / (alpha**2 * spread**2 + sigma**2) * (z - alpha * m)
        eps_mean = (z - alpha * x_mean) / sigma
        return alpha * eps_mean - sigma * x_mean

    labels = torch.tensor([0, 1, 0, 1])
    z1 = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a1, s1 = alpha_sigma(1.0)
    m = mu[labels].view(-1, 1, 1, 1)
    expected = m + spread * (z1 - a1 * m) / math.sqrt(a1**2 * spread**2 + s1**2)
    errors = {
        steps: (ddim_sample(optimal_v, z1, labels, SCHEDULE, 1.0, steps, 0.0, NULL) - expected).abs().max().item()
        for steps in (200, 400, 800)
    }
    assert errors[800] < 3e-3, errors
    # DDIM is a first-order ODE solver: doubling the steps halves the error
    assert 0.4 < errors[400] / errors[200] < 0.6 and 0.4 < errors[800] / errors[400] < 0.6, errors


def test_sampling_times_run_from_t0_to_zero():
    times = sampling_times(0.5, 4)
    torch.testing.assert_close(times, torch.tensor([0.5, 0.375, 0.25, 0.125, 0.0]))


def test_bad_arguments_are_refused():
    z, labels = torch.randn(1, 3, 8, 8), torch.tensor([0])
    with pytest.raises(ValueError, match="t_start"):
        ddim_sample(LabelledLinear(), z, labels, SCHEDULE, 1.5, 4)
    with pytest.raises(ValueError, match="null label"):
        ddim_sample(LabelledLinear(), z, labels, SCHEDULE, 0.5, 4, guidance_scale=2.0)
