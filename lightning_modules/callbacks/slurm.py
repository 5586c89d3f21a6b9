"""SlurmRequeue: save and requeue a SLURM job at a batch end before its time limit, never inside the signal handler."""

from __future__ import annotations

import os
import re
import shutil
import signal as signal_module
import subprocess
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

REQUEUE_SIGNAL, REQUEUE_SECONDS = "SIGUSR1", 90  # 90 s leaves time to write a checkpoint of a large model


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

    def __init__(self, signal: str = REQUEUE_SIGNAL):
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
