"""Resume a run exactly: RunCheckpoint and the random states it saves and restores (`fit --ckpt_path last`)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from experiment.checkpoint_internals import last_saved_step, may_save_now, save_last, saves_on_train_epoch_end

# Extra entries RunCheckpoint writes into every checkpoint, read back when a run is resumed
# (the random states, the TensorBoard version) or a checkpoint classifies new images (the config).
RNG_STATES_KEY = "rng_states"  # rank 0's
RANK_RNG_STATES_KEY = "rng_states_per_rank"  # under DDP: every rank's, by rank
LOGGER_VERSION_KEY = "logger_version"
EXPERIMENT_CONFIG_KEY = "experiment_config"
CONFIG_FILE = "config.yaml"  # what LightningCLI's SaveConfigCallback writes into the logger's folder


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose checkpoints resume a run exactly (`fit --ckpt_path last`).

    Five additions to Lightning's ModelCheckpoint:

    * `last.ckpt` is written at every checkpointing point (each validation, or each epoch end
      without validation), also when the monitored metric did not improve. Lightning 2.6 writes
      it only when a top-k checkpoint was written at the same step, so with `monitor` set "last"
      stayed at the best epoch and `--ckpt_path last` resumed from there, redoing later epochs.

    * `last.ckpt` is also written in the step or epoch that ends training (`max_steps`,
      `max_epochs`, or a callback setting `trainer.should_stop`). Lightning saves `last.ckpt`
      only with the top-k checkpoints (after validation) and, at train end, only if it never
      saved one: a run stopped by `max_steps` after a validation kept that validation's weights
      as "last", and a run without a validation at its end saved in on_train_end, after the EMA
      callback had copied its average into the model, so the checkpoint's "raw" weights were the
      EMA ones and a resumed run trained on from those. Saving here, in on_train_batch_end /
      on_train_epoch_end, happens after the EMA callback has updated its average (checkpoint
      callbacks run last) and before train end, so the checkpoint holds raw and EMA weights apart.
    * the global random states (torch, CUDA, numpy, Python) go into the checkpoint and are put
      back when fit resumes. Lightning restores weights, optimizer, schedulers and loops but not
      these, and they draw the training noise (t, eps, label dropout) and the order of the
      shuffled training batches (a RandomSampler takes its seed from torch's global generator).
      Resuming from an end-of-epoch checkpoint then repeats the straight run step for step; from
      a mid-epoch one Lightning restarts the epoch's data anyway, so it is only approximate.
      Under DDP every rank's states are kept (each rank draws its own noise, see `seed_per_rank`)
      and each rank gets its own back when the run resumes on as many processes; on another
      number of processes every rank starts from rank 0's states and is reseeded per rank.
    * the TensorBoard version the run logged to, so that cli.py resumes logging in the same
      `tensorboard/version_N` folder;
    * the run's whole resolved config (the config.yaml beside its logs), so that the checkpoint
      alone can rebuild its model to classify new images (tools/classify.py), wherever it travels.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # trainer.log_dir is a collective under DDP: asked here, on every rank, not at save time
        self.config_file = Path(trainer.log_dir or trainer.default_root_dir) / CONFIG_FILE

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop:
            self._save_last_before_train_end(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not saves_on_train_epoch_end(self, trainer):
            self._keep_last_current(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if saves_on_train_epoch_end(self, trainer):
            self._keep_last_current(trainer)
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if 0 <= max_epochs <= trainer.current_epoch + 1 or trainer.should_stop:
            self._save_last_before_train_end(trainer)

    def _keep_last_current(self, trainer) -> None:
        if self.save_last and may_save_now(self, trainer):
            save_last(self, trainer)

    def _save_last_before_train_end(self, trainer) -> None:
        if self.save_last and last_saved_step(self) != trainer.global_step:
            save_last(self, trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A resumed run continues its folder's last.ckpt. Resumed from a checkpoint written before
        # the first last.ckpt (a requeue's hpc_ckpt), Lightning would write last-v1.ckpt beside a stale one.
        if self.save_last and not self.last_model_path and self.dirpath == state_dict.get("dirpath", self.dirpath):
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_train_start(self, trainer, pl_module) -> None:
        if not getattr(self, "restored_every_rank", False):  # a fresh start, or resumed on another world size
            seed_per_rank(trainer.world_size, trainer.global_rank)
        self.restored_every_rank = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # every rank is here (Lightning's save_checkpoint is a collective), so the gather is safe
        checkpoint[RNG_STATES_KEY] = random_states()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            every_rank = [None] * trainer.world_size
            torch.distributed.all_gather_object(every_rank, checkpoint[RNG_STATES_KEY])
            checkpoint[RANK_RNG_STATES_KEY] = every_rank
        version = getattr(trainer.logger, "version", None)
        if isinstance(version, (int, str)):
            checkpoint[LOGGER_VERSION_KEY] = version
        config_file = getattr(self, "config_file", None)
        if config_file is not None and config_file.is_file():
            checkpoint[EXPERIMENT_CONFIG_KEY] = config_file.read_text()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Now, before the training DataLoader iterator is made (it draws a seed from torch's
        # generator); the sanity-check validation in between runs under Lightning's isolate_rng.
        if trainer.state.fn != TrainerFn.FITTING or RNG_STATES_KEY not in checkpoint:
            return
        every_rank = checkpoint.get(RANK_RNG_STATES_KEY)
        self.restored_every_rank = every_rank is not None and len(every_rank) == trainer.world_size
        set_random_states(every_rank[trainer.global_rank] if self.restored_every_rank else checkpoint[RNG_STATES_KEY])


def random_states() -> dict:
    """torch's, CUDA's, numpy's and Python's global random states, in types that a
    `torch.load(weights_only=True)` (Lightning's default) accepts: tensors, numbers, tuples."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def seed_per_rank(world_size: int, rank: int) -> None:
    """Give each DDP rank its own torch random stream: seed_everything seeds every rank alike, so
    each would draw the same t, eps, label dropout and augmentation for its different images. One
    seed per rank (DiT does seed * world + rank), drawn from the common state so a run stays
    reproducible; a single process is left untouched."""
    if world_size > 1:
        common = int(torch.randint(2**62, (1,)))
        torch.manual_seed(common + rank)


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("torch.cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)  # on another number of GPUs CUDA keeps its seeded state
