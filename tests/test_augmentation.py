"""The baselines' training augmentations (paper Appendix B.2): parameters, shapes, identity at
evaluation, per-image randomness, and each augmentation applied at its probability; the diffusion
classifiers' own (flips and a small affine motion, off by default) against torch's flips, rolls and rot90."""

import math

import pytest
import torch
from torchvision.transforms import v2

from datamodules.augmentation import (
    BatchAugmentation,
    DiffusionAugmentation,
    affine,
    evaluation_augmentation,
    training_augmentation,
)

DRAWS = 2000


def within_binomial_bounds(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    # 5 standard deviations: a correct pipeline fails about once in 2 million runs
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def marker_image(size: int = 16) -> torch.Tensor:
    """An image in [-1, 1] that no flip leaves unchanged: a bright block near the top-left corner."""
    image = -torch.ones(3, size, size)
    image[:, 2:5, 1:3] = 1.0
    return image


@pytest.fixture(autouse=True)
def seeded_single_thread(one_thread):
    # Thousands of tiny per-image ops: a second thread only adds synchronisation (30x slower when
    # the other core is busy).
    torch.manual_seed(0)


def test_the_pipeline_has_the_papers_parameters():
    rotation, hflip, vflip, blur = training_augmentation().transforms
    assert isinstance(rotation, v2.RandomRotation) and list(rotation.degrees) == [-30.0, 30.0]
    assert isinstance(hflip, v2.RandomHorizontalFlip) and hflip.p == 0.5
    assert isinstance(vflip, v2.RandomVerticalFlip) and vflip.p == 0.5
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.5  # "random" blur: our choice, p = 0.5
    (gaussian,) = blur.transforms
    assert isinstance(gaussian, v2.GaussianBlur)
    assert list(gaussian.kernel_size) == [5, 5] and list(gaussian.sigma) == [0.1, 2.0]


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtype_are_kept(channels):
    images = torch.rand(8, channels, 32, 32) * 2 - 1
    out = BatchAugmentation().train()(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5  # rotation fills with -1 (black)


def test_evaluation_is_the_identity():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(evaluation_augmentation()(images), images)
    augmentation = BatchAugmentation().eval()
    assert augmentation(images) is images  # a module in eval mode never augments


def test_every_image_of_a_batch_gets_its_own_draw():
    batch = marker_image().expand(64, -1, -1, -1).contiguous()
    out = BatchAugmentation().train()(batch)
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) > 32  # one draw for the whole batch would give a single distinct image


def test_flips_happen_half_the_time_each_and_independently():
    image = marker_image()
    flips_only = BatchAugmentation(training_augmentation(degrees=0.0, blur_p=0.0)).train()
    out = flips_only(image.expand(DRAWS, -1, -1, -1).contiguous())
    outcomes = {
        "none": image,
        "h": image.flip(-1),
        "v": image.flip(-2),
        "hv": image.flip(-1).flip(-2),
    }
    counts = dict.fromkeys(outcomes, 0)
    for result in out:
        (name,) = [name for name, expected in outcomes.items() if torch.allclose(result, expected, atol=1e-5)]
        counts[name] += 1
    assert within_binomial_bounds(counts["h"] + counts["hv"], DRAWS, 0.5)
    assert within_binomial_bounds(counts["v"] + counts["hv"], DRAWS, 0.5)
    assert within_binomial_bounds(counts["hv"], DRAWS, 0.25)  # independent: both flips a quarter of the time


def test_blur_happens_with_probability_one_half():
    # sigma fixed at 1 so that every blur is visible (sigma near 0.1 leaves the image unchanged)
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2 - 1).float().expand(3, -1, -1)
    blur_only = BatchAugmentation(training_augmentation(degrees=0.0, flip_p=0.0, blur_sigma=(1.0, 1.0))).train()
    out = blur_only(checkerboard.expand(DRAWS, -1, -1, -1).contiguous())
    blurred = sum(not torch.allclose(result, checkerboard, atol=1e-4) for result in out)
    assert within_binomial_bounds(blurred, DRAWS, 0.5)


def test_blur_sigma_spans_the_papers_range():
    blur = training_augmentation().transforms[3].transforms[0]
    sigmas = torch.tensor([blur.make_params([torch.zeros(3, 8, 8)])["sigma"][0] for _ in range(DRAWS)])
    assert 0.1 <= sigmas.min() < 0.2 and 1.9 < sigmas.max() <= 2.0
    assert within_binomial_bounds(int((sigmas < 1.05).sum()), DRAWS, 0.5)  # uniform on (0.1, 2)


def bar_angle(image: torch.Tensor) -> float:
    """Orientation in degrees (counter-clockwise, image y axis down) of a bright bar, from image moments."""
    weight = (image[0] + 1).clamp(min=0)
    size = weight.shape[-1]
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    w = weight.double() / weight.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    mu20, mu02, mu11 = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    return -math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))


