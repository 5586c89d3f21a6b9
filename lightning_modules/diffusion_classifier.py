"""DiffusionClassifier: a class-conditional diffusion model trained as a generator, used as a classifier.

What this module adds to DiffusionClassifierBase (classification, validation, explanations) is how
the UNet and DiT see an image and learn:
  encode:  the single-stage Haar wavelet (diffusion/wavelet.py), 3 x H x W -> 12 x H/2 x W/2
  fit:     (optionally augmented) images, t ~ U(0,1) (or partly a band) -> shifted-cosine logSNR
           -> z = alpha*x + sigma*eps -> v-loss * min-SNR weight,
           labels dropped to the null label for classifier-free guidance
  monitor: during fit, explanations of a few validation images and samples from noise in TensorBoard,
           and, when the data mark the finding (a `mask` per image), how well the maps point at it
EMA weights come from Lightning's EMAWeightAveraging callback (see configs), which swaps them in
for validation and writes them to the checkpoint's state_dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from datamodules.augmentation import DiffusionAugmentation
from diffusion.engine import channel_weights, reconstruction_error
from diffusion.explain import samples_from_noise
from diffusion.loss import discriminative_loss, drop_labels, training_times, weighted_v_loss
from diffusion.parameterization import diffuse, v_target
from diffusion.schedule import ShiftedCosineSchedule, broadcast_like
from diffusion.wavelet import GreyscaleTransform, HaarWavelet, IdentityTransform
from networks.base import Denoiser
from reports.explanations import (
    counterfactuals,
    explanation_rows,
    localisation_numbers,
    noise_sample_grid,
    plot_explanations,
)

from .diffusion_base import DiffusionClassifierBase

# (num_classes, in_channels, sample_size) -> denoiser f(z, t, labels) -> v_hat
NetworkFactory = Callable[[int, int, int], Denoiser]


class DiffusionClassifier(DiffusionClassifierBase):
    """Class-conditional v-prediction diffusion model that classifies by per-class denoising error.

    Args:
        network: the denoiser, built as `network(num_classes, in_channels, sample_size)`; give its
            `class_path` and its own options in the config (e.g. `networks.ClassConditionalUNet`).
        num_classes: number of classes; linked from the datamodule by cli.py.
        class_names: class names, for logs and outputs; linked from the datamodule.
        image_size: side of the (square) input images; linked from the datamodule.
        image_channels: channels of the input images; linked from the datamodule.
        wavelet: model single-stage Haar wavelet coefficients (4C x H/2 x W/2) instead of pixels.
        grayscale: model the images' channel mean only (1 channel, 4 wavelet bands), for grey images
            such as X-rays given as 3 equal channels; reconstructions are grey again.
        schedule_base: base resolution of the shifted-cosine schedule (paper: 64); the shift uses
            the side of the model input (image_size / 2 with the wavelet).
        min_snr_gamma: gamma of the min-SNR loss weight (paper: 5); null for a plain v-loss.
        label_dropout: probability of replacing a training label by the null label, for
            classifier-free guidance (paper: 0.1).
        learning_rate: Adam learning rate (paper B.1: 1e-4).
        warmup_steps: steps of linear learning-rate warm-up (paper B.1: 250).
        augmentation: label-preserving training augmentation (flips, small affine), drawn per image; off in the
            paper; see datamodules.augmentation.DiffusionAugmentation.
        train_t_range: the band of t that a share of each training batch is drawn from (the paper: [0, 1],
            uniform); e.g. the band whose votes decide on validation (tools/vote_bands.py measures it).
        train_t_share: the share of training images whose t comes from train_t_range; the others' from [0, 1].
        discriminative_weight: opt-in discriminative fine-tune (0: off, the paper): from step discriminative_after
            on, add this weight times the cross-entropy of softmax(-errors / tau) across classes
            (diffusion.loss.discriminative_loss), the errors of discriminative_images images of the batch under
            every class with one shared (eps, t) each, t from classification.t_range, in the vote's error space and
            norm. It trains what the vote reads; it may also bring back the shortcuts that generative training
            avoids (Li, Kumar & Pathak 2025): measure it on shifted sets too (make shift-bench).
        discriminative_tau: temperature on the relative error (0.02: a 2 % gap between classes is one logit).
        discriminative_after: generative training steps before the fine-tune's loss is added.
        discriminative_images: images of each batch whose class errors enter it (C forwards each, with gradients).
        **kwargs: every diffusion classifier's options (classification, val_steps, save_errors,
            explain, explanation); see DiffusionClassifierBase.
    """

    hparams_ignored = ("network",)

    def __init__(
        self,
        network: NetworkFactory,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        image_size: int = 256,
        image_channels: int = 3,
        wavelet: bool = True,
        grayscale: bool = False,
        schedule_base: int = 64,
        min_snr_gamma: float | None = 5.0,
        label_dropout: float = 0.1,
        learning_rate: float = 1e-4,
        warmup_steps: int = 250,
        augmentation: DiffusionAugmentation = DiffusionAugmentation(),
        train_t_range: tuple[float, float] = (0.0, 1.0),
        train_t_share: float = 1.0,
        discriminative_weight: float = 0.0,
        discriminative_tau: float = 0.02,
        discriminative_after: int = 0,
        discriminative_images: int = 16,
        **kwargs,
    ):
        super().__init__(num_classes, class_names, **kwargs)
        low, high = train_t_range
        if not 0.0 <= low < high <= 1.0 or not 0.0 <= train_t_share <= 1.0:
            raise ValueError(
                f"train_t_range={list(train_t_range)} must be [low, high] with 0 <= low < high <= 1, and "
                f"train_t_share={train_t_share} in [0, 1]"
            )
        if min(discriminative_weight, discriminative_after) < 0 or discriminative_tau <= 0 or discriminative_images < 1:
            raise ValueError(
                f"discriminative_weight={discriminative_weight} must be >= 0, discriminative_tau={discriminative_tau} "
                f"> 0, discriminative_after={discriminative_after} >= 0 and discriminative_images="
                f"{discriminative_images} >= 1"
            )
        if self.classification.band_weights is not None and not wavelet:
            raise ValueError("classification.band_weights weighs Haar bands: it needs wavelet: true")
        self.augmentation = augmentation
        self.transform = HaarWavelet() if wavelet else IdentityTransform()
        if grayscale:
            self.transform = GreyscaleTransform(self.transform, image_channels)
        model_channels = (1 if grayscale else image_channels) * (4 if wavelet else 1)
        model_size = image_size // 2 if wavelet else image_size
        self.network = network(num_classes, model_channels, model_size)
        self.schedule = ShiftedCosineSchedule(model_size, base=schedule_base)
        self.validations_done = 0

    # ---- how this model sees images and learns ---------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        return self.transform.encode(images)

    def denoiser(self) -> Denoiser:
        return self.network

    def explanation_transform(self, images: Tensor):
        return self.transform

    def diffusion_loss(self, x: Tensor, labels: Tensor, t: Tensor, eps: Tensor, dropout: float) -> Tensor:
        """Min-SNR-weighted v-loss of model inputs x (already wavelet-transformed)."""
        alpha, sigma = (broadcast_like(value, x) for value in self.schedule.alpha_sigma(t))
        z = diffuse(x, eps, alpha, sigma)
        labels = drop_labels(labels, self.network.null_label, dropout)
        v_hat = self.network(z, t, labels)
        return weighted_v_loss(
            v_hat, v_target(x, eps, alpha, sigma), self.schedule.logsnr(t), self.hparams.min_snr_gamma
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = self.encode(self.augmentation(batch["image"]))
        t = training_times(x.shape[0], self.hparams.train_t_range, self.hparams.train_t_share, self.device)
        loss = self.diffusion_loss(x, batch["label"], t, torch.randn_like(x), self.hparams.label_dropout)
        self.log("train/loss", loss, prog_bar=True)
        if self.hparams.discriminative_weight > 0 and self.global_step >= self.hparams.discriminative_after:
            few = slice(0, self.hparams.discriminative_images)
            errors = self.class_errors(x[few])
            fine_tune = discriminative_loss(errors, batch["label"][few], self.hparams.discriminative_tau)
            self.log("train/discriminative_loss", fine_tune)
            loss = loss + self.hparams.discriminative_weight * fine_tune
        return loss

    def class_errors(self, x: Tensor) -> Tensor:
        """(B, C) errors of model inputs x under every class, one shared (eps, t) per image, t uniform on
        classification.t_range, in the vote's error space and norm (with gradients: the fine-tune's input)."""
        settings, classes = self.classification, self.hparams.num_classes
        low, high = settings.t_range
        t = low + (high - low) * torch.rand(len(x), device=x.device)
        eps = torch.randn_like(x)
        alpha, sigma = (broadcast_like(value, x) for value in self.schedule.alpha_sigma(t))
        z = diffuse(x, eps, alpha, sigma)
        labels = torch.arange(classes, device=x.device).repeat(len(x))
        v_hat = self.network(z.repeat_interleave(classes, dim=0), t.repeat_interleave(classes), labels)
        grouped = lambda value: value.unsqueeze(1)  # noqa: E731
        return reconstruction_error(
            v_hat.view(len(x), classes, *x.shape[1:]), grouped(z), grouped(x), grouped(eps), grouped(alpha),
            grouped(sigma), settings.error_space, settings.error_norm,
            channel_weights(settings.band_weights, x.shape[1], x.device),
        )  # fmt: skip

    # ---- monitoring during fit -------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Runs with EMA weights: EMAWeightAveraging swaps them in at validation epoch start.
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.monitoring_due():
            self.log_monitoring_images(batch)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self.validations_done += 1

    def monitoring_due(self) -> bool:
        every = self.explanation.every_n_epochs
        due = every > 0 and not self.trainer.sanity_checking and (self.validations_done + 1) % every == 0
        return due and self.trainer.is_global_zero and hasattr(getattr(self.logger, "experiment", None), "add_figure")

    def log_monitoring_images(self, batch: dict) -> None:
        """Explanations of a few validation images and samples from noise, to TensorBoard. Called from
        validation_step, where EMAWeightAveraging has swapped the EMA weights in (its hooks run
        before the module's, and it swaps back before the module's on_validation_epoch_end).
        Where the batch marks the findings (`mask`), also the pointing game and the map's mass
        inside the mask over these few images' counterfactuals (explain/pointing_game,
        explain/mass_inside_mask), so you can watch the maps learn to point at the finding."""
        settings = dataclasses.replace(
            self.explanation, sampling_steps=self.explanation.monitor_steps, flip_steps=0, factual="label"
        )
        few = {key: batch[key][: settings.monitor_images] for key in ("image", "id", "label", "mask") if key in batch}
        record = self.explain(few, few["label"], settings)
        experiment, step = self.logger.experiment, self.global_step
        rows = explanation_rows(record | {"label": few["label"]})
        experiment.add_figure("explain/validation", plot_explanations(rows, self.class_names), global_step=step)
        self.log_localisation(record)
        model_input = (self.network.in_channels, self.network.sample_size, self.network.sample_size)
        per_class = 4
        samples = samples_from_noise(
            self.network,
            self.transform,
            self.schedule,
            model_input,
            self.hparams.num_classes,
            self.null_label,
            self.explanation,
            per_class,
        )
        experiment.add_image("explain/samples_from_noise", noise_sample_grid(samples, per_class), global_step=step)

    def log_localisation(self, record: dict) -> None:
        """explain/pointing_game and explain/mass_inside_mask of an explained batch that has masks; nothing
        when it has none or none of its images has a finding (the numbers would be undefined)."""
        if "hit" not in record:
            return
        counterfactual = counterfactuals(record["factual"], self.hparams.num_classes)
        numbers = localisation_numbers(record, counterfactual)
        if numbers["n_localised"]:
            for name in ("pointing_game", "mass_inside_mask"):
                self.logger.experiment.add_scalar(f"explain/{name}", numbers[name], global_step=self.global_step)

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams.learning_rate)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
