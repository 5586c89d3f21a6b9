"""Lightning callbacks the suite adds to every run."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

from .evaluation import ERRORS_FILE, PREDICTIONS_FILE, concat_outputs, gather_unique, save_errors, write_predictions


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is also written when `max_steps` ends training between
    two validations.

    Lightning saves `last.ckpt` only with the top-k checkpoints (after validation) and, at train
    end, only if it never saved one; so a run stopped by `max_steps` after a validation kept
    the weights of that validation as "last". Saving here, in on_train_batch_end, happens after
    the EMA callback has updated its average (checkpoint callbacks run last) and before it copies
    the average into the model at train end, so the checkpoint holds raw and EMA weights apart.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stops_now = 0 < trainer.max_steps <= trainer.global_step
        if self.save_last and stops_now and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PredictionsWriter(BasePredictionWriter):
    """Writes `predict` results to predictions.csv (and errors.pt when the model saves errors).

    Correct under DDP: every rank hands its rows to all (all_gather_object), rows are made unique
    by image id and sorted by it, and rank 0 alone writes. The file goes to `output_dir`, or to
    the logger's directory (beside config.yaml) when not given.
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = [batch for dataloader in _per_dataloader(predictions) for batch in dataloader]
        outputs = gather_unique(concat_outputs(batches), trainer)
        if trainer.is_global_zero and outputs:
            directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
            path = write_predictions(directory / PREDICTIONS_FILE, outputs, pl_module.class_names)
            if "errors" in outputs:
                save_errors(directory / ERRORS_FILE, outputs)
            print(f"{len(outputs['id'])} predictions written to {path}")


def _per_dataloader(predictions: list) -> list[list]:
    # Lightning passes a list of batches for one dataloader, a list of such lists for several
    return predictions if predictions and isinstance(predictions[0], list) else [predictions]
