"""Stable Diffusion's parts as the diffusion classifier's engine expects them (paper sec. 3.4, App. D).

The engine (diffusion/engine.py, diffusion/explain.py) asks for a continuous-time v-denoiser
`f(z, t, labels)`, a schedule with `alpha_sigma(t)` and an image transform with encode/decode.
These adapters present a diffusers text-to-image model that way:
  PromptDenoiser   the text-conditioned UNet, one prompt embedding per class, eps or v output as v;
  LatentTransform  pixels in [-1, 1] <-> scaled VAE latents (grey images stay grey);
  DiscreteSchedule (diffusion/schedule.py) the DDPM timesteps seen in continuous time.
Also: the weights folder check (diffusers layout on local disk, nothing downloaded) and the class prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from diffusion.schedule import DiscreteSchedule, broadcast_like

from .weights import load_weights_file

# The file each diffusers sub-folder must hold (an interrupted download leaves empty folders).
WEIGHT_FOLDERS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
# Paper sec. 3.4 quotes "a benign skin lesion" and "a frontal chest xray of a sick patient with
# pleural effusion"; the other two are ours, written in the same style.
PAPER_PROMPTS = {
    "no_finding": ["a frontal chest xray of a healthy patient with no finding"],
    "pleural_effusion": ["a frontal chest xray of a sick patient with pleural effusion"],
    "benign": ["a benign skin lesion"],
    "melanoma": ["a malignant skin lesion, melanoma"],
}
VAE_BATCH = 32  # images per VAE forward when explaining (B x C reconstructions go through the decoder)


class MissingWeightsError(FileNotFoundError):
    """The Stable Diffusion weights directory is missing or incomplete; the message says what is missing."""


def check_weights_dir(weights_dir: str | Path) -> Path:
    root = Path(weights_dir)
    missing = [
        f"{name}/" if not (root / name).is_dir() else f"{name}/{file}"
        for name, file in WEIGHT_FOLDERS.items()
        if not (root / name / file).is_file()
    ]
    if missing:
        found = "" if root.is_dir() else " (no such directory)"
        raise MissingWeightsError(
            f"Stable Diffusion weights at {root}{found}: missing sub-folder(s) {', '.join(missing)} (expected the "
            f"diffusers layout unet/ vae/ text_encoder/ tokenizer/ scheduler/; see the README to download them once)"
        )
    return root


@dataclass
class PromptDenoiser:
    """classify_images' `denoiser(z, t, labels) -> v_hat` from a text-conditioned UNet.

    labels index `embeddings` (C + 1, L, D); t maps to the UNet's discrete timestep. An eps output
    becomes v through eps = sigma*z + alpha*v, so every error space of classify.py is exact.
    """

    unet: torch.nn.Module
    embeddings: Tensor
    schedule: DiscreteSchedule
    prediction_type: str

    def __call__(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        prediction = self.unet(
            z, self.schedule.timesteps(t), encoder_hidden_states=self.embeddings[labels], return_dict=False
        )[0].float()
        if self.prediction_type == "v_prediction":
            return prediction
        alpha, sigma = (broadcast_like(value.float(), z) for value in self.schedule.alpha_sigma(t))
        return (prediction - sigma * z.float()) / alpha


def vae_latents(vae: AutoencoderKL, images: Tensor, sample: bool = False) -> Tensor:
    """Images in [-1, 1] (B, 1 or 3, H, W) -> scaled VAE latents: the latent distribution's mean
    (mode) unless `sample`. Grayscale (1-channel) images are repeated to the VAE's 3 channels."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.sample() if sample else posterior.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass
class LatentTransform:
    """explain_batch's `transform` for Stable Diffusion: pixels in [-1, 1] <-> scaled VAE latents.

    encode: the classifier's own latents (`vae_latents`, the mean latent: explanations are
        deterministic, and the image the classifier saw is the one explained), in fp32 so the
        DDIM loop does not run in bf16 under autocast.
    decode: latents / scaling factor (+ shift) -> VAE decoder -> pixels, `image_channels` of them.
        The VAE sees and returns 3 channels. A 1-channel input gets the channel mean back; a
        3-channel input flagged in `grayscale` (B,) (all channels equal, e.g. CheXpert as loaded)
        gets the channel mean repeated 3 times, so its reconstructions stay grey like the input,
        and explain.py's "auto" difference mode, which looks at the input, gives it a signed map.
        `grayscale` is per input image; decode's rows are image-major (image b's C class
        reconstructions are rows b*C .. b*C + C - 1, as explain_batch decodes them).
    Both run the VAE `max_batch` images at a time.
    """

    vae: AutoencoderKL
    image_channels: int = 3
    grayscale: Tensor | None = None
    max_batch: int = VAE_BATCH

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return torch.cat([vae_latents(self.vae, chunk) for chunk in images.split(self.max_batch)]).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        pixels = torch.cat(
            [
                self.vae.decode((chunk / self.vae.config.scaling_factor + shift).to(self.vae.dtype), return_dict=False)[
                    0
                ]
                for chunk in latents.split(self.max_batch)
            ]
        ).float()
        grey = pixels.mean(dim=1, keepdim=True)
        if self.image_channels == 1:
            return grey
        if self.grayscale is None:
            return pixels
        if len(pixels) % len(self.grayscale):
            raise ValueError(
                f"{len(pixels)} latents to decode for {len(self.grayscale)} grayscale flags: "
                "expected the same number of rows for every image"
            )
        rows = self.grayscale.to(pixels.device).repeat_interleave(len(pixels) // len(self.grayscale))
        return torch.where(rows.view(-1, 1, 1, 1), grey.expand_as(pixels), pixels)


def class_prompts(class_names: list[str], prompts: dict[str, str | list[str]]) -> list[list[str]]:
    """The prompt list of each class, in class order; a missing or empty one is an error naming the class."""
    missing = [name for name in class_names if not prompts.get(name)]
    if missing:
        raise ValueError(f"no prompt for class(es) {missing}; model.init_args.prompts has {sorted(prompts)}")
    return [[prompts[name]] if isinstance(prompts[name], str) else list(prompts[name]) for name in class_names]


def unet_weights(checkpoint: str | Path) -> dict[str, Tensor]:
    """The UNet's state_dict inside a StableDiffusionClassifier checkpoint (its EMA weights if trained with EMA)."""
    state = load_weights_file(checkpoint).get("state_dict", {})
    weights = {name.removeprefix("unet."): value for name, value in state.items() if name.startswith("unet.")}
    if not weights:
        raise ValueError(
            f"{checkpoint} holds no UNet weights (no 'unet.' keys): not a StableDiffusionClassifier checkpoint"
        )
    return weights
