"""Lightning callbacks and the checkpoint writer: those cli.py adds to every run (RunCheckpoint,
NonFiniteLoss, AtomicCheckpointIO; SlurmRequeue under SLURM) and the speed switches a config may list
under `trainer.callbacks` (CompileNetwork, ChannelsLast)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal as signal_module
import socket
import subprocess
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .checkpoint_internals import last_saved_step, may_save_now, save_last, saves_on_train_epoch_end

# Extra entries RunCheckpoint writes into every checkpoint, read back when a run is resumed
# (the random states, the TensorBoard version) or a checkpoint classifies new images (the config).
RNG_STATES_KEY = "rng_states"  # rank 0's
RANK_RNG_STATES_KEY = "rng_states_per_rank"  # under DDP: every rank's, by rank
LOGGER_VERSION_KEY = "logger_version"
EXPERIMENT_CONFIG_KEY = "experiment_config"
CONFIG_FILE = "config.yaml"  # what LightningCLI's SaveConfigCallback writes into the logger's folder


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose checkpoints resume a run exactly (`fit --ckpt_path last`).

    Four additions to Lightning's ModelCheckpoint:

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


# ---- faults --------------------------------------------------------------------------------


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


# ---- speed switches ------------------------------------------------------------------------


def _runs_on_cpu(trainer) -> bool:
    return trainer.strategy.root_device.type == "cpu"


class CompileNetwork(Callback):
    """Compiles the model's network with `torch.compile`, in place (`nn.Module.compile`).

    In place means the module is not wrapped: parameter names, state_dict keys and checkpoints are
    those of an uncompiled run, so checkpoints move freely between compiled and plain runs. The
    compilation itself happens lazily, at the first forward of each new input shape; the
    diffusion classifier's classification forwards (C x B images) have other shapes than its
    training ones, so expect a recompilation when validation first runs (`dynamic` decides
    whether later shapes share one graph).

        trainer:
          callbacks:
            - class_path: lightning_modules.callbacks.CompileNetwork
              init_args: {mode: max-autotune-no-cudagraphs}

    or `--trainer.callbacks+=lightning_modules.callbacks.CompileNetwork` on the command line.

    Args:
        attribute: the LightningModule attribute holding the network (both classifiers: network).
        mode: torch.compile mode (null = "default"; "reduce-overhead", "max-autotune",
            "max-autotune-no-cudagraphs").
        backend: torch.compile backend ("inductor"; "eager" only traces, for tests).
        fullgraph: fail on graph breaks instead of falling back to Python between graphs.
        dynamic: compile for dynamic shapes (null = after the first shape change).
        on_cpu: also compile when running on the CPU. Off by default: there the compile time
            (tens of seconds to minutes) exceeds what a CPU run gains, so a GPU config that lists
            this callback still runs unchanged, uncompiled, on a CPU.
    """

    def __init__(
        self,
        attribute: str = "network",
        mode: str | None = None,
        backend: str = "inductor",
        fullgraph: bool = False,
        dynamic: bool | None = None,
        on_cpu: bool = False,
    ):
        self.attribute, self.on_cpu = attribute, on_cpu
        self.options = {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
        self._compiled: set[int] = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if _runs_on_cpu(trainer) and not self.on_cpu:
            rank_zero_info("CompileNetwork: not compiling on the CPU (on_cpu=false)")
            return
        network: nn.Module = getattr(pl_module, self.attribute)
        if id(network) not in self._compiled:  # setup runs per stage: once is enough
            network.compile(**self.options)
            self._compiled.add(id(network))
            rank_zero_info(f"CompileNetwork: {type(network).__name__} compiled lazily with {self.options}")


class ChannelsLast(Callback):
    """Runs the model's network in the channels-last memory format (NHWC), for CNNs on GPUs.

    Tensor cores convolve NHWC directly; with NCHW tensors cuDNN transposes around convolutions.
    PyTorch's channels-last tutorial reports speed-ups for CNNs under mixed precision (ResNets,
    EfficientNets, UNets); ViT and Swin have one convolution (the patch embedding) and gain
    nothing. Measure on your GPU: not measured here (CPU-only machines). The network's 4-D
    weights are converted in setup, and a forward pre-hook converts every 4-D tensor the network
    receives (after the model's own transforms such as the Haar wavelet), so the batch itself is
    untouched. Parameters keep their identity and names (only their memory layout changes), so
    optimizers, the EMA callback and checkpoints work unchanged; checkpoints load either way.

        trainer:
          callbacks:
            - class_path: lightning_modules.callbacks.ChannelsLast

    Args:
        attribute: the LightningModule attribute holding the network (both classifiers: network).
        on_cpu: also convert when running on the CPU. Off by default, as for CompileNetwork: the
            GPU configs that list this callback run unchanged on a CPU.
    """

    def __init__(self, attribute: str = "network", on_cpu: bool = False):
        self.attribute, self.on_cpu = attribute, on_cpu
        self._hook = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if _runs_on_cpu(trainer) and not self.on_cpu:
            rank_zero_info("ChannelsLast: keeping the default memory format on the CPU (on_cpu=false)")
            return
        if self._hook is not None:  # setup runs per stage: convert once
            return
        network: nn.Module = getattr(pl_module, self.attribute)
        network.to(memory_format=torch.channels_last)
        self._hook = network.register_forward_pre_hook(_inputs_to_channels_last, with_kwargs=True)
        rank_zero_info(f"ChannelsLast: {type(network).__name__} runs in channels-last memory format")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _to_channels_last(value):
    if isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _inputs_to_channels_last(module, args, kwargs):
    return tuple(map(_to_channels_last, args)), {key: _to_channels_last(value) for key, value in kwargs.items()}


# ---- checkpoints written atomically ----------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing every checkpoint (last, best, periodic, requeue) to a
    temporary file in the same folder, flushed to disk, then renamed over the target.

    Lightning 2.6 stages a checkpoint in the system temp folder and moves it into place. On a
    cluster that folder is node-local and the run folder on a shared file system, so the move is a
    copy into last.ckpt: a process killed in the middle (time limit, preemption, out-of-memory
    kill) leaves a truncated last.ckpt, and the resume fails (tests/test_faults.py shows both).
    os.replace within one folder is atomic on POSIX file systems: a reader sees the old file or the
    new one, never half of one. The temporary files of killed writers are removed at the next save.
    cli.py gives every Trainer this plugin."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partials_of_dead_writers(path)
        partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            with open(partial, "rb") as written:
                os.fsync(written.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def remove_partials_of_dead_writers(path: Path) -> None:
    """The temporary files that killed writers on this host left beside `path` (they would fill
    the disk, one checkpoint per kill); those of live writers, or of other hosts, stay."""
    host = socket.gethostname()
    for partial in path.parent.glob(f".{path.name}.{host}.*.partial"):
        pid = partial.name.removesuffix(".partial").rsplit(".", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            partial.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---- SLURM -------------------------------------------------------------------------------------


class SlurmRequeue(Callback):
    """Requeue a SLURM job before its time limit without ever hanging it, and resume where it stopped.

    Lightning's own auto-requeue writes the checkpoint inside the signal handler, which can interrupt
    a DDP collective and deadlock the job until its time limit (Lightning-AI/pytorch-lightning#21406).
    Here the handler only raises a flag; at the next batch end every rank learns of it through one
    all-reduce, all ranks save `hpc_ckpt_<n>.ckpt` in default_root_dir together, rank 0 runs
    `scontrol requeue` (`<array job>_<task>` for array jobs), and training stops cleanly. The
    requeued job runs the same command, and Lightning resumes from the newest hpc_ckpt_<n>.ckpt by
    itself (no --ckpt_path). cli.py switches Lightning's handler off (SLURMEnvironment(auto_requeue=False))
    and adds this callback to every run under SLURM; the job scripts of tools/slurm.py list it with
    the signal their `#SBATCH --signal` sends. It also logs the step a run starts from.

    Args:
        signal: the signal SLURM sends before the time limit (`#SBATCH --signal=<signal>@<seconds>`).
    """

    def __init__(self, signal: str = "SIGUSR1"):
        self.signal = signal
        self.requested = False
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._previous is None:
            self._previous = signal_module.signal(getattr(signal_module, self.signal), self._request)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal_module.signal(getattr(signal_module, self.signal), self._previous)
            self._previous = None

    def _request(self, signum, frame) -> None:
        self.requested = True  # nothing else here: the training step may be inside a collective

    def on_train_start(self, trainer, pl_module) -> None:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        rank_zero_info(f"training starts at global step {trainer.global_step}, epoch {trainer.current_epoch} "
                       f"(SLURM restart {restart}, {trainer.world_size} processes)")  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # any rank signalled
            return
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{hpc_checkpoint_number(trainer.default_root_dir) + 1}.ckpt"
        trainer.save_checkpoint(path)  # every rank, together; rank 0 writes, then they meet at a barrier
        rank_zero_info(f"{self.signal}: saved {path} at global step {trainer.global_step}")
        if trainer.is_global_zero:
            requeue(path)
        trainer.should_stop = True


def hpc_checkpoint_number(folder) -> int:
    """The highest n of the hpc_ckpt_<n>.ckpt files in `folder` (Lightning resumes from that one), 0 without any."""
    numbers = [
        int(m.group(1))
        for f in Path(folder).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", f.name))
    ]
    return max(numbers, default=0)


def requeue(checkpoint: Path) -> None:
    """`scontrol requeue` of this job (this task of an array job); a missing scontrol is reported, not ignored."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if scontrol is None or job is None:
        why = "scontrol is not on this node's PATH (inside a container?)" if scontrol is None else "no SLURM_JOB_ID"
        rank_zero_warn(f"cannot requeue the job: {why}. The checkpoint {checkpoint} is saved: submit the job again "
                       "and it resumes from there")  # fmt: skip
        return
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if done.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"scontrol requeue {job} failed ({done.stderr.strip()}); the checkpoint {checkpoint} is saved: "
                       "submit the job again and it resumes from there")  # fmt: skip
