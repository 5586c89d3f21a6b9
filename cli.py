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
"""

from __future__ import annotations

import os
import sys

# Config class paths (lightning_modules..., datamodules...) resolve from the repo root, whatever
# the working directory (SLURM jobs, scripts importing load_experiment).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_modules.callbacks import PredictionsWriter, RunCheckpoint

LINKED_DATA_PROPERTIES = ("num_classes", "class_names", "image_size", "image_channels")


class ExperimentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED_DATA_PROPERTIES:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def before_instantiate_classes(self) -> None:
        # Pin the checkpoint folder to the run, not to the logger's version_N folder: otherwise a
        # new process resolves `--ckpt_path last` in an empty fresh version and starts from scratch.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(run_root(config.trainer.default_root_dir), "checkpoints")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                save_dir=run_root(trainer_config.get("default_root_dir")), name="tensorboard", default_hp_metric=False
            )
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            # Lightning >= 2.6 defaults to the Rich bar, whose redraws flood SLURM log files.
            callbacks.append(TQDMProgressBar(refresh_rate=10))
        if not any(isinstance(callback, BasePredictionWriter) for callback in callbacks):
            callbacks.append(PredictionsWriter())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def run_root(default_root_dir: str | None) -> str:
    return default_root_dir or os.getcwd()


def load_experiment(config: str, ckpt_path: str | None = None, overrides: list[str] = ()) -> ExperimentCLI:
    """Model, data and trainer of an experiment config, without running anything (for scripts and
    benchmarks); with `ckpt_path`, the model gets the checkpoint's weights (EMA ones when trained
    with EMA)."""
    import torch

    cli = ExperimentCLI(args=["--config", config, *overrides], run=False, save_config_callback=None, seed_everything_default=0)
    if ckpt_path is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cli.model.load_state_dict(checkpoint["state_dict"])
    return cli


def main(args: list[str] | None = None) -> ExperimentCLI:
    return ExperimentCLI(
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
