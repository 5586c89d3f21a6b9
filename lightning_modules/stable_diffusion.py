"""StableDiffusionClassifier: Stable Diffusion as a zero-shot or fine-tuned classifier (paper sec. 3.4, App. D).

Every class is a text prompt; an image is classified by which prompt lets the UNet denoise its
VAE latent best, with the same engine as the other diffusion models (`diffusion/engine.py`):
shared (eps, t) pairs per (seed, image id, step), all classes in one batched forward, majority
vote, early exit, per-image outputs, metrics.json and predictions.csv. Errors are measured in
latent space.

  fit:       the Hugging Face text-to-image recipe (App. D): VAE and text encoder frozen, DDPM
             timesteps uniform over the checkpoint's num_train_timesteps, eps or v target as its
             scheduler says, plain MSE, AdamW.
  val/test:  `DiscreteSchedule` and `PromptDenoiser` (networks/stable_diffusion.py) present the
             discrete-time eps- or v-prediction UNet to the engine as the continuous-time
             v-denoiser it expects; everything else is DiffusionClassifierBase's.
  explain:   predict with `explain: true`: the pixel-space models' counterfactuals in latent space:
             encode (mean latent) -> noise to t0 -> guided DDIM toward each class prompt, the empty
             prompt as the null condition -> VAE decode (`LatentTransform`) -> difference maps and
             the flip check by this same classifier.

Prompts: one or more per class, keyed by class name. Several prompts of a class are averaged in
text-embedding space, once, into one embedding per class that training and classification both
use (a random choice per item would train on embeddings the classifier never uses). Row C of the
embedding table is the empty prompt, the null condition of classifier-free guidance.

Memory (SD2-base, 256x256 images, 32x32x4 latents): the UNet has ~866 M parameters, trained in fp32
with bf16 autocast: weights 3.5 GB + gradients 3.5 GB + AdamW's two moments 6.9 GB = 13.9 GB,
plus ~1.7 GB of bf16 weight copies made by autocast. The frozen parts hold no gradients or
optimizer states: text encoder ~340 M (1.4 GB) and VAE ~84 M (0.3 GB) in fp32. That is ~17 GB before
activations, which scale with the latent area: at 32x32 a quarter of those of the usual 512x512
fine-tuning, which itself fits a 24 GB GPU at batch 1 with gradient checkpointing. So the recipe's
batch of 4 leaves most of an 80 GB GPU free, with no 8-bit optimizer (checkpoints: ~12 GB each).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion.explain import is_grayscale
from diffusion.loss import drop_labels
from diffusion.schedule import DiscreteSchedule
from networks.stable_diffusion import (
    PAPER_PROMPTS,
    LatentTransform,
    PromptDenoiser,
    check_weights_dir,
    class_prompts,
    unet_weights,
    vae_latents,
)

from .diffusion_base import DiffusionClassifierBase


class StableDiffusionClassifier(DiffusionClassifierBase):
    """Stable Diffusion (diffusers layout on local disk) fine-tuned on class prompts and used as a classifier.

    Args:
        weights_dir: folder holding unet/ vae/ text_encoder/ tokenizer/ scheduler/ (e.g. stable-diffusion-2-base
            saved once with `save_pretrained`); read with local_files_only, never downloaded.
        finetuned_checkpoint: a Lightning checkpoint of a fine-tuning run (configs/sd_finetune.yaml) whose UNet
            replaces weights_dir's (its VAE and text encoder were frozen, so they are weights_dir's); unlike
            `--ckpt_path` it takes only the weights, so a 4-class CheXpert + ISIC model can classify one data set.
        prompts: class name -> prompt or list of prompts (averaged in embedding space); default PAPER_PROMPTS.
        num_classes, class_names, image_size, image_channels: linked from the datamodule by cli.py.
        learning_rate, weight_decay: AdamW (Hugging Face text-to-image recipe: 1e-5 and 1e-2).
        label_dropout: probability of training on the empty prompt instead (classifier-free guidance).
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~25% slower).
        val_steps: (eps, t) pairs per image when classifying during validation; 0 (the default here)
            logs val/loss only.
        **kwargs: every diffusion classifier's options (classification, save_errors, explain,
            explanation); see DiffusionClassifierBase. With this model explanation.t0 is the fraction of
            the checkpoint's T DDPM timesteps the latent is noised to (t0 = 0.5: timestep 500 of 1000,
            diffusers' img2img strength 0.5); guidance_scale is w of (1 + w) * cond - w * uncond (paper
            eq. 5), the unconditional prediction being the empty prompt's, so w = 7.5 is diffusers'
            guidance_scale 8.5. The fit-time monitoring options (every_n_epochs, ...) are not used.
    """

    # paths stay out of the checkpoint: `--ckpt_path` would otherwise put back the training machine's ones
    hparams_ignored = ("weights_dir", "finetuned_checkpoint")
    frozen_parts = ("vae", "text_encoder")  # loaded from weights_dir, never trained: an export names them only

    def __init__(
        self,
        weights_dir: str,
        finetuned_checkpoint: str | None = None,
        prompts: dict[str, str | list[str]] | None = None,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        image_size: int = 256,
        image_channels: int = 3,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-2,
        label_dropout: float = 0.1,
        gradient_checkpointing: bool = True,
        val_steps: int = 0,
        **kwargs,
    ):
        super().__init__(num_classes, class_names, val_steps=val_steps, **kwargs)
        if self.classification.band_weights is not None:
            raise ValueError("classification.band_weights weighs Haar bands; Stable Diffusion's VAE latents have none")
        root = check_weights_dir(weights_dir)  # before any heavy work
        self.pretrained = str(finetuned_checkpoint or root)  # a complete classifier without --ckpt_path
        if finetuned_checkpoint and not Path(finetuned_checkpoint).is_file():
            raise FileNotFoundError(
                f"finetuned_checkpoint {finetuned_checkpoint} not found: run configs/sd_finetune.yaml "
                "first, or set it to null with weights_dir pointing at a fine-tuned model"
            )
        self.class_prompts = class_prompts(self.class_names, PAPER_PROMPTS if prompts is None else prompts)
        load = lambda cls, name: cls.from_pretrained(root / name, local_files_only=True)  # noqa: E731
        # DDPMScheduler whatever sampler the checkpoint names (SD2: PNDM): its training noise schedule is what counts
        self.noise_scheduler = load(DDPMScheduler, "scheduler")
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{root / 'scheduler'}: prediction_type {self.prediction_type!r} is not epsilon or v_prediction"
            )
        self.tokenizer = load(CLIPTokenizer, "tokenizer")
        self.text_encoder = load(CLIPTextModel, "text_encoder").requires_grad_(False).eval()
        self.vae = load(AutoencoderKL, "vae").requires_grad_(False).eval()
        self.unet = load(UNet2DConditionModel, "unet")
        if finetuned_checkpoint:
            self.unet.load_state_dict(unet_weights(finetuned_checkpoint))
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = DiscreteSchedule(self.noise_scheduler.alphas_cumprod)
        self.register_buffer("embeddings", None, persistent=False)  # cache of text_embeddings(), moves with the model
        self._embedded_prompts = None
        if self.explanation.every_n_epochs > 0:
            rank_zero_warn(
                "explanation.every_n_epochs: StableDiffusionClassifier logs no explanations during fit "
                "(predict with explain: true explains); the option is ignored"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # the frozen parts stay in eval mode whatever Lightning sets
        self.text_encoder.eval()
        return self

    # ---- conditioning and latents ---------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self) -> Tensor:
        """(C + 1, L, D) prompt embeddings, computed once in fp32 and again only if the prompts change."""
        if self.embeddings is None or self._embedded_prompts != self.class_prompts:
            with torch.autocast(self.device.type, enabled=False):
                self.embeddings = torch.stack([self.encode_prompts(p).mean(dim=0) for p in [*self.class_prompts, [""]]])
            self._embedded_prompts = [list(p) for p in self.class_prompts]
        return self.embeddings

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(tokens)[0]

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        """Images in [-1, 1] (B, 1 or 3, H, W) -> scaled VAE latents; the mean latent unless `sample`
        (training draws, as the recipe does; classification and explanations stay deterministic)."""
        return vae_latents(self.vae, images, sample)

    # ---- how this model sees images and learns ---------------------------------------------
    def denoiser(self) -> PromptDenoiser:
        return PromptDenoiser(self.unet, self.text_embeddings(), self.schedule, self.prediction_type)

    def explanation_transform(self, images: Tensor) -> LatentTransform:
        return LatentTransform(self.vae, images.shape[1], is_grayscale(images))

    def diffusion_loss(self, latents: Tensor, labels: Tensor, t: Tensor, noise: Tensor, dropout: float) -> Tensor:
        return self.timestep_loss(latents, labels, self.schedule.timesteps(t).to(self.device), noise, dropout)

    def timestep_loss(
        self, latents: Tensor, labels: Tensor, timesteps: Tensor, noise: Tensor, dropout: float
    ) -> Tensor:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        condition = self.text_embeddings()[drop_labels(labels, self.hparams.num_classes, dropout)]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=condition, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents = self.encode(batch["image"], sample=True)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device
        )
        loss = self.timestep_loss(
            latents, batch["label"], timesteps, torch.randn_like(latents), self.hparams.label_dropout
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def results_info(self) -> dict:
        return {"prompts": self.class_prompts}

    def decision_settings(self) -> dict:
        return super().decision_settings() | {"prompts": self.class_prompts}

    def weights_origin(self) -> str:
        return self.trainer.ckpt_path or self.pretrained

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.unet.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the (fine-tuned) model in the diffusers layout, usable as another run's weights_dir."""
        parts = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.noise_scheduler,
        }
        for name, part in parts.items():
            part.save_pretrained(Path(directory) / name)
