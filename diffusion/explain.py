"""Counterfactual explanations and their faithfulness numbers (paper sec. 2.3, 4.3, Fig. 4, App. F).

For an image x (pixels in [-1, 1]):
  1. encode (wavelet), noise once to t0 with eps drawn from the (seed, image id) stream;
  2. from that same z_t0, run the guided DDIM sampler toward every class c -> reconstruction r_c;
  3. the factual class f (the prediction, or the true label) gives the factual reconstruction r_f,
     every other class a counterfactual r_c; the difference map is D_c = r_c - r_f:
     signed and averaged over channels for grayscale images (negative = darker in the
     counterfactual), absolute and summed over channels for colour images (paper Fig. 4 caption).

Faithfulness (per image and counterfactual class; explain.json averages them):
  - flip: the same diffusion classifier labels r_c as c (computed by the caller, which owns the
    classifier);
  - concentration: the mean absolute change the counterfactual makes to the input, |x - r_c|
    (channel mean), inside the top `top_fraction` pixels of |D_c| vs outside them: whether the
    map points at where the image was changed (ratio 1 = no better than anywhere else);
  - l1/l2 of x - r_f (how well the factual reconstruction keeps the input) and of x - r_c.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .noise import EXPLANATION_STEP, normals, pair_keys
from .sampler import ddim_sample, noise_to

DIFFERENCE_MODES = ("auto", "signed", "absolute")
FACTUAL_SOURCES = ("predicted", "label")


@dataclass
class ExplainSettings:
    """How explanations are made; every field is an option under `model.init_args.explanation`."""

    t0: float = 0.5
    """Noise level the input is diffused to before sampling (paper: CheXpert 0.5, ISIC 0.3); 0 returns the input."""
    guidance_scale: float = 7.5
    """w of classifier-free guidance, (1 + w) * cond - w * uncond (paper: 7.5)."""
    sampling_steps: int = 256
    """DDIM steps from t0 to 0 (paper: 256)."""
    factual: str = "predicted"
    """"predicted" (the classifier's class is the factual one) or "label" (the true class)."""
    difference: str = "auto"
    """"auto" (signed for grayscale images, absolute for colour ones), "signed" or "absolute"."""
    top_fraction: float = 0.05
    """Share of pixels with the largest |difference| in the concentration number."""
    flip_steps: int = 21
    """N of the classification that checks each counterfactual (flip rate); 0 skips the check."""
    seed: int = 0
    """Seed of the explanation noise (with the image id it fixes z_t0)."""
    summary_images: int = 8
    """Images in the summary grid (the first ones by id)."""
    every_n_epochs: int = 0
    """During fit, log explanations of monitor_images validation images and class-conditional samples
    from pure noise to TensorBoard at every n-th validation (with the EMA weights); 0 = never."""
    monitor_images: int = 4
    """Validation images explained at each monitoring validation."""
    monitor_steps: int = 32
    """DDIM steps of the monitoring images (fewer than sampling_steps: it runs during training)."""

    def __post_init__(self):
        if self.factual not in FACTUAL_SOURCES:
            raise ValueError(f"explanation.factual={self.factual!r} is not one of {FACTUAL_SOURCES}")
        if self.difference not in DIFFERENCE_MODES:
            raise ValueError(f"explanation.difference={self.difference!r} is not one of {DIFFERENCE_MODES}")
        if not 0.0 <= self.t0 <= 1.0:
            raise ValueError(f"explanation.t0 must be in [0, 1], got {self.t0}")
        if not 0.0 < self.top_fraction < 1.0:
            raise ValueError(f"explanation.top_fraction must be in (0, 1), got {self.top_fraction}")
        for name in (
            "sampling_steps",
            "flip_steps",
            "summary_images",
            "every_n_epochs",
            "monitor_images",
            "monitor_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"explanation.{name} must be >= 0, got {getattr(self, name)}")


def explanation_noise(ids: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """eps of shape (B, *shape) on the device of `ids`, one per (seed, image id): same seed, same images.
    The image's EXPLANATION_STEP stream (noise.py), which no classification step shares."""
    return normals(pair_keys(ids, torch.tensor(EXPLANATION_STEP, device=ids.device), seed), shape)


def reconstruct_all_classes(
    denoiser,
    x: Tensor,
    ids: Tensor,
    num_classes: int,
    schedule,
    settings: ExplainSettings,
    null_label: int,
    max_batch: int = 256,
) -> Tensor:
    """(B, C, *x.shape[1:]) model-space reconstructions of every image toward every class, all
    sampled from the image's one z_t0 (image-major rows, so one forward holds all classes)."""
    eps = explanation_noise(ids.to(x.device), tuple(x.shape[1:]), settings.seed).to(x.dtype)
    z = noise_to(x, eps, settings.t0, schedule).repeat_interleave(num_classes, dim=0)
    labels = torch.arange(num_classes, device=x.device).repeat(len(x))
    samples = ddim_sample(
        denoiser,
        z,
        labels,
        schedule,
        settings.t0,
        settings.sampling_steps,
        settings.guidance_scale,
        null_label,
        max_batch,
    )
    return samples.view(len(x), num_classes, *x.shape[1:])


def is_grayscale(images: Tensor) -> Tensor:
    """(B,) True where an image has one channel or all channels equal."""
    return (images == images[:, :1]).flatten(1).all(dim=1)


def difference_maps(reconstructions: Tensor, factual: Tensor, signed: Tensor) -> Tensor:
    """(B, C, H, W) maps r_c - r_f for every class c of (B, C, channels, H, W) reconstructions.

    `signed[b]`: channel mean of r_c - r_f (grayscale), else the channel sum of |r_c - r_f| (colour).
    The factual class's own map is all zeros.
    """
    reference = reconstructions[torch.arange(len(factual)), factual].unsqueeze(1)
    delta = reconstructions - reference
    signed_maps, absolute_maps = delta.mean(dim=2), delta.abs().sum(dim=2)
    return torch.where(signed.view(-1, 1, 1, 1), signed_maps, absolute_maps)


def signed_for(images: Tensor, mode: str) -> Tensor:
    """(B,) whether each image gets a signed difference map under `mode`."""
    if mode == "auto":
        return is_grayscale(images)
    return torch.full((len(images),), mode == "signed", dtype=torch.bool, device=images.device)


def concentration(change: Tensor, maps: Tensor, top_fraction: float) -> tuple[Tensor, Tensor]:
    """Mean of `change` (B, K, H, W) inside and outside the top `top_fraction` pixels of |maps|, per (b, k).
    Ties at the threshold are broken by topk's order, so exactly round(top_fraction * H * W) are inside."""
    flat_change, flat_maps = change.flatten(2), maps.abs().flatten(2)
    top = max(1, round(top_fraction * flat_maps.shape[-1]))
    inside = torch.zeros_like(flat_maps, dtype=torch.bool).scatter(-1, flat_maps.topk(top, dim=-1).indices, True)
    mean_inside = (flat_change * inside).sum(-1) / inside.sum(-1)
    mean_outside = (flat_change * ~inside).sum(-1) / (~inside).sum(-1).clamp(min=1)
    return mean_inside, mean_outside


def distances(images: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
    """Per (image, class) mean absolute (L1) and root-mean-square (L2) distance to the input, in pixels."""
    delta = (reconstructions - images.unsqueeze(1)).flatten(2)
    return delta.abs().mean(-1), delta.pow(2).mean(-1).sqrt()


def explain_batch(
    denoiser,
    transform,
    schedule,
    images: Tensor,
    ids: Tensor,
    factual: Tensor,
    num_classes: int,
    null_label: int,
    settings: ExplainSettings,
    classify: Callable[[Tensor, Tensor], Tensor] | None = None,
    max_batch: int = 256,
) -> dict[str, Tensor]:
    """Reconstructions toward every class, difference maps and faithfulness numbers for a batch.

    `images` are pixels in [-1, 1]; `transform` the model's wavelet (encode/decode); `classify`
    maps (pixel images, ids) to predicted classes and is used for the flip check (None skips it).
    Per-(image, class) entries at the factual class compare r_f with itself (zero change, flip = 1).
    """
    model_space = reconstruct_all_classes(
        denoiser, transform.encode(images), ids, num_classes, schedule, settings, null_label, max_batch
    )
    pixels = transform.decode(model_space.flatten(0, 1)).clamp(-1, 1).view(len(images), num_classes, *images.shape[1:])
    signed = signed_for(images, settings.difference)
    maps = difference_maps(pixels, factual, signed)
    change = (pixels - images.unsqueeze(1)).abs().mean(dim=2)
    inside, outside = concentration(change, maps, settings.top_fraction)
    l1, l2 = distances(images, pixels)
    record = {
        "id": ids,
        "factual": factual,
        "images": images,
        "reconstructions": pixels,
        "maps": maps,
        "signed": signed,
        "l1": l1,
        "l2": l2,
        "inside": inside,
        "outside": outside,
    }
    if classify is not None and settings.flip_steps > 0:
        predicted = classify(pixels.flatten(0, 1), ids.repeat_interleave(num_classes)).view(len(images), num_classes)
        record["flip_prediction"] = predicted
        record["flip"] = (predicted == torch.arange(num_classes, device=predicted.device)).float()
    return record


@torch.no_grad()
def samples_from_noise(
    denoiser,
    transform,
    schedule,
    model_input: tuple[int, ...],
    num_classes: int,
    null_label: int,
    settings: ExplainSettings,
    per_class: int = 4,
) -> Tensor:
    """(C * per_class, channels, H, W) class-conditional samples from pure noise (t = 1), pixels in
    [-1, 1], class-major, with the guidance of `settings` and `monitor_steps` DDIM steps. The noise
    is seeded, so successive calls during training show the same draws as the model learns."""
    device = next(denoiser.parameters()).device
    ids = torch.arange(per_class, device=device).repeat(num_classes) - 1_000_000  # a stream no data id uses
    z = explanation_noise(ids, model_input, settings.seed)
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    samples = ddim_sample(
        denoiser, z, labels, schedule, 1.0, settings.monitor_steps, settings.guidance_scale, null_label
    )
    return transform.decode(samples).clamp(-1, 1)
