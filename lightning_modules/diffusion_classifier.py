"""DiffusionClassifier: a class-conditional diffusion model trained as a generator, used as a classifier.

Thin Lightning glue around the maths in `diffusion/` (schedule, wavelet, loss, noise, classify,
voting, early_exit):
  fit:       t ~ U(0,1) -> shifted-cosine logSNR -> z = alpha*x + sigma*eps -> v-loss * min-SNR weight
  val/test:  N shared (eps, t) pairs x C classes -> error matrix -> votes -> prediction, entropy
EMA weights come from Lightning's EMAWeightAveraging callback (see configs), which swaps them in
for validation and writes them to the checkpoint's state_dict.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .diffusion.classify import ClassifierSettings, classify_images
from .diffusion.loss import drop_labels, weighted_v_loss
from .diffusion.noise import shared_noise
from .diffusion.parameterization import diffuse, v_target
from .diffusion.schedule import ShiftedCosineSchedule, broadcast_like
from .diffusion.voting import summarize
from .diffusion.wavelet import HaarWavelet, IdentityTransform
from .evaluation import TestOutputs
from .networks.base import Denoiser

# (num_classes, in_channels, sample_size) -> denoiser f(z, t, labels) -> v_hat
NetworkFactory = Callable[[int, int, int], Denoiser]
VALIDATION_LOSS_SEED = -1  # classification seeds are >= 0: the val-loss noise is a stream of its own


class DiffusionClassifier(L.LightningModule):
    """Class-conditional v-prediction diffusion model that classifies by per-class denoising error.

    Args:
        network: the denoiser, built as `network(num_classes, in_channels, sample_size)`; give its
            `class_path` and its own options in the config (e.g. `lightning_modules.networks.ClassConditionalUNet`).
        num_classes: number of classes; linked from the datamodule by cli.py.
        class_names: class names, for logs and outputs; linked from the datamodule.
        image_size: side of the (square) input images; linked from the datamodule.
        image_channels: channels of the input images; linked from the datamodule.
        wavelet: model single-stage Haar wavelet coefficients (4C x H/2 x W/2) instead of pixels.
        schedule_base: base resolution of the shifted-cosine schedule (paper: 64); the shift uses
            the side of the model input (image_size / 2 with the wavelet).
        min_snr_gamma: gamma of the min-SNR loss weight (paper: 5); null for a plain v-loss.
        label_dropout: probability of replacing a training label by the null label, for
            classifier-free guidance (paper: 0.1).
        learning_rate: Adam learning rate (paper B.1: 1e-4).
        warmup_steps: steps of linear learning-rate warm-up (paper B.1: 250).
        classification: how test and predict classify (N = num_steps, rule, error space, seed,
            early exit, pruning); see ClassifierSettings.
        val_steps: (eps, t) pairs per image when classifying during validation (same settings,
            no early exit); small, since it runs at every validation.
        save_errors: also save every image's full C x N error matrix (`errors.pt` beside
            metrics.json after test, in each predictions batch during predict), for research.
    """

    def __init__(
        self,
        network: NetworkFactory,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        image_size: int = 256,
        image_channels: int = 3,
        wavelet: bool = True,
        schedule_base: int = 64,
        min_snr_gamma: float | None = 5.0,
        label_dropout: float = 0.1,
        learning_rate: float = 1e-4,
        warmup_steps: int = 250,
        classification: ClassifierSettings = ClassifierSettings(),
        val_steps: int = 16,
        save_errors: bool = False,
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names {class_names} for num_classes={num_classes}")
        self.save_hyperparameters(ignore=["network"])
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        self.classification = classification
        self.val_classification = dataclasses.replace(classification, num_steps=val_steps, early_exit="none", prune_after=0)
        self.transform = HaarWavelet() if wavelet else IdentityTransform()
        model_channels = image_channels * 4 if wavelet else image_channels
        model_size = image_size // 2 if wavelet else image_size
        self.network = network(num_classes, model_channels, model_size)
        self.schedule = ShiftedCosineSchedule(model_size, base=schedule_base)
        self.val_metrics = MetricCollection(
            {"accuracy": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes, average="macro")}
        )
        self.test_outputs = TestOutputs(self.class_names)

    # ---- training -------------------------------------------------------------------------
    def diffusion_loss(self, x: Tensor, labels: Tensor, t: Tensor, eps: Tensor, dropout: float) -> Tensor:
        """Min-SNR-weighted v-loss of model inputs x (already wavelet-transformed)."""
        alpha, sigma = (broadcast_like(value, x) for value in self.schedule.alpha_sigma(t))
        z = diffuse(x, eps, alpha, sigma)
        labels = drop_labels(labels, self.network.null_label, dropout)
        v_hat = self.network(z, t, labels)
        return weighted_v_loss(v_hat, v_target(x, eps, alpha, sigma), self.schedule.logsnr(t), self.hparams.min_snr_gamma)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = self.transform.encode(batch["image"])
        t = torch.rand(x.shape[0], device=self.device)
        loss = self.diffusion_loss(x, batch["label"], t, torch.randn_like(x), self.hparams.label_dropout)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ---- classification -------------------------------------------------------------------
    def classify(self, batch: dict, settings: ClassifierSettings) -> dict[str, Tensor]:
        """Per-image outputs for a batch (see voting.summarize), plus forwards, errors, id, label."""
        run = classify_images(
            self.network, self.transform.encode(batch["image"]), batch["id"], self.hparams.num_classes, self.schedule, settings
        )
        outputs = summarize(run["errors"], settings.rule) | {"forwards": run["forwards"], "errors": run["errors"]}
        outputs |= {key: batch[key] for key in ("id", "label", "path") if key in batch}
        return outputs

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Runs with EMA weights: EMAWeightAveraging swaps them in at validation epoch start.
        x, labels, ids = self.transform.encode(batch["image"]), batch["label"], batch["id"]
        t, eps = shared_noise(ids, range(1), tuple(x.shape[1:]), VALIDATION_LOSS_SEED)
        loss = self.diffusion_loss(x, labels, t[:, 0].to(self.device), eps[:, 0].to(x), dropout=0.0)
        self.log("val/loss", loss, batch_size=len(x), sync_dist=True)
        self.val_metrics.update(self.classify(batch, self.val_classification)["prediction"], labels)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self.classify(batch, self.classification)
        if not self.hparams.save_errors:
            outputs.pop("errors")
        self.test_outputs.add(outputs)

    def on_test_epoch_end(self) -> None:
        metrics = self.test_outputs.finish(self.trainer, self.classification)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        scalars |= {f"accuracy_filtered/{fraction}": v for fraction, v in metrics["accuracy_filtered"].items()}
        self.log_dict({f"test/{k}": v for k, v in scalars.items()})

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        outputs = self.classify(batch, self.classification)
        if not self.hparams.save_errors:
            outputs.pop("errors")
        return outputs

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams.learning_rate)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
