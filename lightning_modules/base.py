"""ClassifierModule: what every classifier of the suite does the same way, diffusion or discriminative.

  validation: per-image predictions are collected and, at the epoch's end, gathered over ranks
              and kept once per image id, so `val/accuracy` and `val/f1` count each image once.
  validate:   (the subcommand, outside fit) the validation images are classified as test would
              classify them, and the run is calibrated on them: calibration.json in the run's folder
              holds a referral threshold and conformal-set thresholds (evaluation/calibration.py).
  test:       per-image outputs -> evaluation.results.PerImageResults -> predictions.csv,
              metrics.json, figures, and `test/...` scalars in the logger; with the run's
              calibration, also who is referred, the prediction sets and how both did.
  predict:    the same per-image outputs, written by the same PerImageResults (predictions.csv).

A subclass implements `classify_batch(batch) -> per-image outputs` (see evaluation.results for the
keys) and its validation_step calls `record_validation`; it may add `results_info()`, extra
metrics.json entries, and `results_settings()`, the diffusion classifier's ClassifierSettings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from evaluation.decisions import OOD_BLOCK, CalibrationSettings, calibrate
from evaluation.results import PerImageResults, concat_outputs, gather_unique

PASSED_THROUGH = ("id", "label", "path")  # batch keys that go into the per-image outputs as they are
CALIBRATION_FILE = "calibration.json"


class ClassifierModule(L.LightningModule):
    """Base of DiffusionClassifier, StableDiffusionClassifier and BaselineClassifier (see module docstring)."""

    ood_scores: tuple[str, ...] = ()
    """The out-of-distribution scores this kind of model can give (evaluation/ood_scores.py), its default first."""

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
        self.results = PerImageResults(self.class_names, uncertainty_name)
        self.calibration = calibration
        self.validation_rows: list[dict] = []
        self.calibration_rows: list[dict] = []

    # ---- what a subclass provides ----------------------------------------------------------
    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        """Test and predict's per-image outputs for a batch (prediction, probs, entropy, score, ...)."""
        raise NotImplementedError

    def results_info(self) -> dict:
        """Extra metrics.json entries (the model, its uncertainty, its settings)."""
        return {}

    def weights_origin(self) -> str | None:
        """Where the classifying weights come from (metrics.json's `checkpoint`); None: untrained."""
        return self.trainer.ckpt_path

    def results_settings(self):
        """The diffusion classifiers' ClassifierSettings (metrics.json's N, rule, forwards); None otherwise."""
        return None

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
    def calibration_file(self) -> Path:
        """calibration.json of the run whose checkpoint classifies: beside its checkpoints/ folder
        (so tools/classify.py finds it for new images), or in default_root_dir."""
        checkpoint = self.trainer.ckpt_path
        if checkpoint and Path(checkpoint).parent.name == "checkpoints":
            return Path(checkpoint).parent.parent / CALIBRATION_FILE
        return Path(self.trainer.default_root_dir) / CALIBRATION_FILE

    def write_calibration(self, outputs: dict) -> None:
        if not outputs:
            return
        try:
            calibration = calibrate(outputs, self.calibration, len(self.class_names), self.ood_score_name())
        except ValueError as refusal:  # too few validation images for the guarantees asked: validate still reports
            rank_zero_warn(f"validation did not calibrate referral and prediction sets: {refusal}")
            return
        calibration["checkpoint"] = self.weights_origin()
        if self.trainer.is_global_zero:
            file = self.calibration_file()
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(calibration, indent=2) + "\n")
            referral, sets = calibration["referral"], calibration["conformal"]["class_conditional"]
            refusal = calibration[OOD_BLOCK]
            rank_zero_info(
                f"calibrated on {calibration['n_calibration']} validation images -> {file}: referral threshold "
                f"{referral['threshold']:.4g} (validation coverage {referral['coverage']:.3f}, accuracy "
                f"{referral['accuracy']:.3f}); conformal sets at alpha {self.calibration.alpha}, per-class "
                f"thresholds {[round(q, 4) for q in sets['q']]} ({sets['correction']}); out-of-distribution "
                f"refusal: {refusal['score']} score, p < {refusal['alpha']} against {refusal['n_calibration']} "
                "calibration images"
                + (f" ({refusal['n_reference']} more fitted its time profile)" if refusal["n_reference"] else "")
            )
            if not refusal["feasible"]:
                rank_zero_warn(f"out-of-distribution refusal is off: {refusal['reason']}")

    def load_calibration(self) -> dict | None:
        """The run's calibration, if `validate` wrote one for these weights; otherwise None, and a note."""
        file = self.calibration_file()
        if not file.is_file():
            rank_zero_info(f"no {file}: run `python cli.py validate ... --ckpt_path <the same>` to calibrate referral "
                           "and prediction sets on the validation split")  # fmt: skip
            return None
        calibration = json.loads(file.read_text())
        if calibration.get("checkpoint") != self.weights_origin():
            rank_zero_warn(f"{file} was calibrated for {calibration.get('checkpoint')}, not {self.weights_origin()}: "
                           "not applied; run `validate` with these weights to calibrate them")  # fmt: skip
            return None
        if OOD_BLOCK not in calibration:
            rank_zero_warn(f"{file} has no out-of-distribution block (written before refusals existed): referral "
                           "and prediction sets are applied, but no image is checked for being unlike the "
                           "training data; run `validate` again to calibrate refusals")  # fmt: skip
        return calibration

    def ood_score_name(self) -> str:
        """The out-of-distribution score validate calibrates: the configured one, or the model's default."""
        return self.calibration.ood_score or self.ood_scores[0]

    # ---- test and predict -------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.active_calibration = self.load_calibration()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.results.add(self.classify_batch(batch), batch["image"], self.active_calibration)

    def report_description(self) -> str:
        """The report's subtitle: the model, its weights and how it classifies."""
        settings = self.results_settings()
        how = f", N = {settings.num_steps} steps, {settings.rule} rule" if settings is not None else ""
        return f"{type(self).__name__}{how}; weights: {self.weights_origin() or 'untrained (debugging)'}"

    def on_test_epoch_end(self) -> None:
        # the weights tested: make results leaves out a test of untrained weights (--allow_untrained)
        info = self.results_info() | {"checkpoint": self.weights_origin()}
        metrics = self.results.finish(
            self.trainer, metrics=True, settings=self.results_settings(), info=info,
            calibration=self.active_calibration, description=self.report_description(),
        )  # fmt: skip
        scalars = {key: value for key, value in metrics.items() if isinstance(value, float)}
        scalars |= {f"accuracy_filtered/{fraction}": value for fraction, value in metrics["accuracy_filtered"].items()}
        refusal = metrics.get(OOD_BLOCK, {})
        achieved = {"selective": metrics.get("selective", {}).get("test", {}),
                    "conformal": metrics.get("conformal", {}).get("class_conditional", {}).get("test", {}),
                    "ood": refusal, "ood_shift": refusal.get("shift", {})}  # fmt: skip
        for block, numbers in achieved.items():
            scalars |= {f"{block}/{key}": value for key, value in numbers.items() if isinstance(value, float)}
        self.log_dict({f"test/{key}": value for key, value in scalars.items() if not math.isnan(value)})

    def on_predict_epoch_start(self) -> None:
        self.active_calibration = self.load_calibration()

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        outputs = self.classify_batch(batch)
        self.results.add(outputs, batch["image"], self.active_calibration)
        return outputs

    def on_predict_epoch_end(self) -> None:
        self.results.finish(self.trainer, metrics=False, calibration=self.active_calibration,
                            description=self.report_description())  # fmt: skip
