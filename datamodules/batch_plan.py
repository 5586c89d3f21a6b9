"""The global batch and its split over processes and accumulated micro-batches (`global_batch_size`).

The paper's batch (B.1: 128 for the diffusion models, 64 for the baselines) is the number of images
per optimizer step. Under DDP over N processes with k accumulated micro-batches, each process loads
global / (N k) images per micro-batch, so a config means the same optimisation on 1 GPU or 8.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_SIZE = 64  # per process, when neither data.init_args.batch_size nor global_batch_size is given


class BatchConfigError(ValueError):
    """The batch options contradict each other or do not divide over the processes; the message names them."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_process: int
    world_size: int
    accumulation: int

    def describe(self) -> str:
        return (
            f"batch: global {self.global_batch} = {self.world_size} process(es) x {self.per_process} images"
            f" x {self.accumulation} accumulated micro-batch(es)"
        )

    def as_hparams(self) -> dict:
        return {
            "global_batch_size": self.global_batch,
            "per_process_batch_size": self.per_process,
            "world_size": self.world_size,
            "accumulate_grad_batches": self.accumulation,
        }


def batch_plan(global_batch: int | None, per_process: int | None, world_size: int, accumulation: int = 1) -> BatchPlan:
    """Per-process batch from the global one (or the reverse), refusing what does not fit."""
    for name, value in (("global_batch_size", global_batch), ("data.init_args.batch_size", per_process)):
        if value is not None and value < 1:
            raise BatchConfigError(f"{name}={value}: a batch holds at least one image")
    if global_batch is None:
        per_process = per_process or DEFAULT_BATCH_SIZE
        return BatchPlan(per_process * world_size * accumulation, per_process, world_size, accumulation)
    if per_process is not None:
        raise BatchConfigError(
            f"data.init_args.batch_size={per_process} and global_batch_size={global_batch} are both set: give one "
            "(global_batch_size is split over the processes; --global_batch_size null keeps the per-process batch)"
        )
    share = world_size * accumulation
    if global_batch % share:
        raise BatchConfigError(
            f"global_batch_size={global_batch} does not divide over {world_size} process(es) x "
            f"{accumulation} accumulated micro-batch(es) = {share}: choose a multiple of {share}"
        )
    return BatchPlan(global_batch, global_batch // share, world_size, accumulation)
