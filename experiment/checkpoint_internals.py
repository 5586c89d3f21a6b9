"""Every private Lightning API the suite relies on, in one place. All of them concern checkpoints.

Checked against lightning 2.6.6 (requirements.txt allows >=2.6,<2.7). A Lightning upgrade that
renames or removes one of these fails tests/test_checkpoint_internals.py by name, before any run
silently loses its behaviour:

  ModelCheckpoint._should_save_on_train_epoch_end, _should_skip_saving_checkpoint,
      _save_last_checkpoint, _monitor_candidates, _last_global_step_saved
      RunCheckpoint keeps last.ckpt current (Lightning 2.6 rewrites it only with a new best).
  Trainer._checkpoint_connector._parse_ckpt_path
      "last", "best", "hpc" resolved exactly as Lightning will, so that cli.py checks the very
      file Lightning is about to load.
  LightningCLI._parse_ckpt_path, LightningCLI._get
      cli.py turns off the hyperparameter overlay from a `--ckpt_path` file (the config decides),
      and reads the trainer section of the parsed config.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

CHECKED_AGAINST = "2.6.6"


# ---- ModelCheckpoint -------------------------------------------------------------------------
def saves_on_train_epoch_end(callback: ModelCheckpoint, trainer) -> bool:
    """Whether the callback checkpoints at train epoch end (True) or after validation (False)."""
    return callback._should_save_on_train_epoch_end(trainer)


def may_save_now(callback: ModelCheckpoint, trainer) -> bool:
    """False when not fitting, while sanity checking, or when this step was already saved."""
    return not callback._should_skip_saving_checkpoint(trainer)


def last_saved_step(callback: ModelCheckpoint) -> int:
    return callback._last_global_step_saved


def save_last(callback: ModelCheckpoint, trainer) -> None:
    """Write `last.ckpt` now, with the metrics the callback would record."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# ---- Trainer ---------------------------------------------------------------------------------
def resolve_checkpoint_path(trainer, stage: str, ckpt_path) -> str | None:
    """The file Lightning will load for `trainer.<stage>(ckpt_path=...)`: "last", "best", "hpc"
    resolved by Lightning's own code (its warnings silenced: it repeats them when it loads);
    None when nothing will be loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn(stage), ckpt_path, model_provided=True, model_connected=False
            )
        except ValueError:  # e.g. "best" with no best checkpoint: Lightning raises it itself next
            return None
    return str(path) if path else None


# ---- LightningCLI ----------------------------------------------------------------------------
class ConfigOverCheckpointHparams:
    """LightningCLI mixin: keep the config's model options when `--ckpt_path` names a file.

    LightningCLI (>= 2.4) overlays the checkpoint's hyperparameters on the parsed config for a
    file path (not for "last"): a test-time `--model.init_args.classification.num_steps 501`
    would silently become the training config's value, and a checkpoint of another model class
    would fail with a parser error. With this mixin the config decides, as with "last", and
    checkpoint_check refuses a checkpoint that does not fit it.
    """

    def _parse_ckpt_path(self) -> None:
        """Overrides LightningCLI._parse_ckpt_path: no overlay."""


def cli_section(cli, config, key: str, default=None):
    """A section of a LightningCLI's parsed config (`trainer`, ...), under the subcommand if any."""
    return cli._get(config, key, default=default)
