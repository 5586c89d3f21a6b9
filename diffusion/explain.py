"""Counterfactual explanations and their faithfulness numbers (paper sec. 2.3, 4.3, Fig. 4, App. F).

For an image x (pixels in [-1, 1]):
  1. encode (wavelet), noise to t0 with eps drawn from the (seed, image id) stream; with
     `noise_draws` K > 1, K times, draw k from the image's stream k (noise.py: EXPLANATION_STEP - k);
  2. from each z_t0, run the guided DDIM sampler toward every class c -> reconstruction r_c;
  3. the factual class f (the prediction, or the true label) gives the factual reconstruction r_f,
     every other class a counterfactual r_c; the difference map is D_c = r_c - r_f:
     signed and averaged over channels for grayscale images (negative = darker in the
     counterfactual), absolute and summed over channels for colour images (paper Fig. 4 caption);
     with K draws, D_c is the mean of the K single-draw maps, and the reconstructions reported (and
     scored below) are the means of the K reconstructions;
  4. optionally smoothed (`smoothing`) and zeroed within `border` pixels of the image edge.

Faithfulness (per image and counterfactual class; explain.json averages them):
  - flip: the same diffusion classifier labels r_c as c (computed by the caller, which owns the
    classifier);
  - concentration: the mean absolute change the counterfactual makes to the input, |x - r_c|
    (channel mean), inside the top `top_fraction` pixels of |D_c| vs outside them: whether the
    map points at where the image was changed (ratio 1 = no better than anywhere else);
  - l1/l2 of x - r_f (how well the factual reconstruction keeps the input) and of x - r_c;
  - localisation, where a ground-truth mask of the finding is known (the synthetic data's `mask`):
    the pointing game (Zhang et al. 2016: is the map's maximum inside the mask?) and the share of
    the map's absolute mass inside the mask, beside the mask's share of the image (chance level).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import EXPLANATION_STEP, SAMPLES_FROM_NOISE_ID, normals, pair_keys
from .sampler import ddim_sample, noise_to

DIFFERENCE_MODES = ("auto", "signed", "absolute")
FACTUAL_SOURCES = ("predicted", "label")
POINTING_BOX = 3  # side of the box filter applied to |map| before the pointing game looks for its maximum
MASK_LEVEL = 0.5  # a soft mask (antialiased edges) counts as inside where it reaches this level


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
    noise_draws: int = 1
    """K noisy versions z_t0 of each image (draw k from the image's explanation stream k); the difference
    map is the mean of the K single-draw maps, the reconstructions the means of the K: what one noise draw
    adds at random averages out (K times the sampling cost). 1 = one draw, as in the paper."""
    border: int = 0
    """Pixels within this distance of the image edge are set to 0 in the difference maps (before scoring
    and plotting), so that edge artefacts of the reconstruction do not light up; 0 = keep every pixel."""
    smoothing: float = 0.0
    """Standard deviation, in pixels, of a Gaussian blur of the difference maps (before the border is
    zeroed), as anomaly-segmentation pipelines smooth residual maps to drop pixel noise (Baur et al. 2021
    median-filter them; a Gaussian is linear, so it commutes with the mean over draws); 0 = none."""

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
            "border",
            "smoothing",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"explanation.{name} must be >= 0, got {getattr(self, name)}")
        if self.noise_draws < 1:
            raise ValueError(f"explanation.noise_draws must be >= 1, got {self.noise_draws}")


def explanation_noise(ids: Tensor, shape: tuple[int, ...], seed: int, draws: Tensor | int = 0) -> Tensor:
    """eps of shape (*ids.shape, *shape) on the device of `ids`, one per (seed, image id): same seed, same
    images. Draw k is the image's EXPLANATION_STEP - k stream (noise.py), which no classification step
    shares; `draws` broadcasts against `ids` (ids (B, 1) and draws (K,) give (B, K, *shape))."""
    steps = EXPLANATION_STEP - torch.as_tensor(draws, device=ids.device)
    return normals(pair_keys(ids, steps, seed), shape)


def reconstruct_all_classes(
    denoiser,
    x: Tensor,
    ids: Tensor,
    num_classes: int,
    schedule,
    settings: ExplainSettings,
    null_label: int,
    max_batch: int = 256,
    first_draw: int = 0,
) -> Tensor:
    """(B, K, C, *x.shape[1:]) model-space reconstructions of every image toward every class from each
    of its K = settings.noise_draws noisy versions z_t0 (draws first_draw ... first_draw + K - 1), in
    image-major rows, so one forward holds all classes and all draws of an image."""
    draws = torch.arange(first_draw, first_draw + settings.noise_draws, device=x.device)
    eps = explanation_noise(ids.to(x.device).view(-1, 1), tuple(x.shape[1:]), settings.seed, draws).to(x.dtype)
    x = x.repeat_interleave(settings.noise_draws, dim=0)
    z = noise_to(x, eps.flatten(0, 1), settings.t0, schedule).repeat_interleave(num_classes, dim=0)
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
    return samples.view(len(ids), settings.noise_draws, num_classes, *x.shape[1:])


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


def mean_difference_maps(reconstructions: Tensor, factual: Tensor, signed: Tensor) -> Tensor:
    """(B, C, H, W) mean over draws of the single-draw maps of (B, K, C, channels, H, W) reconstructions.

    Each draw's map compares reconstructions sampled from the same z_t0, so what that noise puts into
    both cancels; for colour (absolute) maps the mean of |r_c - r_f| is not |mean r_c - mean r_f|."""
    draws = len(reconstructions[0])
    maps = difference_maps(
        reconstructions.flatten(0, 1), factual.repeat_interleave(draws), signed.repeat_interleave(draws)
    )
    return maps.view(len(factual), draws, *maps.shape[1:]).mean(dim=1)


def interior(height: int, width: int, border: int, device=None) -> Tensor:
    """(H, W) True at the pixels `border` or more pixels away from the image edge (all of them for 0)."""
    rows, columns = (torch.arange(n, device=device) for n in (height, width))
    return ((rows >= border) & (rows < height - border))[:, None] & ((columns >= border) & (columns < width - border))


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """maps (..., H, W) blurred by a separable Gaussian of standard deviation `sigma` pixels (cut at 3 sigma),
    the edge pixels replicated outwards so that the image edge neither darkens nor lights up; 0: unchanged."""
    if sigma == 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = F.pad(maps.reshape(-1, 1, *maps.shape[-2:]), (radius,) * 4, mode="replicate")
    flat = F.conv2d(F.conv2d(flat, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return flat.view(maps.shape)


def finish_maps(maps: Tensor, settings: ExplainSettings) -> Tensor:
    """The maps as scored and plotted: blurred by `settings.smoothing`, then zero within `settings.border`
    pixels of the edge (the defaults return them untouched)."""
    maps = gaussian_blur(maps, settings.smoothing)
    if settings.border == 0:
        return maps
    return maps * interior(*maps.shape[-2:], settings.border, maps.device)


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


def binary_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool from soft masks (B, 1, H, W) in [0, 1]: inside where they reach MASK_LEVEL (the
    middle of an antialiased edge)."""
    if tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(f"masks of {tuple(masks.shape)} do not match images of size {tuple(size)}")
    return masks.reshape(len(masks), *size) >= MASK_LEVEL


def localisation(maps: Tensor, masks: Tensor, border: int = 0) -> dict[str, Tensor]:
    """Whether difference maps (B, K, H, W) point at the finding, binary masks (B, H, W); per (b, k):

    hit: 1 if the maximum of |map|, smoothed by a POINTING_BOX x POINTING_BOX box filter, lies inside
        the mask (the pointing game of Zhang et al. 2016, "Top-down neural attention by excitation
        backprop"; the light smoothing stands in for their 15-pixel tolerance on images 16 to 256
        pixels wide, and keeps one stray pixel from outweighing a region that changed); 0 for a map
        that is all zeros, which points nowhere;
    mass_inside: the share of the map's absolute mass inside the mask (0 for an all-zero map);
    mask_share: the mask's share of the pixels, what mass_inside is for a map spread evenly (chance level).
    Only pixels `border` or more away from the edge count: the maps are zero nearer (ExplainSettings.border).
    """
    region = interior(*maps.shape[-2:], border, maps.device)
    magnitude = maps.abs() * region
    smoothed = F.avg_pool2d(magnitude.flatten(0, 1).unsqueeze(1), POINTING_BOX, stride=1, padding=POINTING_BOX // 2)
    peak = (smoothed.view_as(magnitude) * region).flatten(2).argmax(dim=-1)  # (B, K) flat pixel index
    inside = (masks.to(maps.device) & region).flatten(1).to(maps.dtype)  # (B, H * W)
    total = magnitude.flatten(2).sum(-1)
    pointed = (total > 0).to(maps.dtype)
    hit = inside.gather(1, peak) * pointed
    mass_inside = (magnitude.flatten(2) * inside.unsqueeze(1)).sum(-1) / total.clamp(min=torch.finfo(maps.dtype).tiny)
    share = inside.sum(-1, keepdim=True) / region.sum()
    return {"hit": hit, "mass_inside": mass_inside, "mask_share": share.expand_as(hit)}


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
    masks: Tensor | None = None,
    first_draw: int = 0,
) -> dict[str, Tensor]:
    """Reconstructions toward every class, difference maps and faithfulness numbers for a batch.

    `images` are pixels in [-1, 1]; `transform` the model's wavelet (encode/decode); `classify`
    maps (pixel images, ids) to predicted classes and is used for the flip check (None skips it).
    Per-(image, class) entries at the factual class compare r_f with itself (zero change, flip = 1).
    `masks` (B, 1, H, W) in [0, 1], where the finding is (None: not known), add the binary `mask` and
    the localisation numbers `hit`, `mass_inside`, `mask_share`. With settings.noise_draws = K, the
    maps are the mean of the K single-draw maps and `reconstructions` (which the distances, the
    concentration and the flip check use) the means of the K reconstructions; draws first_draw ...
    first_draw + K - 1, so more draws can be added later and averaged in.
    """
    model_space = reconstruct_all_classes(
        denoiser, transform.encode(images), ids, num_classes, schedule, settings, null_label, max_batch, first_draw
    )
    pixels = transform.decode(model_space.flatten(0, 2)).clamp(-1, 1).view(*model_space.shape[:3], *images.shape[1:])
    signed = signed_for(images, settings.difference)
    maps = finish_maps(mean_difference_maps(pixels, factual, signed), settings)
    pixels = pixels.mean(dim=1)
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
    if masks is not None:
        found = binary_masks(masks, images.shape[-2:])
        record |= {"mask": found} | localisation(maps, found, settings.border)
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
    ids = torch.arange(per_class, device=device).repeat(num_classes) + SAMPLES_FROM_NOISE_ID
    z = explanation_noise(ids, model_input, settings.seed)
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    samples = ddim_sample(
        denoiser, z, labels, schedule, 1.0, settings.monitor_steps, settings.guidance_scale, null_label
    )
    return transform.decode(samples).clamp(-1, 1)
