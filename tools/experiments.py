"""What the tools share to reach a trained model: its config and weights from the checkpoint alone, read once."""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning import LightningModule, Trainer

from cli import ExperimentCLI, StrictArgumentParser, quiet_library_noise
from datamodules.errors import DataError
from decisions.binding import weights_digest
from experiment.checkpoint_check import check_checkpoint
from experiment.pretrained import is_pretrained_folder, load_weights, read_config
from experiment.run_folders import RunFolder
from lightning_modules.callbacks import CONFIG_FILE, EXPERIMENT_CONFIG_KEY, LOGGER_VERSION_KEY
from networks.weights import load_weights_file

# arguments of Trainer.fit that a run saves with its config, but not options of the experiment
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only")


def experiment_config(checkpoint_path: Path, checkpoint: dict) -> str:
    """The config the checkpoint was trained with: stored in it, or the config.yaml of its run."""
    if checkpoint.get(EXPERIMENT_CONFIG_KEY):
        return checkpoint[EXPERIMENT_CONFIG_KEY]
    run = RunFolder.around(checkpoint_path)
    version = checkpoint.get(LOGGER_VERSION_KEY)
    candidates = [run.version(version) / CONFIG_FILE] if version is not None else []
    candidates += [folder / CONFIG_FILE for folder in reversed(run.versions())]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text()
    raise DataError(
        f"{checkpoint_path} holds no config and none was found beside it ({run.tensorboard}/version_*/"
        f"{CONFIG_FILE}): pass the experiment config yourself: python cli.py predict --config <config> "
        f"--ckpt_path {checkpoint_path} --data datamodules.ImagesDataModule --data.init_args.source <images> ..."
    )


def load_trained(checkpoint_path: str | Path, overrides: list[str] = ()) -> ExperimentCLI:
    """Model (with the checkpoint's weights, EMA ones when trained with EMA), data and trainer of the run
    that wrote `checkpoint_path`, built from the config it was trained with; nothing runs. The checkpoint is
    read once."""
    checkpoint_path = Path(checkpoint_path)
    checkpoint = read_checkpoint(checkpoint_path)
    config = yaml.safe_load(experiment_config(checkpoint_path, checkpoint))
    for key in SUBCOMMAND_KEYS:
        config.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "trained_with.yaml"
        file.write_text(yaml.safe_dump(config))
        return load_experiment(str(file), str(checkpoint_path), list(overrides), checkpoint)


def load_experiment(config: str, ckpt_path: str | None = None, overrides: list[str] = (),
                    checkpoint: dict | None = None) -> ExperimentCLI:  # fmt: skip
    """Model, data and trainer of an experiment config, without running anything (for scripts and
    benchmarks); with `ckpt_path`, the model gets the checkpoint's weights (EMA ones when trained
    with EMA), from `checkpoint` when the caller has read it already."""
    quiet_library_noise()
    cli = ExperimentCLI(
        args=["--config", config, *overrides], run=False, save_config_callback=None, seed_everything_default=0
    )
    cli.split_global_batch()
    if ckpt_path is not None:
        checkpoint = checkpoint or load_weights_file(ckpt_path, mmap=False)
        check_checkpoint(ckpt_path, cli.model, cli.datamodule, checkpoint)
        cli.model.load_state_dict(checkpoint["state_dict"])
    return cli


def read_checkpoint(path: Path) -> dict:
    """A checkpoint of this suite, read whole in one go (its weights are loaded next), or a one-line refusal."""
    checkpoint = load_weights_file(path, mmap=False)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        held = f"a {type(checkpoint).__name__}" if not isinstance(checkpoint, dict) else "no hyper_parameters"
        raise DataError(f"{path} is not a checkpoint of this suite ({held}): give the last.ckpt of a run of "
                        "`python cli.py fit`, or a folder written by tools.export")  # fmt: skip
    return checkpoint


@dataclass
class TrainedModel:
    """A classifier with its trained weights, built in this process from its checkpoint or exported folder.

    model: the LightningModule, weights loaded. trainer_options: its config's `trainer` section, instantiated
    (with the options given after `--`). weights: where the weights come from (metrics.json's `checkpoint`).
    digest: their decisions.binding digest (what a calibration must be bound to). seed: the run's seed.
    config: the experiment config it was built from (before the options after `--`)."""

    model: LightningModule
    trainer_options: dict
    weights: str
    digest: str
    seed: int
    config: dict


LINKED_HPARAMS = ("num_classes", "class_names", "image_size", "image_channels")  # the data's, saved in the model


def open_trained(source: Path, options: list[str] = ()) -> TrainedModel:
    """The model of a checkpoint (read once: its config, hyperparameters and weights come from that one read) or
    of a folder of tools.export, built from the config it was trained with, `options` (`--model.init_args...`,
    `--trainer...`) applied; nothing runs."""
    if is_pretrained_folder(source):
        exported = read_config(source)
        sections = config = {"model": exported["model"], "trainer": {"devices": 1}}
        seed, checkpoint = 0, None
    else:
        checkpoint = read_checkpoint(source)
        config = yaml.safe_load(experiment_config(source, checkpoint))
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise DataError(f"{source}: its stored config is no experiment config (no `model` section)")
        linked = {key: checkpoint["hyper_parameters"][key] for key in LINKED_HPARAMS
                  if key in checkpoint["hyper_parameters"]}  # fmt: skip
        model_section = config["model"] | {"init_args": (config["model"].get("init_args") or {}) | linked}
        sections = {"model": model_section, "trainer": config.get("trainer") or {}}
        seed = config.get("seed_everything", 0)
    built = built_sections(sections, list(options), source)
    model = built.model
    if checkpoint is None:
        load_weights(model, source, exported)
        model.pretrained_folder = Path(source)
        digest = exported["weights"]
    else:
        check_checkpoint(source, model, None, checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
        digest = weights_digest(model)
    seed = seed if isinstance(seed, int) else 0
    return TrainedModel(model, dict(built.trainer), str(source), digest, seed, config)


def built_sections(sections: dict, options: list[str], source: Path):
    """The `model` and `trainer` sections instantiated as cli.py would (the model's class by its class_path),
    with the command line's options after `--` on top; a mistyped one refused by name."""
    parser = StrictArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(Trainer, "trainer")
    try:
        parsed = parser.parse_object(sections)
        parsed = parser.parse_args(options, namespace=parsed) if options else parsed
    except argparse.ArgumentError as error:
        raise DataError(f"the model of {source} with {' '.join(options) or 'its config'}: {error}") from None
    return parser.instantiate_classes(parsed)


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


def classify_tensors(model, images: torch.Tensor, ids: torch.Tensor, batch_size: int, extra=None) -> tuple[dict, float]:
    """Per-image outputs of `model` over `images` in batches, the diffusion classifier's full error matrix (B, C, N)
    kept, and the seconds the classification took; `extra(model, batch)`, when given, adds outputs of its own (not
    timed). What the benchmarks share: tools.classify classifies files through a Trainer and its writer instead."""
    parts, seconds = [], 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = {"image": images[start : start + batch_size], "id": ids[start : start + batch_size]}
            started = time.perf_counter()
            if hasattr(model, "classification"):  # a diffusion classifier: its errors whatever save_errors says
                outputs = model.classify(batch, model.classification)
            else:
                outputs = model.classify_batch(batch)
            seconds += time.perf_counter() - started
            outputs |= extra(model, batch) if extra is not None else {}
            parts.append({key: value.cpu() for key, value in outputs.items() if isinstance(value, torch.Tensor)})
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, seconds