def test_every_image_is_rotated_by_an_angle_uniform_in_plus_minus_30_degrees():
    bar = -torch.ones(3, 48, 48)
    bar[:, 23:25, 6:42] = 1.0  # a horizontal bar through the centre
    assert abs(bar_angle(bar)) < 0.5
    rotation_only = BatchAugmentation(training_augmentation(flip_p=0.0, blur_p=0.0)).train()
    angles = torch.tensor([bar_angle(image) for image in rotation_only(bar.expand(500, -1, -1, -1).contiguous())])
    assert angles.abs().max() < 31.0
    assert angles.min() < -25 and angles.max() > 25  # the whole range is used
    assert (angles.abs() > 0.5).float().mean() > 0.95  # applied always, not with some probability
    assert within_binomial_bounds(int((angles.abs() < 15).sum()), 500, 0.5)  # uniform: |angle| < 15 half the time


def test_intensity_jitter_is_off_by_default_and_scales_brightness_and_contrast_within_its_strength():
    from datamodules.augmentation import IntensityJitter

    assert not any(isinstance(t, IntensityJitter) for t in training_augmentation().transforms)
    assert isinstance(training_augmentation(intensity=0.3).transforms[-1], IntensityJitter)
    image = torch.full((3, 8, 8), 0.0)  # mid-grey: 0.5 in [0, 1]
    means = torch.stack([IntensityJitter(0.3)(image).mean() for _ in range(200)])
    # brightness factor b in [0.7, 1.3] on 0.5 (contrast keeps a flat image flat): 0.35..0.65 in [0, 1]
    assert means.min() >= 2 * 0.35 - 1 - 1e-5 and means.max() <= 2 * 0.65 - 1 + 1e-5
    assert means.std() > 0.05  # it does change the brightness


# ---- the diffusion classifiers' augmentation (DiffusionAugmentation, affine) ------------------------------------


def test_diffusion_augmentation_is_off_by_default_and_flips_each_image_on_its_own_draw():
    images = torch.stack([marker_image() + 0.01 * i for i in range(DRAWS)])
    assert DiffusionAugmentation()(images) is images  # the paper's recipe: the images as they are
    out = DiffusionAugmentation(hflip_p=0.5)(images)
    flipped = (out == images.flip(-1)).flatten(1).all(dim=1)
    kept = (out == images).flatten(1).all(dim=1)
    assert bool((flipped ^ kept).all())  # each image exactly itself or its mirror image
    assert within_binomial_bounds(int(flipped.sum()), DRAWS, 0.5)
    assert torch.equal(DiffusionAugmentation(hflip_p=1.0)(images), images.flip(-1))


def test_affine_turns_a_quarter_turn_into_rot90_and_a_one_pixel_shift_into_a_roll():
    images = torch.randn(2, 3, 8, 8)
    quarter = affine(images, torch.tensor([90.0, 90.0]), torch.ones(2), torch.zeros(2, 2))
    torch.testing.assert_close(quarter, torch.rot90(images, k=-1, dims=(-2, -1)), atol=1e-5, rtol=0)
    right = affine(images, torch.zeros(2), torch.ones(2), torch.tensor([[1 / 8, 0.0], [0.0, 1 / 8]]))
    torch.testing.assert_close(right[0, :, :, 1:], images[0, :, :, :-1], atol=1e-5, rtol=0)  # one pixel right
    torch.testing.assert_close(right[1, :, 1:, :], images[1, :, :-1, :], atol=1e-5, rtol=0)  # one pixel down
    torch.testing.assert_close(right[0, :, :, 0], images[0, :, :, 0], atol=1e-5, rtol=0)  # reflected, no black fill
    still = affine(images, torch.zeros(2), torch.ones(2), torch.zeros(2, 2))
    torch.testing.assert_close(still, images, atol=1e-5, rtol=0)


def test_diffusion_augmentation_draws_each_images_motion_within_its_bounds(monkeypatch):
    seen = {}

    def recording_affine(images, degrees, zoom, shift):
        seen.update(degrees=degrees, zoom=zoom, shift=shift)
        return images

    monkeypatch.setattr("datamodules.augmentation.affine", recording_affine)
    DiffusionAugmentation(degrees=10, translate=0.05, scale=0.1)(torch.zeros(DRAWS, 1, 4, 4))
    assert seen["degrees"].abs().max() <= 10 and seen["degrees"].abs().max() > 9.9
    assert (seen["zoom"] - 1).abs().max() <= 0.1 and seen["shift"].abs().max() <= 0.05
    assert len(seen["degrees"].unique()) == DRAWS  # each image its own draw
    assert abs(float(seen["degrees"].mean())) < 0.5  # centred: sd 10 / sqrt(3) / sqrt(2000) = 0.13


@pytest.mark.parametrize("bad", [{"hflip_p": 1.5}, {"degrees": -1}, {"scale": 1.0}])
def test_diffusion_augmentation_refuses_impossible_settings(bad):
    with pytest.raises(ValueError, match=f"augmentation.{next(iter(bad))}"):
        DiffusionAugmentation(**bad)
