"""DiffusionClassifierBase: what every diffusion classifier does the same way, whatever its network.

  validation: the diffusion loss at one (eps, t) per image, seeded by image id, and the
              classification of each image with `val_steps` pairs (no early exit).
  test/predict: N shared (eps, t) pairs x C classes -> error matrix -> votes (diffusion/engine.py,
              diffusion/voting.py) -> per-image outputs (lightning_modules/base.py writes them).
  explain:    predict with `explain: true`: noise to t0 -> guided DDIM toward each class ->
              counterfactuals, difference maps, faithfulness numbers (diffusion/explain.py),
              written by reports/explanations.py.

A subclass says only how it sees images and conditions its denoiser:
  encode(images)              pixels in [-1, 1] -> the model's inputs x (wavelet bands, VAE latents)
  denoiser()                  f(z, t, labels) -> v_hat, labels in [0, C], C the null label
  schedule                    alpha_sigma(t) of the model's noise schedule
  diffusion_loss(x, labels, t, eps, dropout)   the training objective at given (t, eps)
  explanation_transform(images)   encode/decode between pixels and model space, for explanations
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from decisions.calibration import CalibrationSettings
from decisions.ood_scores import DIFFUSION_SCORES
from diffusion.engine import VIEWS, ClassifierSettings, NonFiniteOutputError, classify_images, step_profile, step_times
from diffusion.explain import ExplainSettings, explain_batch
from diffusion.noise import VALIDATION_LOSS_SEED, image_keys, shared_noise
from diffusion.voting import summarize

from .base import ClassifierModule


class DiffusionClassifierBase(ClassifierModule):
    """Classification, validation and explanations of a diffusion model (see the module docstring).

    The options below are every diffusion classifier's (`model.init_args.<name>`); a subclass
    takes its own and hands these on as **kwargs. Its `hparams_ignored` are left out of the
    checkpoint's hyperparameters (objects and machine-specific paths).

    Args:
        num_classes: number of classes; linked from the datamodule by cli.py.
        class_names: class names, for logs and outputs; linked from the datamodule.
        classification: how test and predict classify (N = num_steps, rule, error space, seed,
            early exit, pruning); see ClassifierSettings.
        val_steps: (eps, t) pairs per image when classifying during validation (same settings,
            no early exit); small, since it runs at every validation; 0 logs val/loss only.
        save_errors: also save every image's full C x N error matrix (`errors.pt` beside
            metrics.json after test, beside predictions.csv after predict), for research.
        explain: `predict` also explains every image: factual and counterfactual reconstructions,
            difference maps, PNGs, .npz and explain.json (see reports/explanations.py).
        explanation: how explanations are made (t0, guidance scale, DDIM steps, flip check) and
            how often fit logs monitoring images; see ExplainSettings.
        calibration: the decision rules `validate` fits on the validation split (referral threshold,
            conformal prediction sets) and test and predict apply; see CalibrationSettings.
    """

    hparams_ignored: tuple[str, ...] = ()
    ood_scores = DIFFUSION_SCORES

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        classification: ClassifierSettings = ClassifierSettings(),
        val_steps: int = 16,
        save_errors: bool = False,
        explain: bool = False,
        explanation: ExplainSettings = ExplainSettings(),
        calibration: CalibrationSettings = CalibrationSettings(),
    ):
        super().__init__(num_classes, class_names, calibration=calibration)
        # the caller's (a subclass's __init__) arguments too: Lightning collects every __init__ frame of self
        self.save_hyperparameters(ignore=list(self.hparams_ignored))
        self.classification = classification
        self.val_classification = dataclasses.replace(
            classification, num_steps=max(val_steps, 1), early_exit="none", prune_after=0
        )
        self.explanation = explanation

    # ---- what a subclass provides ----------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def denoiser(self):
        raise NotImplementedError

    def diffusion_loss(self, x: Tensor, labels: Tensor, t: Tensor, eps: Tensor, dropout: float) -> Tensor:
        raise NotImplementedError

    def explanation_transform(self, images: Tensor):
        raise NotImplementedError

    @property
    def null_label(self) -> int:
        return self.hparams.num_classes

    # ---- training and validation -----------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.encode(batch["image"])
        t, eps = shared_noise(
            image_keys(batch["image"]).to(x.device), range(1), tuple(x.shape[1:]), VALIDATION_LOSS_SEED
        )
        loss = self.diffusion_loss(x, batch["label"], t[:, 0].to(x.dtype), eps[:, 0].to(x.dtype), dropout=0.0)
        self.log("val/loss", loss, batch_size=len(x), sync_dist=True)
        if self.calibrating():  # `validate`: as test classifies, for the calibration
            outputs = self.classify_batch(batch)
            self.record_validation(batch, outputs["prediction"], outputs)
        elif self.hparams.val_steps > 0:
            self.record_validation(batch, self.classify(batch, self.val_classification, x)["prediction"])

    # ---- classification -------------------------------------------------------------------
    def classify(self, batch: dict, settings: ClassifierSettings, x: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image outputs for a batch (see voting.summarize), plus forwards, errors, id, label, path.
        The (eps, t) pairs are keyed by each image's content (diffusion.noise.image_keys), not its row id.
        With several test-time views (settings.views), each view of the image is classified as an image of its own
        (its pixels' keys, the view's seed) and the errors of all views are voted together, view after view."""
        runs, times = [], []
        for index, view in enumerate(settings.views):
            view_settings, images = settings.view_settings(index), VIEWS[view](batch["image"])
            keys = image_keys(images)  # a view's pairs: keyed by its own pixels and drawn with its own seed
            view_x = x if x is not None and view == "identity" else self.encode(images)
            try:
                runs.append(
                    classify_images(
                        self.denoiser(), view_x, keys.to(view_x.device), self.hparams.num_classes, self.schedule,
                        view_settings,
                    )
                )  # fmt: skip
            except NonFiniteOutputError as error:
                raise NonFiniteOutputError(f"{error}; weights: {self.weights_source()}") from None
            times.append(step_times(keys.to(view_x.device), view_settings))
        errors = torch.cat([run["errors"] for run in runs], dim=2)
        outputs = summarize(errors, settings.rule, view_x[0].numel()) | {
            "forwards": sum(run["forwards"] for run in runs),
            "errors": errors,
        }
        # what the out-of-distribution scores read: the best class's error at each step, and the step's t
        outputs |= {"step_errors": step_profile(errors), "step_times": torch.cat(times, dim=1)}
        return outputs | self.passed_through(batch)

    def weights_source(self) -> str:
        """Where the weights come from, for error messages: the checkpoint, or the training run."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return "not from a checkpoint (the model as built)"
        return (
            f"checkpoint {trainer.ckpt_path}"
            if trainer.ckpt_path
            else f"the run being trained at step {trainer.global_step}"
        )

    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        outputs = self.classify(batch, self.classification)
        if not self.hparams.save_errors:
            outputs.pop("errors")
        return outputs

    def results_settings(self) -> ClassifierSettings:
        return self.classification

    def decision_settings(self) -> dict:
        # max_forward_batch changes how the pairs are cut into forwards, never a result (tests/test_engine.py)
        return {key: value for key, value in dataclasses.asdict(self.classification).items()
                if key != "max_forward_batch"}  # fmt: skip

    # ---- explanation ----------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The batch's outputs, with its explanation under `explanation` when `explain` (ResultsWriter writes it)."""
        outputs = super().predict_step(batch, batch_idx)
        if self.hparams.explain:
            outputs["explanation"] = self.explain(batch, outputs["prediction"], self.explanation)
        return outputs

    def explain(self, batch: dict, predictions: Tensor, settings: ExplainSettings) -> dict[str, Tensor]:
        """Factual and counterfactual reconstructions of a batch, difference maps, faithfulness numbers;
        the flip check classifies each reconstruction with N = settings.flip_steps."""
        if settings.factual == "label" and "label" not in batch:
            raise ValueError("explanation.factual='label' needs labelled data; use factual: predicted")
        factual = batch["label"] if settings.factual == "label" else predictions
        classify_pixels = None  # flip_steps = 0: no flip check
        if settings.flip_steps > 0:
            flip_settings = dataclasses.replace(self.classification, num_steps=settings.flip_steps)

            def classify_pixels(images: Tensor, keys: Tensor) -> Tensor:
                return self.classify({"image": images, "id": keys}, flip_settings)["prediction"]

        images = batch["image"]
        record = explain_batch(
            self.denoiser(),
            self.explanation_transform(images),
            self.schedule,
            images,
            image_keys(images),  # the explanation noise is the image's own, like its classification pairs
            factual,
            self.hparams.num_classes,
            self.null_label,
            settings,
            classify_pixels,
            self.classification.max_forward_batch,
            masks=batch.get("mask"),
        )
        return record | {"id": batch["id"]}  # rows are kept by row id
