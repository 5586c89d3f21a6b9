"""ResultsWriter: what test and predict found, written by a callback on Lightning's BasePredictionWriter pattern,
so the LightningModule stays the model.

The module classifies: its test_step and predict_step return each batch's per-image outputs (with an explained
batch's explanation under `explanation`). This callback keeps them batch by batch with the calibration's
decisions on each image (decided once, when the batch comes) and writes each explained batch's files as it comes;
at the stage's end it gathers the outputs over the processes (one row per image id), makes one record per image
(reports/records.py) and writes predictions.csv, decisions.json, errors.pt, for test metrics.json, the
figures and the `test/...` scalars, then report.html (reports/results.py).

Whoever loads the weights configures it (`ResultsWriter.for_model`: cli.py's test and predict, tools.classify):
it receives the calibration it applies and what it says about the weights, and never writes to the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from decisions.binding import binding_mismatch
from decisions.calibration import OOD_BLOCK, SHIFT_BLOCK
from experiment.pretrained import CARD_FILE
from experiment.pretrained import CONFIG_FILE as EXPORTED_CONFIG
from experiment.run_folders import EXPORT_DIR, calibration_file
from reports.explanations import ExplanationOutputs
from reports.results import PerImageResults


class ResultsWriter(BasePredictionWriter):
    """Args:
    class_names, uncertainty_name: the model's classes, and what its `entropy` is (figures' labels).
    calibration: the run's calibration.json, bound to these weights and settings, or None.
    calibration_note: why there is none (every decision rule is then OFF, and every output says so).
    info: metrics.json's entries about the model, `checkpoint` (where the weights come from) included.
    settings: a diffusion classifier's ClassifierSettings (metrics.json's N, rule, forwards), or None.
    description: the report's subtitle. model_card: the card of an export of exactly these weights, or None.
    explanation: the explanation settings when predict explains, else None.
    """

    def __init__(self, class_names: list[str], uncertainty_name: str = "vote entropy", calibration: dict | None = None,
                 calibration_note: str | None = None, info: dict | None = None, settings=None, description: str = "",
                 model_card: Path | None = None, explanation=None):  # fmt: skip
        super().__init__(write_interval="batch_and_epoch")
        self.class_names, self.calibration, self.calibration_note = class_names, calibration, calibration_note
        self.info, self.settings, self.description, self.model_card = info or {}, settings, description, model_card
        self.uncertainty_name = uncertainty_name
        self.explanations = ExplanationOutputs(class_names, explanation) if explanation is not None else None
        self.results: PerImageResults | None = None
        self.records: list = []  # the last stage's records and decisions (rank 0), for a caller's summary
        self.numbers: dict = {}
        self.directory: Path | None = None

    @classmethod
    def for_model(cls, model, weights: str | None, digest: str, default_root_dir: str | None) -> ResultsWriter:
        """The writer of `model`'s test or predict: `weights`, where its weights come from (a checkpoint, an
        exported folder, None: untrained), `digest` their decisions.binding digest; the calibration beside them
        applied when it is bound to them and to the model's settings."""
        # an exported folder holds its own calibration; a pretrained Stable Diffusion's weights folder does not
        exported = model.pretrained_folder is not None
        file = calibration_file(weights, exported, default_root_dir)
        calibration, note = load_bound_calibration(file, digest, model.decision_settings())
        settings = model.results_settings()
        how = f", N = {settings.num_steps} steps, {settings.rule} rule" if settings is not None else ""
        return cls(
            model.class_names, model.uncertainty_name, calibration, note,
            info=model.results_info() | {"checkpoint": weights}, settings=settings,
            description=f"{type(model).__name__}{how}; weights: {weights or 'untrained (debugging)'}",
            model_card=bound_model_card(Path(weights) if exported else file.parent / EXPORT_DIR, digest),
            explanation=model.explanation if getattr(model.hparams, "explain", False) else None,
        )  # fmt: skip

    def start(self, trainer) -> None:
        self.results = PerImageResults(self.class_names, self.uncertainty_name)
        # trainer.log_dir is a collective under DDP (a broadcast from rank 0): asked once, on every rank, here;
        # ranks can hold different numbers of batches
        self.directory = Path(trainer.log_dir or trainer.default_root_dir)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.start(trainer)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.start(trainer)

    def write_on_batch_end(self, trainer, pl_module, outputs, batch_indices, batch, batch_idx, dataloader_idx):
        explanation = outputs.pop("explanation", None)
        if explanation is not None and self.explanations is not None:
            self.explanations.add(explanation, self.directory, batch.get("label"))
        self.results.add(outputs, batch["image"], self.calibration)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write_on_batch_end(trainer, pl_module, outputs, None, batch, batch_idx, dataloader_idx)

    def write(self, trainer, test: bool) -> dict:
        """Gathers, decides and writes (on every rank: it gathers); returns metrics.json's content."""
        self.numbers, self.records = self.results.finish(
            trainer, self.directory, metrics=test, settings=self.settings if test else None,
            info=self.info if test else None, calibration=self.calibration, description=self.description,
            calibration_note=self.calibration_note, model_card=self.model_card,
        )  # fmt: skip
        if self.explanations is not None:  # after the results, as the run has always printed them (the report
            self.explanations.finish(trainer, self.directory)  # embeds each image's PNG, written batch by batch)
        return self.numbers

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        self.write(trainer, test=False)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        metrics = self.write(trainer, test=True)
        # a callback logs through the module (Lightning's way): the scalars reach TensorBoard and test's table
        pl_module.log_dict({f"test/{key}": value for key, value in test_scalars(metrics).items()})


def load_bound_calibration(file: Path, digest: str, settings: dict) -> tuple[dict | None, str | None]:
    """(the calibration in `file`, None) when `validate` wrote it for these weights and settings; otherwise (None,
    a line saying why), which metrics.json and the report carry too."""
    if not file.is_file():
        note = f"no calibration ({file} does not exist): run `python cli.py validate ... --ckpt_path <the same>` to " \
               "calibrate them"  # fmt: skip
        rank_zero_info(note)
        return None, note
    try:
        calibration = json.loads(file.read_text())
        mismatch = binding_mismatch(calibration, digest, settings)
    except (ValueError, AttributeError) as error:
        mismatch = f"it cannot be read ({type(error).__name__}: {error})"
    if mismatch:
        note = f"{file} not applied: {mismatch}; run `validate` with these weights and settings to calibrate them"
        rank_zero_warn(note)
        return None, note
    if OOD_BLOCK not in calibration:
        rank_zero_warn(f"{file} has no out-of-distribution block (written before refusals existed): referral and "
                       "prediction sets are applied, but no image is checked for being unlike the training data; "
                       "run `validate` again to calibrate refusals")  # fmt: skip
    return calibration, None


def bound_model_card(folder: Path, digest: str) -> Path | None:
    """The model card of an export of exactly these weights (its config.yaml records their digest); else None."""
    card, config = folder / CARD_FILE, folder / EXPORTED_CONFIG
    if not (card.is_file() and config.is_file()):
        return None
    exported = yaml.safe_load(config.read_text()) or {}
    return card if exported.get("weights") == digest else None


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
