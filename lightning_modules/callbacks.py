"""Lightning callbacks the suite adds to every run."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


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
