import math

import numpy as np
import pytest
import torch

from diffusion.loss import discriminative_loss, drop_labels, min_snr_weight, training_times, weighted_v_loss
from diffusion.parameterization import diffuse, eps_from_v, v_target, x_from_v
from diffusion.schedule import ShiftedCosineSchedule, broadcast_like


def test_min_snr_weight_matches_the_formula():
    logsnr = torch.linspace(-10, 10, 41, dtype=torch.float64)
    snr = np.exp(logsnr.numpy())
    expected = np.minimum(snr, 5.0) / (snr + 1.0)
    np.testing.assert_allclose(min_snr_weight(logsnr, 5.0).numpy(), expected, rtol=1e-12)
    # below gamma the weight is snr / (snr + 1) = alpha^2; far above it decays like gamma / snr
    assert min_snr_weight(torch.tensor(0.0), 5.0).item() == pytest.approx(0.5)


def test_min_snr_v_weight_equals_x_weight_through_the_parameterization():
    # the v-loss weight w_v must satisfy w_v * |v - v_hat|^2 = min(snr, gamma) * |x - x_hat|^2
    torch.manual_seed(0)
    x, eps, v_hat = torch.randn(3, 3, 2, 4, 4, dtype=torch.float64)
    logsnr = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    alpha, sigma = broadcast_like(torch.sigmoid(logsnr).sqrt(), x), broadcast_like(torch.sigmoid(-logsnr).sqrt(), x)
    z = diffuse(x, eps, alpha, sigma)
    v_error = (v_hat - v_target(x, eps, alpha, sigma)).pow(2).flatten(1).mean(1)
    x_error = (x_from_v(z, v_hat, alpha, sigma) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(min_snr_weight(logsnr) * v_error, torch.clamp(logsnr.exp(), max=5.0) * x_error)


def test_weighted_v_loss_reduces_to_mse_without_gamma():
    v_pred, v_true = torch.randn(2, 4, 3, 8, 8)
    logsnr = torch.randn(4)
    torch.testing.assert_close(
        weighted_v_loss(v_pred, v_true, logsnr, gamma=None), torch.nn.functional.mse_loss(v_pred, v_true)
    )
    per_sample = (v_pred - v_true).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(
        weighted_v_loss(v_pred, v_true, logsnr, 5.0), (per_sample * min_snr_weight(logsnr)).mean()
    )


def test_v_eps_x_conversions_round_trip():
    torch.manual_seed(1)
    x, eps = torch.randn(2, 5, 12, 8, 8, dtype=torch.float64)
    alpha, sigma = (
        broadcast_like(s, x) for s in ShiftedCosineSchedule(8).alpha_sigma(torch.rand(5, dtype=torch.float64))
    )
    z = diffuse(x, eps, alpha, sigma)
    v = v_target(x, eps, alpha, sigma)
    torch.testing.assert_close(x_from_v(z, v, alpha, sigma), x)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps)
    torch.testing.assert_close(v_target(x_from_v(z, v, alpha, sigma), eps_from_v(z, v, alpha, sigma), alpha, sigma), v)


def test_label_dropout_rate_and_null_label():
    labels = torch.randint(0, 3, (200_000,))
    dropped = drop_labels(labels, null_label=3, p=0.1, generator=torch.Generator().manual_seed(0))
    rate = (dropped == 3).double().mean().item()
    # 5 standard deviations of a binomial(200k, 0.1) proportion: 0.0034
    assert abs(rate - 0.1) < 5 * (0.1 * 0.9 / labels.numel()) ** 0.5
    kept = dropped != 3
    assert torch.equal(dropped[kept], labels[kept])
    assert drop_labels(labels, null_label=3, p=0.0) is labels


def test_training_times_draw_a_share_of_the_batch_from_the_band_and_the_rest_from_all_of_t():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    everywhere = training_times(n, generator=generator)  # the paper's: uniform on [0, 1]
    assert 0.49 < float((everywhere < 0.5).float().mean()) < 0.51
    banded = training_times(n, (0.2, 0.6), share=1.0, generator=generator)
    assert banded.min() >= 0.2 and banded.max() <= 0.6
    assert abs(float(banded.mean()) - 0.4) < 0.005  # uniform inside the band
    mixed = training_times(n, (0.2, 0.6), share=0.5, generator=generator)
    outside = float(((mixed < 0.2) | (mixed > 0.6)).float().mean())
    # half from the band, half uniform on [0, 1] of which 60 % falls outside the band: 0.5 * 0.6 = 0.3 outside
    assert abs(outside - 0.3) < 0.015


def test_the_discriminative_loss_is_the_cross_entropy_of_the_relative_errors_by_hand():
    errors, tau = torch.tensor([[0.10, 0.12], [0.30, 0.27]], dtype=torch.float64), 0.02
    labels = torch.tensor([0, 0])
    expected = []
    for right, wrong in errors.tolist():  # label 0 each: logits -e / mean(e) / tau
        mean = (right + wrong) / 2
        logits = (-right / mean / tau, -wrong / mean / tau)
        expected.append(-logits[0] + math.log(math.exp(logits[0]) + math.exp(logits[1])))
    loss = discriminative_loss(errors, labels, tau)
    assert float(loss) == pytest.approx(sum(expected) / 2, rel=1e-12)
    # relative errors: the error's scale at a given t does not change it
    assert float(discriminative_loss(10 * errors, labels, tau)) == pytest.approx(float(loss), rel=1e-12)
