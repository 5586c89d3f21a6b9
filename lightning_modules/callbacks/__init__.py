"""Lightning callbacks and the checkpoint writer, one concern per file. cli.py adds RunCheckpoint,
NonFiniteLoss and AtomicCheckpointIO to every run, and SlurmRequeue under SLURM; a config may list
the speed switches CompileNetwork and ChannelsLast under `trainer.callbacks`. Configs name them as
`lightning_modules.callbacks.<Name>`. Every classifier adds ResultsWriter itself (test and predict's files)."""

from .atomic_io import AtomicCheckpointIO
from .faults import NonFiniteLoss, NonFiniteLossError
from .results_writer import ResultsWriter
from .resume import CONFIG_FILE, EXPERIMENT_CONFIG_KEY, LOGGER_VERSION_KEY, RunCheckpoint
from .slurm import REQUEUE_SECONDS, REQUEUE_SIGNAL, SlurmRequeue
from .speed import ChannelsLast, CompileNetwork

__all__ = [
    "CONFIG_FILE",
    "EXPERIMENT_CONFIG_KEY",
    "LOGGER_VERSION_KEY",
    "REQUEUE_SECONDS",
    "REQUEUE_SIGNAL",
    "AtomicCheckpointIO",
    "ChannelsLast",
    "CompileNetwork",
    "NonFiniteLoss",
    "NonFiniteLossError",
    "ResultsWriter",
    "RunCheckpoint",
    "SlurmRequeue",
]
