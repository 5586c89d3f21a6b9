#!/usr/bin/env python
"""One command line for every experiment: fit, validate, test and predict from a config file.

    python cli.py fit  --config configs/demo.yaml
    python cli.py test --config configs/demo.yaml --ckpt_path last
    python cli.py fit  --config configs/unet_chexpert.yaml --print_config

The model (`model.class_path`) and the data (`data.class_path`) are chosen in the config; the
data's number of classes, class names, image size and channels are linked into the model, so they
are written once. Everything a run writes goes under `trainer.default_root_dir`:
`checkpoints/` (last.ckpt and the best ones), `tensorboard/version_N/` (logs, config.yaml,
metrics.json). Run `python cli.py fit --help` for every option.

Before anything runs, the CLI checks (and refuses with a message naming the culprit):
  * the run folders can be created and written, and (fit) the disk has room for checkpoints;
  * the checkpoint given by `--ckpt_path` was trained for this model class, number of classes
    and input size (experiment/checkpoint_check.py).
`fit --ckpt_path last` resumes a stopped run: same global step, optimizer, LR schedule, EMA,
random states, and logs into the same `tensorboard/version_N` (`--new_log_version true` for a
new one). A NaN or infinite training loss stops the run naming the last good checkpoint
(callbacks.NonFiniteLoss; list one with `action: skip` to skip such steps instead).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from datamodules.batch_plan import DEFAULT_BATCH_SIZE, BatchPlan, batch_plan
from decisions.binding import state_digest, weights_digest
from experiment.checkpoint_check import check_checkpoint, check_weight_averaging
from experiment.checkpoint_internals import ConfigOverCheckpointHparams, cli_section, resolve_checkpoint_path
from experiment.pretrained import is_pretrained_folder, load_exported
from experiment.run_folders import (
    CHECKPOINT_PARAMETER_COPIES,
    RunFolder,
    check_free_space,
    check_same_data,
    check_writable,
    checkpoint_bytes,
    data_identity,
    latest_version,
    run_root,
    tensorboard_logger,
)
from experiment.user_errors import (  # noqa: F401 (DEBUG_VARIABLE: for tests)
    DEBUG_VARIABLE,
    broken_config_message,
    config_file_holding,
    guarded,
    unknown_option_message,
)
from lightning_modules.base import calibrate_on_whole_split
from lightning_modules.callbacks import (
    LOGGER_VERSION_KEY,
    AtomicCheckpointIO,
    NonFiniteLoss,
    RunCheckpoint,
    SlurmRequeue,
)
from lightning_modules.callbacks.results_writer import ResultsWriter
from networks.weights import load_weights_file

# --help shows the settings dataclasses' per-field docstrings (ClassifierSettings, ExplainSettings)
set_parsing_settings(docstring_parse_attribute_docstrings=True)

LINKED_DATA_PROPERTIES = ("num_classes", "class_names", "image_size", "image_channels")
VALIDATION_UNDER_DDP = (
    "validation under DDP uses Lightning's DistributedSampler, which pads the ranks to equal "
    "length: up to world_size - 1 = {extra} validation images are counted twice in val/ metrics "
    "(test and predict count every image exactly once)"
)
TEST_UNDER_DDP = (
    "test under DDP: the DistributedSampler pads the ranks by repeating up to world_size - 1 = "
    "{extra} images; their results are gathered and kept once per image id, so metrics.json and "
    "predictions.csv count every image exactly once"
)


LIGHTNING_TEST_SAMPLER_WARNING = r"Using `DistributedSampler` with the dataloaders\. During `trainer\.test\(\)`"


class StrictArgumentParser(LightningArgumentParser):
    """No abbreviated options: jsonargparse builds each class's parser from this class too, so a nested
    `--model.init_args.classification.num_step 3` is refused as a typo, not silently read as num_steps."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def class_option_names(class_path: str) -> list[str]:
    """Every option of a model, data or callback class, nested settings as `classification.num_steps`."""
    parser = StrictArgumentParser(exit_on_error=False)
    module, name = class_path.rsplit(".", 1)
    parser.add_class_arguments(getattr(importlib.import_module(module), name), "options", fail_untyped=False,
                               sub_configs=True)  # fmt: skip
    return [action.dest.removeprefix("options.") for action in parser._actions if action.dest.startswith("options.")]


