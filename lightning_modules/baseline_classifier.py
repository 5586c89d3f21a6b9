"""BaselineClassifier: the paper's discriminative baselines (Table 1, Appendix B) on the same data,
metrics and output files as the diffusion classifiers.

  fit:      Appendix B.2 augmentations on the batch (per image) -> backbone -> cross-entropy, Adam
  test:     softmax (or the mean softmax of T MC-dropout passes) -> prediction, probs, entropy,
            score -> metrics.json, predictions.csv and the uncertainty figures (ClassifierModule)
  predict:  the same per-image outputs, written the same way
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.augmentation import BLUR_P, BatchAugmentation, training_augmentation
from decisions.calibration import CalibrationSettings
from decisions.ood_scores import BASELINE_SCORES
from networks.backbones import BACKBONES, build_backbone
from reports.results import outputs_from_probs

from .base import ClassifierModule


class BaselineClassifier(ClassifierModule):
    """A torchvision / timm image classifier trained with cross-entropy (paper sec. 3.2, App. B).

    Args:
        backbone: one of resnet18, resnet50, efficientnet_b0, efficientnet_b4, vit_s16, vit_b16, swin_b.
        num_classes: number of classes; linked from the datamodule by cli.py.
        class_names: class names, for logs and outputs; linked from the datamodule.
        image_size: side of the (square) input images; linked from the datamodule (ViT and Swin
            are built for it).
        image_channels: channels of the input images; linked from the datamodule.
        pretrained_path: a local weights file or folder to start from (a classifier head of
            another size is replaced); null = random initialisation. Nothing is downloaded.
        drop_rate: dropout before the classification head (0 = none, the official models).
        learning_rate: Adam learning rate (paper B.1: 1e-4 ResNet/EfficientNet, 1e-5 ViT/Swin).
        weight_decay: Adam weight decay (paper B.1: 1e-5 on ISIC, 1e-3 on CheXpert for
            ResNet/EfficientNet; none given for ViT/Swin).
        augment: apply the Appendix B.2 training augmentations (rotation, flips, blur).
        blur_p: probability of the Gaussian blur (the paper says only "random"; 0.5 like the flips).
        intensity_jitter: strength of an extra brightness/contrast jitter (not in the paper; 0 = off),
            for data whose test images come from other scanners (see augmentation.py).
        label_smoothing: cross-entropy label smoothing (not in the paper; 0 = off).
        standardize: give the backbone each image minus its own mean, divided by its own standard
            deviation (not in the paper; off): removes global exposure and contrast, which differ
            between scanners and sites, in training and evaluation alike.
        test_time_flips: test and predict average the softmax over the image and its horizontal,
            vertical and double flip (not in the paper; off): the B.2 augmentations train the
            network to be invariant to exactly these flips, and the average of four views is a
            steadier decision than one (measured on PneumoniaMNIST, README). Combines with MC
            dropout (T passes per view).
        mc_dropout_passes: T > 0: test and predict average the softmax of T forwards with the
            dropout layers active (MC dropout; needs drop_rate > 0) and report the entropy of that
            mean; 0: a single deterministic forward and its softmax entropy.
        calibration: the decision rules `validate` fits on the validation split (referral threshold
            on the entropy, conformal prediction sets on the probabilities); see CalibrationSettings.
    """

    ood_scores = BASELINE_SCORES

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        image_size: int = 256,
        image_channels: int = 3,
        pretrained_path: str | None = None,
        drop_rate: float = 0.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        augment: bool = True,
        blur_p: float = BLUR_P,
        intensity_jitter: float = 0.0,
        label_smoothing: float = 0.0,
        standardize: bool = False,
        test_time_flips: bool = False,
        mc_dropout_passes: int = 0,
        calibration: CalibrationSettings = CalibrationSettings(),
    ):
        uncertainty = f"MC-dropout entropy (T={mc_dropout_passes})" if mc_dropout_passes else "softmax entropy"
        flips = " of the mean over 4 flips" if test_time_flips else ""
        super().__init__(num_classes, class_names, uncertainty + flips, calibration)
        if mc_dropout_passes < 0:
            raise ValueError(f"mc_dropout_passes must be >= 0, got {mc_dropout_passes}")
        self.save_hyperparameters()
        self.network = build_backbone(backbone, num_classes, image_size, image_channels, pretrained_path, drop_rate)
        if mc_dropout_passes and not dropout_layers(self.network):
            raise ValueError(
                f"mc_dropout_passes={mc_dropout_passes} needs dropout: set drop_rate > 0 (backbone {backbone})"
            )
        self.augmentation = (
            BatchAugmentation(training_augmentation(blur_p=blur_p, intensity=intensity_jitter))
            if augment
            else nn.Identity()
        )

    @property
    def display_name(self) -> str:
        return BACKBONES[self.hparams.backbone].display_name

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.standardize:
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = (images - mean) / images.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        return self.network(images)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = self.augmentation(batch["image"])  # the module is in train mode here: augments
        loss = F.cross_entropy(self(images), batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), batch_size=len(logits), sync_dist=True)
        if self.calibrating():  # `validate`: as test classifies (MC dropout, flips), for the calibration
            outputs = self.classify_batch(batch)
            self.record_validation(batch, outputs["prediction"], outputs)
        else:
            self.record_validation(batch, logits.argmax(dim=1))

    # ---- classification -------------------------------------------------------------------
    def class_probabilities(self, images: Tensor) -> Tensor:
        """Softmax of one forward, or the mean softmax of T MC-dropout forwards (Gal & Ghahramani 2016);
        with test_time_flips, the mean of that over the four flips of the image."""
        return self.probabilities_and_energy(images)[0]

    def probabilities_and_energy(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The class probabilities (see class_probabilities) and the energy -logsumexp(logits) (Liu et al.
        2020, an out-of-distribution score), both averaged over the same forwards."""
        views = (
            (images, images.flip(-1), images.flip(-2), images.flip(-2, -1))
            if self.hparams.test_time_flips
            else (images,)
        )
        logits = torch.cat([self.view_logits(view) for view in views])  # (forwards, B, C)
        return logits.softmax(dim=2).mean(dim=0), -torch.logsumexp(logits, dim=2).mean(dim=0)

    def view_logits(self, images: Tensor) -> Tensor:
        """(P, B, C) logits: one deterministic forward, or T MC-dropout forwards."""
        passes = self.hparams.mc_dropout_passes
        if not passes:
            return self(images).float()[None]
        with dropout_active(self.network):
            return torch.stack([self(images).float() for _ in range(passes)])

    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        """Per-image outputs (see reports.results.outputs_from_probs), the energy, id, label and path."""
        probs, energy = self.probabilities_and_energy(batch["image"])
        return outputs_from_probs(probs) | {"energy": energy} | self.passed_through(batch)

    def decision_settings(self) -> dict:
        return {key: self.hparams[key] for key in ("test_time_flips", "mc_dropout_passes", "standardize")}

    def results_info(self) -> dict:
        return {
            "model": self.display_name,
            "uncertainty": "mc_dropout_entropy" if self.hparams.mc_dropout_passes else "softmax_entropy",
            "mc_dropout_passes": self.hparams.mc_dropout_passes,
            "test_time_flips": self.hparams.test_time_flips,
        }

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        # Appendix B.1: plain Adam with weight decay, constant learning rate.
        return torch.optim.Adam(
            self.network.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


def dropout_layers(network: nn.Module) -> list[nn.Module]:
    """The network's dropout modules that drop something (p > 0)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@contextmanager
def dropout_active(network: nn.Module):
    """Dropout layers in training mode, everything else (BatchNorm above all) as it was."""
    layers = dropout_layers(network)
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.train()
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)
