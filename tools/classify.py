"""Classify new images with a trained model, in one command.

    python -m tools.classify runs/demo/checkpoints/last.ckpt path/to/images/
    python -m tools.classify model.ckpt images.csv --output runs/ward_7 --explain
    python -m tools.classify model.ckpt images/ -- --trainer.devices 2 --trainer.strategy ddp

The images: a folder (searched recursively for PNG, JPEG, TIFF, BMP and DICOM files) or a CSV with
a `path` column and, optionally, a `label` column of class names (then metrics.json too).
The model: the checkpoint's own config (saved in it by the run that trained it, or found beside it
in the run's folder) with its classes and input size, so nothing is repeated. It runs
`python cli.py predict` (or `test`, when the CSV has labels and no explanations are asked for) with
datamodules.ImagesDataModule; options after `--` go to the CLI as they are. predictions.csv (one row
per image, with the predicted class name) lands in `<output>/tensorboard/version_N/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

import cli
from datamodules.errors import DataError
from lightning_modules.callbacks import CONFIG_FILE, EXPERIMENT_CONFIG_KEY, LOGGER_VERSION_KEY
from networks.weights import load_weights_file


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


def has_labels(source: Path) -> bool:
    if not source.is_file():
        return False
    with source.open() as handle:
        return "label" in handle.readline().strip().split(",")


def cli_arguments(args: argparse.Namespace, config_file: Path, hyperparameters: dict) -> list[str]:
    subcommand = "test" if has_labels(args.source) and not args.explain else "predict"
    return [
        subcommand, f"--config={config_file}", f"--ckpt_path={args.checkpoint}",
        "--data=datamodules.ImagesDataModule", f"--data.init_args.source={args.source}",
        f"--data.init_args.class_names={json.dumps(list(hyperparameters['class_names']))}",
        f"--data.init_args.image_size={hyperparameters['image_size']}",
        f"--trainer.default_root_dir={args.output}", f"--global_batch_size={args.batch_size}",
        *(["--model.init_args.explain=true"] if args.explain else []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint of a run of this suite (e.g. runs/demo/checkpoints/last.ckpt)"
    )
    parser.add_argument(
        "source", type=Path, help="a folder of images, or a CSV with a path column (and optionally label)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="run folder of the results (default: runs/classified/<source name>)"
    )
    parser.add_argument(
        "--explain", action="store_true", help="also write counterfactual explanations (diffusion models)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch over all processes (default 16)")
    args = parser.parse_args(own)  # fmt: skip
    args.output = args.output or Path("runs/classified") / args.source.stem
    try:
        checkpoint = load_weights_file(args.checkpoint)
        config = experiment_config(args.checkpoint, checkpoint)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    config_file = args.output / "trained_with.yaml"
    config_file.write_text(config if config.endswith("\n") else config + "\n")
    yaml.safe_load(config)  # fail here, not inside the CLI, if the stored config is not YAML
    return cli.run([*cli_arguments(args, config_file, checkpoint["hyper_parameters"]), *extra])


if __name__ == "__main__":
    sys.exit(main())