def section_classes(section: str) -> list[str]:
    """The suite's classes a config section may hold: the candidates for a mistyped option below their first level."""
    classes = {
        "model": ["lightning_modules.DiffusionClassifier", "lightning_modules.BaselineClassifier"],
        "data": [f"datamodules.{name}" for name in ("SyntheticDataModule", "MedMNISTDataModule", "CSVDataModule")],
    }
    return classes.get(section, [])


class ExperimentCLI(ConfigOverCheckpointHparams, LightningCLI):
    """LightningCLI with the suite's wiring: the data's classes, names, image size and channels linked into
    the model, checkpoints pinned to `<root>/checkpoints` (RunCheckpoint), the options `global_batch_size`,
    `min_free_gb`, `allow_untrained` and `new_log_version`, the callbacks and plugins every run gets
    (progress bar, NonFiniteLoss, AtomicCheckpointIO, SlurmRequeue under SLURM), and the checks of
    `before_<subcommand>` (batch plan, run folders, checkpoint) that refuse a mistake before hours of
    compute. A checkpoint's saved hyperparameters never override the config (ConfigOverCheckpointHparams)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED_DATA_PROPERTIES:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--min_free_gb",
            type=float | None,
            default=None,
            help="Free disk space (GB) the run folders need before fit starts. Default: room for two "
            f"checkpoints, {CHECKPOINT_PARAMETER_COPIES} x the model's parameter bytes (weights, EMA weights and "
            "Adam's two moments, twice), or 0 when no checkpoint is saved. 0 turns the check off; validate, test "
            "and predict check only that the folders are writable.",
        )
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="Images per optimizer step, over all processes and accumulated micro-batches (the paper's batch "
            "of B.1: 128 for the diffusion models, 64 for the baselines). Each process loads global_batch_size / "
            "(processes x trainer.accumulate_grad_batches) images per batch, refused when that does not divide, so "
            "a config means the same optimisation on 1 GPU or 8. null: data.init_args.batch_size is the "
            f"per-process batch (default {DEFAULT_BATCH_SIZE}); giving both is refused.",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate, test and predict with the model's initial (random) weights when no checkpoint is given "
            "or found: for debugging only. Without it they refuse to run, since their files would look like results.",
        )
        parser.add_argument(
            "--new_log_version",
            type=bool,
            default=False,
            help="fit --ckpt_path: log into a new tensorboard/version_N instead of continuing in the "
            "resumed run's one (the default, so a resumed run's curves continue where they stopped).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """A mistyped option is named with the nearest valid ones (jsonargparse's own message buries it)."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            given = [arg for arg in (sys.argv[1:] if args is None else args) if isinstance(arg, str)]
            subcommand = next((arg for arg in given if arg in parser._subcommands_action.choices), None)
            top = parser._subcommands_action.choices[subcommand] if subcommand else parser
            top_options = [name[2:] for action in top._actions for name in action.option_strings if name[:2] == "--"]
            message = unknown_option_message(str(error), class_option_names, top_options, section_classes)
            if message is None:
                message = broken_config_message(given)
            if message is None:
                raise
            raise argparse.ArgumentError(None, message + config_file_holding(message, given)) from error

    def before_instantiate_classes(self) -> None:
        # Pin the checkpoint folder to the run, not to the logger's version_N folder: otherwise a
        # new process resolves `--ckpt_path last` in an empty fresh version and starts from scratch.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(RunFolder(Path(run_root(config.trainer.default_root_dir))).checkpoints)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = cli_section(self, self.config_init, "trainer", default={})
        self.uses_default_logger = trainer_config.get("logger") in (None, True)
        return super().instantiate_trainer(**kwargs | suite_trainer_options(trainer_config))

    # ---- checks before each subcommand (LightningCLI calls before_<subcommand>) -------------
    def before_fit(self) -> None:
        self.check_run_folders(min_free_bytes=self.min_free_bytes())
        if self.trainer.is_global_zero:  # before anything is written into the folder (hparams, splits.csv)
            check_same_data(self.trainer.default_root_dir, data_identity(self.datamodule))
        self.split_global_batch(accumulate=True)
        checkpoint = self.check_checkpoint("fit")
        if checkpoint and self.uses_default_logger and not self.subcommand_option("new_log_version"):
            self.continue_logging_of(checkpoint)
        if self.trainer.limit_val_batches != 0:
            self.note_under_ddp(VALIDATION_UNDER_DDP)

    def before_validate(self) -> None:
        self.split_global_batch()
        self.check_run_folders()
        self.check_checkpoint("validate")
        self.note_under_ddp(VALIDATION_UNDER_DDP)
        calibrate_on_whole_split(self.trainer)

    def before_test(self) -> None:
        self.split_global_batch()
        self.check_run_folders()
        self.add_results_writer(self.check_checkpoint("test"))
        if self.note_under_ddp(TEST_UNDER_DDP):
            # Lightning's advice (test on 1 device) is for metrics that count the padding; ours do not.
            warnings.filterwarnings("ignore", message=LIGHTNING_TEST_SAMPLER_WARNING)

    def before_predict(self) -> None:
        self.split_global_batch()
        self.check_run_folders()
        self.add_results_writer(self.check_checkpoint("predict"))

    def add_results_writer(self, checkpoint: str | None) -> None:
        """test and predict's files: a ResultsWriter told where the weights come from and their digest, so it
        applies the calibration bound to them (Lightning loads the checkpoint's state_dict into the model next;
        the digest is of the model's state as it will be then)."""
        if checkpoint:
            state = self.model.state_dict()
            saved = self.checked_checkpoint.get("state_dict") or {}
            digest = state_digest({name: saved.get(name, tensor) for name, tensor in state.items()})
        else:  # an exported folder (loaded already), a pretrained Stable Diffusion, or --allow_untrained
            digest = weights_digest(self.model)
        exported = self.model.pretrained_folder
        weights = checkpoint or (str(exported) if exported else getattr(self.model, "pretrained", None))
        writer = ResultsWriter.for_model(self.model, weights, digest, self.trainer.default_root_dir)
        self.trainer.callbacks.append(writer)

    def subcommand_option(self, key: str):
        return (self.config_init[self.subcommand] if self.subcommand else self.config_init).get(key)

    def split_global_batch(self, accumulate: bool = False) -> BatchPlan:
        """Sets the datamodule's per-process batch from `global_batch_size` and reports the plan."""
        plan = batch_plan(
            self.subcommand_option("global_batch_size"),
            self.datamodule.batch_size,
            self.trainer.world_size,
            self.trainer.accumulate_grad_batches if accumulate else 1,
        )
        self.datamodule.batch_size = plan.per_process
        learning_rate = self.model.hparams.get("learning_rate")
        rank_zero_info(plan.describe() + (f"; learning rate {learning_rate:g}" if learning_rate is not None else ""))
        if accumulate and self.trainer.logger is not None:
            self.trainer.logger.log_hyperparams(plan.as_hparams() | {"learning_rate": learning_rate})
        return plan

    def run_folders(self) -> list[str]:
        """Where the run writes: its root, the checkpoint folder and the loggers' folders."""
        folders = [run_root(self.trainer.default_root_dir)]
        folders += [
            callback.dirpath for callback in self.trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)
        ]
        folders += [logger.root_dir for logger in self.trainer.loggers if isinstance(logger, TensorBoardLogger)]
        return list(dict.fromkeys(map(str, folders)))

    def min_free_bytes(self) -> int:
        given = self.subcommand_option("min_free_gb")
        if given is not None:
            return int(given * 1e9)
        saves = any(c.save_top_k != 0 or c.save_last for c in self.trainer.checkpoint_callbacks)
        return checkpoint_bytes(self.model, saves)

    def check_run_folders(self, min_free_bytes: int = 0) -> None:
        """Fail now, naming the folder, rather than at the first checkpoint hours later."""
        for folder in self.run_folders():
            check_writable(folder)
            check_free_space(folder, min_free_bytes)

    def check_checkpoint(self, stage: str) -> str | None:
        """The checkpoint Lightning will load, refused now if it does not fit (validate, test, predict need one)."""
        given = self.subcommand_option("ckpt_path")
        if stage != "fit" and is_pretrained_folder(given):  # an exported model: Lightning then loads no checkpoint
            load_exported(self.model, given)
            self.config_init[self.subcommand]["ckpt_path"] = None
            return None
        path = resolve_checkpoint_path(self.trainer, stage, given)
        if path:
            self.checked_checkpoint = check_checkpoint(path, self.model, self.datamodule)
            if stage == "fit":
                check_weight_averaging(path, self.trainer)
        elif stage != "fit" and not self.subcommand_option("allow_untrained") and not self.model_is_pretrained():
            raise UntrainedModelError(untrained_message(stage, given, self.trainer.checkpoint_callback))
        return path

    def model_is_pretrained(self) -> bool:
        """A model that classifies without a checkpoint of ours (Stable Diffusion from its weights folder)."""
        return bool(getattr(self.model, "pretrained", None))

    def continue_logging_of(self, checkpoint: str) -> None:
        """Log a resumed run into the TensorBoard version of the run it resumes, not a new one."""
        # this run's checkpoints: checkpoints/ and, for SLURM requeues, the run root (hpc_ckpt_N.ckpt)
        own_folders = {Path(folder).resolve() for folder in self.run_folders()}
        if Path(checkpoint).resolve().parent not in own_folders:  # another run's: a version of its own
            return
        version = load_weights_file(checkpoint).get(LOGGER_VERSION_KEY)
        if version is None:  # written before RunCheckpoint recorded it: the newest version
            version = latest_version(self.trainer.logger.root_dir)
        if version is not None:
            self.trainer.logger = tensorboard_logger(self.trainer.default_root_dir, version)
            rank_zero_info(f"resuming {checkpoint}: logging continues in {self.trainer.logger.log_dir}")

    def note_under_ddp(self, note: str) -> bool:
        world_size = self.trainer.num_devices * self.trainer.num_nodes
        if world_size > 1:
            rank_zero_info(note.format(extra=world_size - 1))
        return world_size > 1


