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
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only

import cli
from evaluation.decisions import RULES_BLOCK, SHIFT_BLOCK, off_lines, rule_status
from evaluation.results import DECISIONS_FILE, PREDICTIONS_FILE
from evaluation.set_shift import shift_message
from lightning_modules.pretrained import is_pretrained_folder, read_config
from networks.weights import load_weights_file
from tools.experiments import experiment_config


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
        "checkpoint",
        type=Path,
        help="a checkpoint of a run of this suite (e.g. runs/demo/checkpoints/last.ckpt), or a folder of tools.export",
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
        config, hyperparameters = model_config(args.checkpoint)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    config_file = args.output / "trained_with.yaml"
    config_file.write_text(config if config.endswith("\n") else config + "\n")
    yaml.safe_load(config)  # fail here, not inside the CLI, if the stored config is not YAML
    status = cli.run([*cli_arguments(args, config_file, hyperparameters), *extra])
    if status == 0 and rank_zero_only.rank == 0:
        print(summary(newest_predictions(args.output), args.checkpoint))
    return status


def model_config(source: Path) -> tuple[str, dict]:
    """(experiment config as YAML, the model's class names and image size) of a checkpoint, or of a folder
    exported by tools/export.py (its config.yaml; one process on one device unless options after `--` say more)."""
    if is_pretrained_folder(source):
        exported = read_config(source)
        config = {"model": exported["model"], "trainer": {"devices": 1}}
        return yaml.safe_dump(config, sort_keys=False), exported["model"]["init_args"]
    checkpoint = load_weights_file(source)
    return experiment_config(source, checkpoint), checkpoint["hyper_parameters"]


def newest_predictions(output: Path) -> Path:
    return max(output.rglob(PREDICTIONS_FILE), key=lambda path: path.stat().st_mtime)


def summary(predictions: Path, checkpoint: Path) -> str:
    """What a person reads first: each decision rule that is OFF and why, how many images were refused as
    unlike the training data, then the answers of the others and how many of those are referred for
    uncertainty, and whether the set as a whole looked like the validation images."""
    with predictions.open() as handle:
        rows = list(csv.DictReader(handle))
    decisions_file = predictions.parent / DECISIONS_FILE
    decisions = json.loads(decisions_file.read_text()) if decisions_file.is_file() else {}
    rules = decisions.get(RULES_BLOCK) or rule_status(None, f"no {decisions_file} was written")
    lines = [f"Classified {len(rows)} images with {checkpoint} -> {predictions}"]
    lines += [f"  {line}" for line in off_lines(rules)]
    answered = rows
    if rules["refusal"]["on"]:
        refused = [row for row in rows if row["out_of_distribution"] == "true"]
        answered = [row for row in rows if row["out_of_distribution"] != "true"]
        lines.append(f"  {len(refused)} of {len(rows)} images refused: unlike the images the model was calibrated "
                     "on (out_of_distribution = true); no answer is given for them")  # fmt: skip
    counts = Counter(row["predicted_class"] for row in answered)
    lines.append(f"  {len(answered)} answered: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    if rules["referral"]["on"]:
        referred = sum(row["refer"] == "true" for row in answered)
        lines.append(f"  {referred} of the answered referred to a human for uncertainty (refer = true)")
    shift = decisions.get(SHIFT_BLOCK)
    if shift:
        lines.append(f"  warning: {shift_message(shift)}" if shift["shifted"] else
                     f"  whole-set checks against the validation images: none fired at level {shift['level']} "
                     f"({', '.join(shift['tests'])})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
