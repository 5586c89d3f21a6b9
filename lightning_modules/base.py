"""ClassifierModule: what every classifier of the suite does the same way, diffusion or discriminative.

  validation: per-image predictions are collected and, at the epoch's end, gathered over ranks
              and kept once per image id, so `val/accuracy` and `val/f1` count each image once.
  validate:   (the subcommand, outside fit) the validation images are classified as test would
              classify them, and the run is calibrated on them: calibration.json in the run's folder
              holds a referral threshold and conformal-set thresholds (decisions/referral_and_sets.py).
  test:       per-image outputs (test_step) -> callbacks.ResultsWriter -> predictions.csv,
              metrics.json, figures, and `test/...` scalars in the logger; with the run's
              calibration, also who is referred, the prediction sets and how both did.
  predict:    the same per-image outputs, written by the same ResultsWriter (predictions.csv).

A subclass implements `classify_batch(batch) -> per-image outputs` (see reports.results for the
keys) and its validation_step calls `record_validation`; it may add `results_info()`, extra
metrics.json entries, and `results_settings()`, the diffusion classifier's ClassifierSettings.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from decisions.binding import short, weights_digest
from decisions.calibration import (
    CalibrationSettings,
    calibrate,
    calibration_lines,
    rule_status,
    rules_off,
)
from experiment.run_folders import calibration_file
from reports.results import concat_outputs, gather_unique

PASSED_THROUGH = ("id", "label", "path")  # batch keys that go into the per-image outputs as they are


class ClassifierModule(L.LightningModule):
    """Base of DiffusionClassifier, StableDiffusionClassifier and BaselineClassifier (see module docstring)."""

    ood_scores: tuple[str, ...] = ()
    """The out-of-distribution scores this kind of model can give (decisions/ood_scores.py), its default first."""

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None,
        uncertainty_name: str = "vote entropy",
        calibration: CalibrationSettings = CalibrationSettings(),
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names {list(class_names)} for num_classes={num_classes}")
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        if calibration.ood_score is not None and calibration.ood_score not in self.ood_scores:
            raise ValueError(
                f"calibration.ood_score={calibration.ood_score!r} is not a score of {type(self).__name__}; "
                f"choose one of {self.ood_scores}"
            )
        self.uncertainty_name = uncertainty_name  # what `entropy` is, in the figures' labels
        self.calibration = calibration
        self.validation_rows: list[dict] = []
        self.calibration_rows: list[dict] = []
        self.pretrained_folder: Path | None = None  # an exported folder the weights were loaded from

    # ---- what a subclass provides ----------------------------------------------------------
    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        """Test and predict's per-image outputs for a batch (prediction, probs, entropy, score, ...)."""
        raise NotImplementedError

    def results_info(self) -> dict:
        """Extra metrics.json entries (the model, its uncertainty, its settings)."""
        return {}

    def weights_origin(self) -> str | None:
        """Where the classifying weights come from (calibration.json's `checkpoint`); None: untrained."""
        return self.trainer.ckpt_path or (str(self.pretrained_folder) if self.pretrained_folder else None)

    @classmethod
    def from_pretrained(cls, folder):
        """The classifier exported to `folder` by tools/export.py (safetensors weights, nothing unpickled), its
        weights checked against the digest of its config.yaml; test and predict apply the folder's calibration."""
        from experiment.pretrained import PretrainedFolderError, load_pretrained

        model = load_pretrained(folder)
        if not isinstance(model, cls):
            raise PretrainedFolderError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def results_settings(self):
        """The diffusion classifiers' ClassifierSettings (metrics.json's N, rule, forwards); None otherwise."""
        return None

    def decision_settings(self) -> dict:
        """The options that change a per-image output, which a calibration is bound to (decisions/binding.py)."""
        return {}

    @staticmethod
    def passed_through(batch: dict) -> dict:
        return {key: batch[key] for key in PASSED_THROUGH if key in batch}

    # ---- validation -------------------------------------------------------------------------
    def calibrating(self) -> bool:
        """The `validate` subcommand (not fit's validation): classify as test does, then calibrate."""
        return self.trainer.state.fn == TrainerFn.VALIDATING

    def record_validation(self, batch: dict, predictions: Tensor, outputs: dict | None = None) -> None:
        """Keeps a validation batch's predictions for the epoch-end metrics, and, when calibrating,
        its full per-image `outputs`."""
        row = {"id": batch["id"], "prediction": predictions, "label": batch["label"]}
        self.validation_rows.append({key: value.detach().cpu() for key, value in row.items()})
        if outputs is not None and self.calibrating():
            self.calibration_rows.append(
                {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in outputs.items()}
            )

    def on_validation_epoch_end(self) -> None:
        # Every rank gathers all ranks' rows and keeps one per image id: the padding repeats of
        # DistributedSampler count once, and every rank logs the same numbers.
        rows, self.validation_rows = gather_unique(concat_outputs(self.validation_rows), self.trainer), []
        if rows:
            num_classes = len(self.class_names)
            predictions, labels = rows["prediction"], rows["label"]
            accuracy = multiclass_accuracy(predictions, labels, num_classes, average="micro")
            f1 = multiclass_f1_score(predictions, labels, num_classes, average="macro")
            self.log_dict({"val/accuracy": accuracy, "val/f1": f1}, prog_bar=True)
        if self.calibrating():
            self.write_calibration(gather_unique(concat_outputs(self.calibration_rows), self.trainer))
        self.calibration_rows = []

    # ---- calibration ------------------------------------------------------------------------
    def write_calibration(self, outputs: dict) -> None:
        if not outputs:
            return
        self.check_whole_validation_split(len(outputs["id"]))
        try:
            calibration = calibrate(outputs, self.calibration, len(self.class_names), self.ood_score_name())
        except ValueError as refusal:  # not labelled: validate still reports its metrics
            rank_zero_warn(f"validation did not calibrate the decision rules: {refusal}")
            return
        calibration |= {"weights": weights_digest(self), "classification": self.decision_settings(),
                        "checkpoint": self.weights_origin()}  # fmt: skip
        if self.trainer.is_global_zero:
            file = calibration_file(self.weights_origin(), bool(self.pretrained_folder), self.trainer.default_root_dir)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(calibration, indent=2) + "\n")
            rank_zero_info(f"calibrated on {calibration['n_calibration']} validation images (weights "
                           f"{short(calibration['weights'])}) -> {file}")  # fmt: skip
            status = rule_status(calibration)
            for rule, line in calibration_lines(calibration).items():
                if status[rule]["on"]:
                    rank_zero_info(f"  {line}")
            for line in rules_off(calibration):
                rank_zero_warn(line)

    def check_whole_validation_split(self, calibrated: int) -> None:
        """Refuse to calibrate on part of the validation split: the refusal would be off for too few images,
        the thresholds noisier, and nothing would say so. cli.py's validate asks for all of it."""
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and len(loaders) == 1 else loaders
        dataset = getattr(loader, "dataset", None)
        total = len(dataset) if hasattr(dataset, "__len__") else None
        if total is not None and calibrated < total:
            raise ValueError(
                f"validate classified {calibrated} of the {total} validation images "
                f"(trainer.limit_val_batches={self.trainer.limit_val_batches}): a calibration needs the whole "
                "validation split; run validate with --trainer.limit_val_batches 1.0"
            )

    def ood_score_name(self) -> str:
        """The out-of-distribution score validate calibrates: the configured one, or the model's default."""
        return self.calibration.ood_score or self.ood_scores[0]

    # ---- test and predict: the module classifies, callbacks.ResultsWriter (configured by cli.py or tools.classify)
    #      writes ------------------------------------------------------------------------------------------------
    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self.classify_batch(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self.classify_batch(batch)


def calibrate_on_whole_split(trainer) -> None:
    """`validate` calibrates, on every validation image: a limit that suits fit's frequent validations
    (configs/base/diffusion_cpu.yaml: 2 batches) would leave too few images for the refusal. cli.py calls it."""
    limit = trainer.limit_val_batches
    if isinstance(limit, int) or limit != 1.0:  # an int counts batches: 1 is one batch, 1.0 all of them
        rank_zero_info(f"validate classifies the whole validation split to calibrate on it: "
                       f"trainer.limit_val_batches={limit} (fit's setting) is not used")  # fmt: skip
        trainer.limit_val_batches = 1.0