def suite_trainer_options(trainer_config: dict) -> dict:
    """What every run's Trainer gets beside its config's options (instantiated): the TensorBoard logger in
    `<root>/tensorboard/version_N` unless the config names a logger, a progress bar, NonFiniteLoss,
    AtomicCheckpointIO, and SlurmRequeue under SLURM. cli.py's runs and tools.classify both build theirs so."""
    options = {}
    if trainer_config.get("logger") in (None, True):
        options["logger"] = tensorboard_logger(trainer_config.get("default_root_dir"))
    callbacks = list(trainer_config.get("callbacks") or [])
    wants_bar = trainer_config.get("enable_progress_bar") is not False
    if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
        # Lightning >= 2.6 defaults to the Rich bar, whose redraws flood SLURM log files.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if not any(isinstance(callback, NonFiniteLoss) for callback in callbacks):
        callbacks.append(NonFiniteLoss(action="stop"))
    plugins = list(always_a_list(trainer_config.get("plugins")))
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())  # a checkpoint killed mid-write leaves the previous one
    if SLURMEnvironment.detect():
        # our SlurmRequeue saves and requeues at a batch end; Lightning's handler saves inside the
        # signal handler, which can hang DDP (Lightning-AI/pytorch-lightning#21406)
        plugins = [p for p in plugins if not isinstance(p, SLURMEnvironment)] + [SLURMEnvironment(auto_requeue=False)]
        if not any(isinstance(callback, SlurmRequeue) for callback in callbacks):
            callbacks.append(SlurmRequeue())
    return options | {"callbacks": callbacks, "plugins": plugins}


