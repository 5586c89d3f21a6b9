"""ClassifierModule: what every classifier of the suite does the same way, diffusion or discriminative.

  validation: per-image predictions are collected and, at the epoch's end, gathered over ranks
              and kept once per image id, so `val/accuracy` and `val/f1` count each image once.
  test:       per-image outputs -> evaluation.results.PerImageResults -> predictions.csv,
              metrics.json, figures, and `test/...` scalars in the logger.
  predict:    the same per-image outputs, written by the same PerImageResults (predictions.csv).

A subclass implements `classify_batch(batch) -> per-image outputs` (see evaluation.results for the
keys) and may add `results_info()`, extra metrics.json entries, and `results_settings()`, the
diffusion classifier's ClassifierSettings.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from evaluation.results import PerImageResults, concat_outputs, gather_unique

PASSED_THROUGH = ("id", "label", "path")  # batch keys that go into the per-image outputs as they are


class ClassifierModule(L.LightningModule):
    """Base of DiffusionClassifier, StableDiffusionClassifier and BaselineClassifier (see module docstring)."""

    def __init__(self, num_classes: int, class_names: list[str] | None, uncertainty_name: str = "vote entropy"):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names {list(class_names)} for num_classes={num_classes}")
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        self.results = PerImageResults(self.class_names, uncertainty_name)
        self.validation_rows: list[dict] = []

    # ---- what a subclass provides ----------------------------------------------------------
    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        """Test and predict's per-image outputs for a batch (prediction, probs, entropy, score, ...)."""
        raise NotImplementedError

    def results_info(self) -> dict:
        """Extra metrics.json entries (the model, its uncertainty, its settings)."""
        return {}

    def results_settings(self):
        """The diffusion classifiers' ClassifierSettings (metrics.json's N, rule, forwards); None otherwise."""
        return None

    @staticmethod
    def passed_through(batch: dict) -> dict:
        return {key: batch[key] for key in PASSED_THROUGH if key in batch}

    # ---- validation -------------------------------------------------------------------------
    def record_validation(self, batch: dict, predictions: Tensor) -> None:
        """Keeps a validation batch's predictions for the epoch-end metrics."""
        row = {"id": batch["id"], "prediction": predictions, "label": batch["label"]}
        self.validation_rows.append({key: value.detach().cpu() for key, value in row.items()})

    def on_validation_epoch_end(self) -> None:
        # Every rank gathers all ranks' rows and keeps one per image id: the padding repeats of
        # DistributedSampler count once, and every rank logs the same numbers.
        rows, self.validation_rows = gather_unique(concat_outputs(self.validation_rows), self.trainer), []
        if not rows:
            return
        num_classes = len(self.class_names)
        predictions, labels = rows["prediction"], rows["label"]
        self.log_dict(
            {
                "val/accuracy": multiclass_accuracy(predictions, labels, num_classes, average="micro"),
                "val/f1": multiclass_f1_score(predictions, labels, num_classes, average="macro"),
            },
            prog_bar=True,
        )

    # ---- test and predict -------------------------------------------------------------------
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.results.add(self.classify_batch(batch))

    def on_test_epoch_end(self) -> None:
        metrics = self.results.finish(
            self.trainer, metrics=True, settings=self.results_settings(), info=self.results_info()
        )
        scalars = {key: value for key, value in metrics.items() if isinstance(value, float)}
        scalars |= {f"accuracy_filtered/{fraction}": value for fraction, value in metrics["accuracy_filtered"].items()}
        self.log_dict({f"test/{key}": value for key, value in scalars.items()})

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        outputs = self.classify_batch(batch)
        self.results.add(outputs)
        return outputs

    def on_predict_epoch_end(self) -> None:
        self.results.finish(self.trainer, metrics=False)
