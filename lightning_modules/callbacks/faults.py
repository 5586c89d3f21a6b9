"""What a NaN or infinite training loss does: NonFiniteLoss stops the run naming where to resume, or skips the step."""

from __future__ import annotations

import os
from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite training loss stopped the run (the message says where and what to resume)."""


class NonFiniteLoss(Callback):
    """What a NaN or infinite training loss does: stop the run, or skip the step.

    cli.py adds one with action "stop" to every run whose config lists none; list it under
    `trainer.callbacks` to choose.

    Args:
        action: "stop" raises NonFiniteLossError before the optimizer step (the weights are
            still those of the previous step, and no checkpoint is written after it), naming
            the global step and the last checkpoint saved, to resume from. "skip" drops that
            step's gradients (set to None before the optimizer step: the optimizer then leaves
            weights and its own state, e.g. Adam's moments and step count, unchanged) and goes
            on; the learning-rate schedule and global step still advance. Skipped steps are
            counted, logged as `train/skipped_steps` and kept in checkpoints.
        max_skips: with "skip", stop as "stop" does once more than this many steps were skipped
            in the run (resumed runs included): a model that keeps producing NaN is broken, not
            unlucky. null = never stop.

    The check costs one device-to-host copy per step and, under DDP, one all-reduce, so that
    every rank takes the same decision (a rank stopping alone would leave the others waiting).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int | None = 10):
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteLoss action must be 'stop' or 'skip', got {action!r}")
        self.action, self.max_skips = action, max_skips
        self.skipped_steps = 0
        self._drop_gradients = False

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        if self.action == "stop":
            raise NonFiniteLossError(self._message(trainer, loss, "stopped"))
        self._drop_gradients = True  # also covers the other micro-batches of an accumulated step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._drop_gradients:
            return
        optimizer.zero_grad(set_to_none=True)
        self._drop_gradients = False
        self.skipped_steps += 1
        if self.max_skips is not None and self.skipped_steps > self.max_skips:
            what = f"stopped after {self.skipped_steps} skipped steps (max_skips={self.max_skips})"
            raise NonFiniteLossError(self._message(trainer, None, what))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)

    @staticmethod
    def _message(trainer, loss: Tensor | None, what: str) -> str:
        value = loss.detach().float().item() if loss is not None and loss.numel() == 1 else "non-finite"
        checkpoint = last_checkpoint(trainer)
        resume = (
            f"the last good checkpoint is {checkpoint}: resume with --ckpt_path {checkpoint}"
            if checkpoint
            else "no checkpoint was saved before it"
        )
        return (
            f"training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"{what} before the optimizer step, so the weights are those of step {trainer.global_step}. {resume}. "
            "To skip such steps instead, list lightning_modules.callbacks.NonFiniteLoss with action: skip "
            "under trainer.callbacks."
        )


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint file any checkpoint callback saved (or the run resumed from), if any."""
    candidates = []
    for callback in trainer.checkpoint_callbacks:
        candidates += [callback.last_model_path, callback.best_model_path, *getattr(callback, "best_k_models", {})]
    candidates.append(trainer.ckpt_path)
    # ordered: of files written in the same step, last.ckpt is named
    existing = list(dict.fromkeys(str(path) for path in candidates if path and os.path.isfile(path)))
    return max(existing, key=os.path.getmtime) if existing else None
