import numpy as np
import pytest
import pywt
import torch

from diffusion.wavelet import GreyscaleTransform, HaarWavelet, IdentityTransform


def pywt_bands(images: torch.Tensor) -> np.ndarray:
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(images.numpy(), "haar", axes=(-2, -1))
    return np.concatenate([approx, horizontal, vertical, diagonal], axis=1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 4, 6), (3, 3, 32, 32)])
def test_forward_matches_pywt(shape):
    images = torch.rand(shape, dtype=torch.float64) * 2 - 1
    coefficients = HaarWavelet().double().encode(images)
    assert coefficients.shape == (shape[0], 4 * shape[1], shape[2] // 2, shape[3] // 2)
    np.testing.assert_allclose(coefficients.numpy(), pywt_bands(images), atol=1e-6)


def test_float32_forward_matches_pywt_within_1e_6():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    np.testing.assert_allclose(HaarWavelet().encode(images).numpy(), pywt_bands(images.double()), atol=1e-6)


def test_inverse_matches_pywt_and_round_trips():
    coefficients = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    channels = 3
    bands = [coefficients[:, i * channels : (i + 1) * channels].numpy() for i in range(4)]
    reference = pywt.idwt2((bands[0], tuple(bands[1:])), "haar", axes=(-2, -1))
    wavelet = HaarWavelet().double()
    np.testing.assert_allclose(wavelet.decode(coefficients).numpy(), reference, atol=1e-6)
    images = torch.rand(2, 3, 10, 14, dtype=torch.float64)
    torch.testing.assert_close(wavelet.decode(wavelet.encode(images)), images, atol=1e-12, rtol=0)


def test_low_band_of_ones_is_two_so_never_clip_wavelet_space():
    coefficients = HaarWavelet().encode(torch.ones(1, 3, 4, 4))
    assert torch.allclose(coefficients[:, :3], torch.full_like(coefficients[:, :3], 2.0))
    assert torch.allclose(coefficients[:, 3:], torch.zeros_like(coefficients[:, 3:]), atol=1e-7)


def test_odd_side_is_refused():
    with pytest.raises(ValueError, match="even"):
        HaarWavelet().encode(torch.zeros(1, 3, 7, 8))


def test_identity_transform_when_the_wavelet_is_off():
    images = torch.randn(2, 3, 8, 8)
    assert IdentityTransform().encode(images) is images
    assert IdentityTransform().decode(images) is images


def test_greyscale_transform_models_the_channel_mean_and_paints_no_colour():
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    grey = GreyscaleTransform(HaarWavelet().double(), channels=3)
    coefficients = grey.encode(images)
    assert coefficients.shape == (2, 4, 4, 4)  # 4 bands of one channel, not 12
    np.testing.assert_allclose(coefficients.numpy(), pywt_bands(images.mean(dim=1, keepdim=True)), atol=1e-12)
    decoded = grey.decode(coefficients)
    assert decoded.shape == images.shape
    assert torch.equal(decoded[:, 0], decoded[:, 1]) and torch.equal(decoded[:, 1], decoded[:, 2])  # grey stays grey
    grey_images = images[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(grey.decode(grey.encode(grey_images)), grey_images)  # exact for grey input


def test_a_grayscale_diffusion_classifier_sees_one_channel():
    from lightning_modules import DiffusionClassifier
    from tests.helpers.models import LabelledLinear

    built = []

    def network(num_classes, channels, size):
        built.append((num_classes, channels, size))
        return LabelledLinear(channels)

    model = DiffusionClassifier(network, image_size=16, grayscale=True)
    assert built == [(2, 4, 8)]  # 1 channel x 4 wavelet bands at half the side
    assert model.encode(torch.rand(3, 3, 16, 16)).shape == (3, 4, 8, 8)
