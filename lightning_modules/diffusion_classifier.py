"""DiffusionClassifier: a class-conditional diffusion model trained as a generator, used as a classifier.

Thin Lightning glue around the maths in `diffusion/` (schedule, wavelet, loss, noise, classify,
voting, early_exit):
  fit:       t ~ U(0,1) -> shifted-cosine logSNR -> z = alpha*x + sigma*eps -> v-loss * min-SNR weight
  val/test:  N shared (eps, t) pairs x C classes -> error matrix -> votes -> prediction, entropy
  explain:   noise to t0 -> guided DDIM toward each class -> counterfactuals, difference maps
             (predict with `explain: true`; monitoring images during fit)
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
from .diffusion.explain import ExplainSettings
from .diffusion.loss import drop_labels, weighted_v_loss
from .diffusion.noise import seed_per_rank, shared_noise
from .diffusion.parameterization import diffuse, v_target
from .diffusion.schedule import ShiftedCosineSchedule, broadcast_like
from .diffusion.voting import summarize
from .diffusion.wavelet import HaarWavelet, IdentityTransform
from .evaluation import TestOutputs
from .explanations import ExplainsPredictions, ExplanationOutputs, explain_batch, explanation_rows, plot_explanations, sample_grid
from .networks.base import Denoiser

# (num_classes, in_channels, sample_size) -> denoiser f(z, t, labels) -> v_hat
NetworkFactory = Callable[[int, int, int], Denoiser]
VALIDATION_LOSS_SEED = -1  # classification seeds are >= 0: the val-loss noise is a stream of its own


class DiffusionClassifier(ExplainsPredictions, L.LightningModule):
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
        explain: `predict` also explains every image: factual and counterfactual reconstructions,
            difference maps, PNGs, .npz and explain.json (see lightning_modules/explanations.py).
        explanation: how explanations are made (t0, guidance scale, DDIM steps, flip check) and
            how often fit logs monitoring images; see ExplainSettings.
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
        explain: bool = False,
        explanation: ExplainSettings = ExplainSettings(),
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
            {"accuracy": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes, average="macro")},
            prefix="val/",
        )
        self.test_outputs = TestOutputs(self.class_names)
        self.explanation = explanation
        self.explanation_outputs = ExplanationOutputs(self.class_names, explanation)
        self.validations_done = 0

    # ---- training -------------------------------------------------------------------------
    def diffusion_loss(self, x: Tensor, labels: Tensor, t: Tensor, eps: Tensor, dropout: float) -> Tensor:
        """Min-SNR-weighted v-loss of model inputs x (already wavelet-transformed)."""
        alpha, sigma = (broadcast_like(value, x) for value in self.schedule.alpha_sigma(t))
        z = diffuse(x, eps, alpha, sigma)
        labels = drop_labels(labels, self.network.null_label, dropout)
        v_hat = self.network(z, t, labels)
        return weighted_v_loss(v_hat, v_target(x, eps, alpha, sigma), self.schedule.logsnr(t), self.hparams.min_snr_gamma)

    def on_train_start(self) -> None:
        seed_per_rank(self.trainer.world_size, self.global_rank)

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
        # logging the metric objects: Lightning computes them (synchronised over ranks) and resets at epoch end
        self.log_dict(self.val_metrics, prog_bar=True)
        if batch_idx == 0 and self.monitoring_due():
            self.log_monitoring_images(batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations_done += 1

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
        self.explain_predictions(batch, outputs["prediction"])
        return outputs

    # ---- explanation ----------------------------------------------------------------------

    def explain(self, batch: dict, predictions: Tensor, settings: ExplainSettings) -> dict[str, Tensor]:
        """Factual and counterfactual reconstructions of a batch, difference maps, faithfulness numbers."""
        if settings.factual == "label" and "label" not in batch:
            raise ValueError("explanation.factual='label' needs labelled data; use factual: predicted")
        factual = batch["label"] if settings.factual == "label" else predictions
        classify_pixels = None
        if settings.flip_steps > 0:
            flip_settings = dataclasses.replace(self.classification, num_steps=settings.flip_steps)

            def classify_pixels(images: Tensor, ids: Tensor) -> Tensor:
                return self.classify({"image": images, "id": ids}, flip_settings)["prediction"]

        return explain_batch(
            self.network, self.transform, self.schedule, batch["image"], batch["id"], factual, self.hparams.num_classes,
            self.network.null_label, settings, classify_pixels, self.classification.max_forward_batch,
        )

    def monitoring_due(self) -> bool:
        every = self.explanation.every_n_epochs
        due = every > 0 and not self.trainer.sanity_checking and (self.validations_done + 1) % every == 0
        return due and self.trainer.is_global_zero and hasattr(getattr(self.logger, "experiment", None), "add_figure")

    def log_monitoring_images(self, batch: dict) -> None:
        """Explanations of a few validation images and samples from noise, to TensorBoard. Called from
        validation_step, where EMAWeightAveraging has swapped the EMA weights in (its hooks run
        before the module's, and it swaps back before the module's on_validation_epoch_end)."""
        settings = dataclasses.replace(self.explanation, sampling_steps=self.explanation.monitor_steps, flip_steps=0)
        count = settings.monitor_images
        few = {key: batch[key][:count] for key in ("image", "id", "label")}
        record = explain_batch(
            self.network, self.transform, self.schedule, few["image"], few["id"], few["label"], self.hparams.num_classes,
            self.network.null_label, settings,
        )
        rows = explanation_rows(record | {"label": few["label"]})
        experiment, step = self.logger.experiment, self.global_step
        experiment.add_figure("explain/validation", plot_explanations(rows, self.class_names), global_step=step)
        model_input = (self.network.in_channels, self.network.sample_size, self.network.sample_size)
        grid = sample_grid(
            self.network, self.transform, self.schedule, model_input, self.hparams.num_classes, self.network.null_label,
            self.explanation,
        )
        experiment.add_image("explain/samples_from_noise", grid, global_step=step)

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams.learning_rate)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
