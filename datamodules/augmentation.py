"""Training augmentations of the discriminative baselines (paper Appendix B.2), applied on the batch.

The datamodules are shared with the diffusion classifiers, which train without augmentation, so
the baselines augment inside their training step instead of in the datasets: the images arrive
as a (B, C, H, W) batch in [-1, 1] (on the GPU when training there) and each image gets its own
random draw. torchvision.transforms.v2 draws one set of parameters per call, so a call on the
whole batch would rotate and flip every image alike; `BatchAugmentation` calls it per image.

Appendix B.2 lists: random rotation in (-30, 30) degrees, horizontal flip p = 0.5, vertical flip
p = 0.5, "random Gaussian blur" with kernel 5 and sigma in (0.1, 2). It does not say how often
the blur happens; here it is applied with probability 0.5 (`RandomApply`), like the flips, so
half of the training images keep their full sharpness (option `blur_p`). Nothing is applied at
evaluation (`evaluation_augmentation` is the identity).

Beyond B.2, `intensity` > 0 adds brightness and contrast jitter (torchvision's ColorJitter with
that strength, on the image mapped to [0, 1]): X-rays from another scanner or hospital differ in
exposure and contrast, which the B.2 geometric augmentations do not cover. Off by default, so the
paper configs keep the paper's pipeline.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2

ROTATION_DEGREES = 30.0
FLIP_P = 0.5
BLUR_KERNEL = 5
BLUR_SIGMA = (0.1, 2.0)
BLUR_P = 0.5
# Images are in [-1, 1]: -1 is black, so the corners a rotation uncovers are black, as with the
# usual [0, 1] images and torchvision's default fill of 0.
FILL = -1.0


def training_augmentation(
    degrees: float = ROTATION_DEGREES,
    flip_p: float = FLIP_P,
    blur_kernel: int = BLUR_KERNEL,
    blur_sigma: tuple[float, float] = BLUR_SIGMA,
    blur_p: float = BLUR_P,
    fill: float = FILL,
    intensity: float = 0.0,
) -> v2.Compose:
    """The Appendix B.2 pipeline for one (C, H, W) image, in the paper's order (then the optional
    intensity jitter)."""
    jitter = [IntensityJitter(intensity)] if intensity > 0 else []
    return v2.Compose(
        [
            # bilinear rather than torchvision's default nearest: at 32-64 px nearest turns edges jagged
            v2.RandomRotation(degrees=(-degrees, degrees), interpolation=InterpolationMode.BILINEAR, fill=fill),
            v2.RandomHorizontalFlip(p=flip_p),
            v2.RandomVerticalFlip(p=flip_p),
            v2.RandomApply([v2.GaussianBlur(kernel_size=blur_kernel, sigma=blur_sigma)], p=blur_p),
            *jitter,
        ]
    )


class IntensityJitter(nn.Module):
    """Random brightness and contrast (factors in [1 - strength, 1 + strength]) of an image in [-1, 1]."""

    def __init__(self, strength: float):
        super().__init__()
        self.jitter = v2.ColorJitter(brightness=strength, contrast=strength)

    def forward(self, image: Tensor) -> Tensor:
        return self.jitter((image + 1) / 2) * 2 - 1


def evaluation_augmentation() -> v2.Identity:
    """No augmentation at validation, test and predict time."""
    return v2.Identity()


class BatchAugmentation(nn.Module):
    """Applies a per-image transform to every image of a (B, C, H, W) batch, each with its own draw.

    Active in training mode only; in eval mode the batch passes through unchanged.
    """

    def __init__(self, transform: nn.Module | None = None):
        super().__init__()
        self.transform = transform if transform is not None else training_augmentation()

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            return images
        with _one_cpu_thread(images.device):
            return torch.stack([self.transform(image) for image in images])


@contextmanager
def _one_cpu_thread(device: torch.device):
    """One intra-op thread on the CPU: the per-image ops are tiny, and a second thread only adds
    synchronisation (measured 10-100x slower per image on a 2-core machine with another busy process)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- the diffusion classifiers' training augmentation ------------------------------------------------------
@dataclass
class DiffusionAugmentation:
    """Label-preserving augmentation of a diffusion classifier's training images, drawn per image on the batch
    (`model.init_args.augmentation.<name>`). All off by default: the paper trains on the images as they are.

    A diffusion model learns the augmented images too, so its samples from noise may come out flipped (a
    mirrored heart); a classification compares the classes on the same image and is not hurt by that. The
    geometry is resampled with reflection at the border, not a fill, so the model never learns black corners.
    """

    hflip_p: float = 0.0
    """Probability of a horizontal flip."""
    degrees: float = 0.0
    """Rotation drawn uniformly in [-degrees, degrees]."""
    translate: float = 0.0
    """Shift along each axis drawn uniformly in [-translate, translate] times the side."""
    scale: float = 0.0
    """Zoom drawn uniformly in [1 - scale, 1 + scale]."""

    def __post_init__(self):
        if not 0.0 <= self.hflip_p <= 1.0:
            raise ValueError(f"augmentation.hflip_p={self.hflip_p} must lie in [0, 1]")
        for name in ("degrees", "translate", "scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation.{name}={getattr(self, name)} must be >= 0")
        if self.scale >= 1.0:
            raise ValueError(f"augmentation.scale={self.scale} must be < 1 (zoom in [1 - scale, 1 + scale])")

    @property
    def active(self) -> bool:
        return bool(self.hflip_p or self.degrees or self.translate or self.scale)

    @property
    def geometric(self) -> bool:
        return bool(self.degrees or self.translate or self.scale)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) images, each with its own draw."""
        if not self.active:
            return images
        batch, device = images.shape[0], images.device
        uniform = lambda *shape: 2 * torch.rand(*shape, generator=generator, device=device) - 1  # noqa: E731
        if self.hflip_p:
            flip = torch.rand(batch, generator=generator, device=device) < self.hflip_p
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.geometric:
            images = affine(
                images,
                self.degrees * uniform(batch),
                1 + self.scale * uniform(batch),
                self.translate * uniform(batch, 2),
            )
        return images


def affine(images: Tensor, degrees: Tensor, zoom: Tensor, shift: Tensor) -> Tensor:
    """Each image rotated by degrees[b] (clockwise as displayed, row 0 at the top), zoomed by zoom[b] and shifted by
    shift[b] = (right, down) in fractions of the side, about its centre; bilinear, reflected at the border."""
    angle = torch.deg2rad(degrees.to(images.dtype))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates to input ones (normalised to [-1, 1]): the inverse of the motion
    theta = torch.stack(
        [
            torch.stack([cos, sin, -2 * shift[:, 0]], dim=1),
            torch.stack([-sin, cos, -2 * shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