class UntrainedModelError(RuntimeError):
    """validate / test / predict without trained weights; the message says where it looked."""


def untrained_message(stage: str, given: str | None, callback) -> str:
    if given == "last":
        folder = getattr(callback, "dirpath", None) or "the run's checkpoints folder"
        where = f"--ckpt_path last found no checkpoint in {folder}"
    else:
        where = "no --ckpt_path was given"
    return (
        f"{stage} needs trained weights, but {where}: train first (python cli.py fit --config ...), give "
        f"--ckpt_path path/to/checkpoint.ckpt, or pass --allow_untrained true to {stage} random weights (debugging)"
    )


def always_a_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# Library notices about what the suite does on purpose, or about the libraries' own internals, that a
# user can do nothing about; filtered by their text so that any other warning still shows.
LIBRARY_NOISE = (
    # on every run of a node with `srun` installed (a login or interactive node) unless it runs under
    # srun: the suite's job scripts do (tools/slurm.py); a run started by hand is meant so
    "The `srun` command is available on your system but is not used",
    # outside fit the EMA callback has nothing to restore: checkpoints hold the EMA weights in state_dict,
    # which is what validate, test and predict use (dropping the callback there makes Lightning warn
    # instead that the checkpoint's callback state has no callback)
    "You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage",
    # torch 2.14 deprecates LeafSpec, which Lightning 2.6's own _pytree helper still checks for
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the tools call the CLI with their own arguments while sys.argv holds the tool's: no conflict (and
    # sys.argv must stay, since DDP re-launches the same command line for the other ranks)
    "LightningCLI's args parameter is intended to run from within Python",
)
LIBRARY_ADVERTS = ("litlogger",)  # Lightning's "Tip" to install its cloud logger, at every Trainer


