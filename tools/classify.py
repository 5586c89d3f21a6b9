"""Classify new images with a trained model, in one command.

    python -m tools.classify runs/demo/checkpoints/last.ckpt path/to/images/
    python -m tools.classify model.ckpt images.csv --output runs/ward_7 --explain
    python -m tools.classify model.ckpt images/ -- --trainer.devices 2 --trainer.strategy ddp

The images: a folder (searched recursively for PNG, JPEG, TIFF, BMP and DICOM files) or a CSV with
a `path` column and, optionally, a `label` column of class names (then metrics.json too).
The model: the checkpoint's own config (saved in it by the run that trained it, or found beside it
in the run's folder) with its classes and input size, so nothing is repeated. In this process, the
checkpoint read once, it runs predict (or test, when the CSV has labels and no explanations are asked
for) on datamodules.ImagesDataModule, as `cli.py predict` would; options after `--` (`--trainer...`,
`--model.init_args...`) apply on top of the config. predictions.csv (one row per image, with the
predicted class name) lands in `<output>/tensorboard/version_N/`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml
from lightning import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import cli
from datamodules import ImagesDataModule
from datamodules.batch_plan import batch_plan
from datamodules.errors import DataError
from datamodules.intake import Intake, check_intake, take_in
from decisions.calibration import RULES_BLOCK, SHIFT_BLOCK, off_lines
from decisions.set_shift import shift_message
from experiment.run_folders import CHECKPOINTS_DIR, DATA_FILE, check_writable
from lightning_modules.callbacks import ResultsWriter
from reports.results import PREDICTIONS_FILE
from tools.experiments import TrainedModel, open_trained


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
    cli.quiet_library_noise()
    return cli.guarded(lambda: classify(args, extra), "python -m tools.classify ...")


def classify(args: argparse.Namespace, extra: list[str]) -> int:
    """The intake (every file a row or a reason; before the model loads), then test or predict in this process:
    the checkpoint read once, the model, data and Trainer built from it, the ResultsWriter given the calibration."""
    args.output = args.output or Path("runs/classified") / args.source[0].stem
    check_output_folder(args.output, args.source)
    check_pass_through(extra)
    intake = take_in(args.source, None, args.keep_duplicates)
    check_intake(intake, args.strict)
    trained = open_trained(args.checkpoint, [*extra, *(["--model.init_args.explain=true"] if args.explain else [])])
    test = intake.labelled and not args.explain
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / TRAINED_WITH).write_text(yaml.safe_dump(trained.config, sort_keys=False))  # for the record
    writer, run_folder = classify_dataset(trained, intake, args.output, args.batch_size, test)
    if rank_zero_only.rank == 0:
        skipped = intake.write_skipped(run_folder)  # the files left out, and why, beside predictions.csv
        print(summary(writer, intake, run_folder / PREDICTIONS_FILE, args.checkpoint, skipped))
    return 0


def classify_dataset(trained: TrainedModel, intake: Intake, output: Path, batch_size: int, test: bool):
    """`trained` classifies the intake's images (test when labelled, else predict) with one Trainer whose run folder
    is `output`; returns the ResultsWriter (its records) and the folder of the files."""
    seed_everything(trained.seed, verbose=False)  # what cli.py's runs do: a baseline's MC dropout draws from it
    options = trained.trainer_options | {"default_root_dir": str(output), "enable_checkpointing": False}  # no fit
    trainer = Trainer(**options | cli.suite_trainer_options(options))
    plan = batch_plan(batch_size, None, trainer.world_size, 1)
    rank_zero_info(plan.describe())
    model = trained.model
    data = ImagesDataModule(intake, model.class_names, model.hparams.image_size, batch_size=plan.per_process)
    for folder in (output, trainer.logger.root_dir if trainer.logger else output):
        check_writable(str(folder))
    writer = ResultsWriter.for_model(model, trained.weights, trained.digest, str(output))
    trainer.callbacks.append(writer)
    (trainer.test if test else trainer.predict)(model, datamodule=data)
    return writer, Path(trainer.log_dir or output)  # log_dir: a collective under DDP, asked on every rank


TRAINED_WITH = "trained_with.yaml"  # the model's experiment config, beside the results
TRAINING_RUN_MARKS = (CHECKPOINTS_DIR, DATA_FILE)  # what `cli.py fit` leaves in a run folder
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


def summary(writer: ResultsWriter, intake: Intake, predictions: Path, checkpoint: Path, skipped_file: Path) -> str:
    """What a person reads first: each decision rule that is OFF and why, how many images were refused as
    unlike the training data, then the answers of the others and how many of those are referred for
    uncertainty, and whether the set as a whole looked like the validation images."""
    records, decisions = writer.records, writer.numbers
    rules = decisions[RULES_BLOCK]
    lines = [f"Classified {len(records)} images with {checkpoint} -> {predictions}"]
    if intake.skipped:
        lines.append(f"  {len(intake.skipped)} files skipped, each with its reason in {skipped_file}")
    lines += [f"  {line}" for line in off_lines(rules)]
    answered = [record for record in records if not record.refused]
    if rules["refusal"]["on"]:
        lines.append(f"  {len(records) - len(answered)} of {len(records)} images refused: unlike the images the "
                     "model was calibrated on (out_of_distribution = true); no answer is given for them")  # fmt: skip
    counts = Counter(writer.class_names[record.leading] for record in answered)
    lines.append(f"  {len(answered)} answered" + "".join(f", {name} {n}" for name, n in sorted(counts.items())))
    if rules["referral"]["on"]:
        referred = sum(record.referred for record in answered)
        lines.append(f"  {referred} of the answered referred to a human for uncertainty (refer = true)")
    shift = decisions.get(SHIFT_BLOCK)
    if shift:
        lines.append(f"  warning: {shift_message(shift)}" if shift["shifted"] else
                     f"  whole-set checks against the validation images: none fired at level {shift['level']} "
                     f"({', '.join(shift['tests'])})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
