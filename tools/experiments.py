"""What the tools share to reach a trained model: its config and weights from the checkpoint alone."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import yaml

from cli import ExperimentCLI, quiet_library_noise
from datamodules.errors import DataError
from lightning_modules.callbacks import CONFIG_FILE, EXPERIMENT_CONFIG_KEY, LOGGER_VERSION_KEY
from lightning_modules.checkpoint_check import check_checkpoint
from networks.weights import load_weights_file

# arguments of Trainer.fit that a run saves with its config, but not options of the experiment
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only")


def experiment_config(checkpoint_path: Path, checkpoint: dict) -> str:
    """The config the checkpoint was trained with: stored in it, or the config.yaml of its run."""
    if checkpoint.get(EXPERIMENT_CONFIG_KEY):
        return checkpoint[EXPERIMENT_CONFIG_KEY]
    run_root = checkpoint_path.resolve().parent.parent  # <root>/checkpoints/last.ckpt
    version = checkpoint.get(LOGGER_VERSION_KEY)
    candidates = [run_root / "tensorboard" / f"version_{version}" / CONFIG_FILE] if version is not None else []
    candidates += sorted((run_root / "tensorboard").glob(f"version_*/{CONFIG_FILE}"), reverse=True)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text()
    raise DataError(
        f"{checkpoint_path} holds no config and none was found beside it ({run_root / 'tensorboard'}/version_*/"
        f"{CONFIG_FILE}): pass the experiment config yourself: python cli.py predict --config <config> "
        f"--ckpt_path {checkpoint_path} --data datamodules.ImagesDataModule --data.init_args.source <images> ..."
    )


def load_trained(checkpoint_path: str | Path, overrides: list[str] = ()) -> ExperimentCLI:
    """Model (with the checkpoint's weights, EMA ones when trained with EMA), data and trainer of the run
    that wrote `checkpoint_path`, built from the config it was trained with; nothing runs."""
    checkpoint_path = Path(checkpoint_path)
    config = yaml.safe_load(experiment_config(checkpoint_path, load_weights_file(checkpoint_path)))
    for key in SUBCOMMAND_KEYS:
        config.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "trained_with.yaml"
        file.write_text(yaml.safe_dump(config))
        return load_experiment(str(file), str(checkpoint_path), list(overrides))


def load_experiment(config: str, ckpt_path: str | None = None, overrides: list[str] = ()) -> ExperimentCLI:
    """Model, data and trainer of an experiment config, without running anything (for scripts and
    benchmarks); with `ckpt_path`, the model gets the checkpoint's weights (EMA ones when trained
    with EMA)."""
    quiet_library_noise()
    cli = ExperimentCLI(
        args=["--config", config, *overrides], run=False, save_config_callback=None, seed_everything_default=0
    )
    cli.split_global_batch()
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, cli.model, cli.datamodule)
        checkpoint = load_weights_file(ckpt_path, mmap=False)
        cli.model.load_state_dict(checkpoint["state_dict"])
    return cli


def resolved_config(config: str | Path, *overrides: str) -> dict:
    """An experiment config as `fit --print_config` resolves it (includes, data and network files, defaults),
    without building anything: for tools that need a config's values, e.g. its run folder."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            quiet_library_noise()
            ExperimentCLI(
                args=["fit", "--config", str(config), *overrides, "--print_config"], seed_everything_default=0
            )
    except SystemExit as done:  # --print_config exits after printing; a parse error exits with 2
        if done.code not in (0, None):
            raise
    return yaml.safe_load(printed.getvalue())