def quiet_library_noise() -> None:
    """Filters LIBRARY_NOISE from warnings and LIBRARY_ADVERTS from Lightning's info log (tests/test_cli.py
    fails if any of them reaches a run's output again)."""
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, AdvertFilter) for f in log.filters):
        log.addFilter(AdvertFilter())


class AdvertFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in LIBRARY_ADVERTS)


def main(args: list[str] | None = None, exit_on_error: bool = True) -> ExperimentCLI:
    """The CLI, for tests and scripts; exceptions propagate. exit_on_error=False: a parse error raises
    argparse.ArgumentError instead of printing the usage and exiting."""
    quiet_library_noise()
    subcommands = ("fit", "validate", "test", "predict")
    return ExperimentCLI(
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_class=StrictArgumentParser,
        parser_kwargs={"exit_on_error": exit_on_error}
        | {name: {"exit_on_error": exit_on_error} for name in subcommands},
    )


def run(args: list[str] | None = None) -> int:
    """The command line: a mistake in the options, data, images or checkpoint prints one line naming
    the culprit and exits with status 2, without a traceback (set DIFFCLS_DEBUG=1 for one)."""
    lightning_info_to_stdout()
    return guarded(lambda: main(args, exit_on_error=False) and 0)


def lightning_info_to_stdout() -> None:
    """Lightning's progress notes ("Seed set to 0", "GPU available", "Restoring states") go to stdout,
    so that stderr holds what needs attention: warnings and errors."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


if __name__ == "__main__":
    sys.exit(run())
