"""Checkpoints written atomically: a process killed mid-write leaves the previous checkpoint, never half of one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO


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
