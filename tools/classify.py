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
from datamodules.errors import DataError
from datamodules.intake import SKIPPED_FILE, check_intake, take_in
from evaluation.decisions import RULES_BLOCK, SHIFT_BLOCK, off_lines, rule_status
from evaluation.results import DECISIONS_FILE, PREDICTIONS_FILE
from evaluation.set_shift import shift_message
from lightning_modules.pretrained import is_pretrained_folder, read_config
from networks.weights import load_weights_file
from tools.experiments import experiment_config


def cli_arguments(args: argparse.Namespace, config_file: Path, hyperparameters: dict, labelled: bool) -> list[str]:
    subcommand = "test" if labelled and not args.explain else "predict"
    source = str(args.source[0]) if len(args.source) == 1 else json.dumps([str(path) for path in args.source])
    return [
        subcommand, f"--config={config_file}", f"--ckpt_path={args.checkpoint}",
        "--data=datamodules.ImagesDataModule", f"--data.init_args.source={source}",
        f"--data.init_args.class_names={json.dumps(list(hyperparameters['class_names']))}",
        f"--data.init_args.image_size={hyperparameters['image_size']}",
        f"--data.init_args.strict={str(args.strict).lower()}",
        f"--data.init_args.keep_duplicates={str(args.keep_duplicates).lower()}",
        f"--trainer.default_root_dir={args.output}", f"--global_batch_size={args.batch_size}",
        *(["--model.init_args.explain=true"] if args.explain else []),
    ]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint of a run of this suite (e.g. runs/demo/checkpoints/last.ckpt), or a folder of tools.export",
    )
    parser.add_argument(
        "source", type=Path, nargs="+",
        help="a folder of images, one or more image files, or a CSV with a path column (and optionally label)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=Path, default=None, help="run folder of the results (default: runs/classified/<source name>)"
    )
    parser.add_argument(
        "--explain", action="store_true", help="also write counterfactual explanations (diffusion models)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch over all processes (default 16)")
    parser.add_argument("--strict", action="store_true",
                        help="stop before the model loads if any file would be skipped, naming them all "
                             "(default: classify the readable images, list the others in skipped.csv)")  # fmt: skip
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="classify a second copy of a file too (same path or same bytes); default: skip it as "
                             "'duplicate of <first>', so metrics count each image once")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    cli.lightning_info_to_stdout()
    return cli.guarded(lambda: classify(args, extra), "python -m tools.classify ...")


def classify(args: argparse.Namespace, extra: list[str]) -> int:
    """The intake (every file a row or a reason; before the model loads), then the CLI's test or predict."""
    args.output = args.output or Path("runs/classified") / args.source[0].stem
    check_output_folder(args.output, args.source)
    check_pass_through(extra)
    intake = take_in(args.source, None, args.keep_duplicates)
    check_intake(intake, args.strict)
    config, hyperparameters = model_config(args.checkpoint)
    args.output.mkdir(parents=True, exist_ok=True)
    config_file = args.output / "trained_with.yaml"
    config_file.write_text(config if config.endswith("\n") else config + "\n")
    experiment = cli.main([*cli_arguments(args, config_file, hyperparameters, intake.labelled), *extra], False)
    run_folder = Path(experiment.trainer.log_dir)  # a collective under DDP: asked on every rank
    if rank_zero_only.rank == 0:
        print(summary(run_folder / PREDICTIONS_FILE, args.checkpoint))
    return 0


TRAINING_RUN_MARKS = ("checkpoints", "data.json")  # what `cli.py fit` leaves in a run folder
DROPPING_OPTIONS = ("--trainer.limit_predict_batches", "--trainer.limit_test_batches")


def check_output_folder(output: Path, sources: list[Path]) -> None:
    """--output must be a folder or not exist yet, no file may stand where one of its parents would be, it may not
    be a training run's folder (its summary and tables would then read this classification as the run's test), and
    it may not lie in a source folder (a second run would classify the first one's outputs as images)."""
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            what = "is a file" if path == output else f"lies below the file {path}"
            raise DataError(f"--output {output} {what}: give a folder for the results")
    marks = [mark for mark in TRAINING_RUN_MARKS if (output / mark).exists()]
    if marks:
        raise DataError(
            f"--output {output} holds a training run ({output / marks[0]}): classifications are written beside runs, "
            f"never into one; give another folder, e.g. --output runs/classified/{sources[0].stem or 'images'}"
        )
    resolved = output.resolve()
    for source in sources:
        if source.is_dir() and (resolved == source.resolve() or source.resolve() in resolved.parents):
            raise DataError(
                f"--output {output} lies in the source folder {source}: its files would be read as images next time; "
                "give a folder outside the images"
            )


def check_pass_through(extra: list[str]) -> None:
    """Options after `--` may not drop images: every file is a row of predictions.csv or of skipped.csv."""
    for option in extra:
        if option.split("=", 1)[0] in DROPPING_OPTIONS:
            raise DataError(
                f"{option.split('=', 1)[0]} after -- would leave images unclassified and unlisted: tools.classify "
                "classifies every image it takes in (give fewer images instead)"
            )


def model_config(source: Path) -> tuple[str, dict]:
    """(experiment config as YAML, the model's class names and image size) of a checkpoint, or of a folder
    exported by tools/export.py (its config.yaml; one process on one device unless options after `--` say more)."""
    if is_pretrained_folder(source):
        exported = read_config(source)
        config = {"model": exported["model"], "trainer": {"devices": 1}}
        return yaml.safe_dump(config, sort_keys=False), exported["model"]["init_args"]
    checkpoint = load_weights_file(source)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        held = f"a {type(checkpoint).__name__}" if not isinstance(checkpoint, dict) else "no hyper_parameters"
        raise DataError(f"{source} is not a checkpoint of this suite ({held}): give the last.ckpt of a run of "
                        "`python cli.py fit`, or a folder written by tools.export")  # fmt: skip
    config = experiment_config(source, checkpoint)
    yaml.safe_load(config)  # refuse here, not inside the CLI, a stored config that is not YAML
    return config, checkpoint["hyper_parameters"]


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
    skipped_file = predictions.parent / SKIPPED_FILE
    if skipped_file.is_file():
        with skipped_file.open() as handle:
            skipped = [row["reason"] for row in csv.DictReader(handle)]
        if skipped:
            lines.append(f"  {len(skipped)} files skipped, each with its reason in {skipped_file}")
    lines += [f"  {line}" for line in off_lines(rules)]
    answered = rows
    if rules["refusal"]["on"]:
        refused = [row for row in rows if row["out_of_distribution"] == "true"]
        answered = [row for row in rows if row["out_of_distribution"] != "true"]
        lines.append(f"  {len(refused)} of {len(rows)} images refused: unlike the images the model was calibrated "
                     "on (out_of_distribution = true); no answer is given for them")  # fmt: skip
    counts = Counter(row["predicted_class"] for row in answered)
    lines.append(f"  {len(answered)} answered" + "".join(f", {name} {n}" for name, n in sorted(counts.items())))
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
