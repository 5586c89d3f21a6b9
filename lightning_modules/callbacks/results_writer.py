"""ResultsWriter: what test and predict found, written by a callback (in the style of Lightning's
BasePredictionWriter), so the LightningModule stays the model.

The module classifies: its test_step and predict_step return each batch's per-image outputs. This
callback keeps them batch by batch with the calibration's decisions on each image (decided once, when
the batch comes), and at the stage's end gathers them over the processes (one row per image id) and
writes predictions.csv, skipped.csv (new images), decisions.json, errors.pt, and for test metrics.json,
the figures and the `test/...` scalars, then report.html (evaluation/results.py). Every classifier of
the suite adds it by itself (ClassifierModule.configure_callbacks).
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from evaluation.decisions import OOD_BLOCK, SHIFT_BLOCK
from evaluation.results import PerImageResults


class ResultsWriter(Callback):
    def __init__(self):
        self.results: PerImageResults | None = None

    def start(self, pl_module) -> None:
        pl_module.active_calibration = pl_module.load_calibration()
        self.results = PerImageResults(pl_module.class_names, pl_module.uncertainty_name)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.start(pl_module)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.results.add(outputs, batch["image"], pl_module.active_calibration)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.results.add(outputs, batch["image"], pl_module.active_calibration)

    def write(self, trainer, pl_module, test: bool) -> dict:
        """Gathers, decides and writes (on every rank: it gathers); returns metrics.json's content."""
        info = pl_module.results_info() | {"checkpoint": pl_module.weights_origin()} if test else None
        return self.results.finish(
            trainer, metrics=test, settings=pl_module.results_settings() if test else None, info=info,
            calibration=pl_module.active_calibration, description=pl_module.report_description(),
            calibration_note=pl_module.calibration_note, model_card=pl_module.model_card(),
        )  # fmt: skip

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # the weights tested: make results leaves out a test of untrained weights (--allow_untrained)
        metrics = self.write(trainer, pl_module, test=True)
        pl_module.log_dict({f"test/{key}": value for key, value in test_scalars(metrics).items()})

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, test=False)


def test_scalars(metrics: dict) -> dict[str, float]:
    """metrics.json's numbers as TensorBoard scalars: the top level, the filtered accuracies and each decision
    block's numbers (NaN left out)."""
    scalars = {key: value for key, value in metrics.items() if isinstance(value, float)}
    scalars |= {f"accuracy_filtered/{fraction}": value for fraction, value in metrics["accuracy_filtered"].items()}
    shift = metrics.get(SHIFT_BLOCK, {})
    achieved = {
        "selective": metrics.get("selective", {}).get("test", {}),
        "conformal": metrics.get("conformal", {}).get("class_conditional", {}).get("test", {}),
        "ood": metrics.get(OOD_BLOCK, {}),
        "set_shift": shift,
        "set_shift_pvalue": {name: test["pvalue"] for name, test in shift.get("tests", {}).items()},
    }
    for block, numbers in achieved.items():
        scalars |= {f"{block}/{key}": value for key, value in numbers.items() if isinstance(value, float)}
    return {key: value for key, value in scalars.items() if not math.isnan(value)}
