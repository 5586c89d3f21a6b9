"""Export a trained classifier as one folder that travels: safetensors weights, config, calibration, model card.

    python -m tools.export runs/demo                           # the run's last checkpoint -> runs/demo/export/
    python -m tools.export runs/demo OUT/
    python -m tools.export runs/demo/checkpoints/last.ckpt OUT/

The folder (experiment/pretrained.py) holds the classifying weights only (EMA where the run has it; for
Stable Diffusion the fine-tuned UNet, the frozen parts named), the model's config with every option that rebuilds
it, the run's calibration.json where it belongs to these weights and settings, and a model card (README.md) written
from the run's own files. Load it with `ClassifierModule.from_pretrained(OUT)`, `python cli.py test|predict
--config OUT/config.yaml --ckpt_path OUT ...`, or `python -m tools.classify OUT images/`: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from decisions.binding import binding_mismatch, weights_digest
from experiment.pretrained import CARD_FILE, WEIGHTS_FILE, save_pretrained
from experiment.run_folders import CALIBRATION_FILE, EXPORT_DIR, RunFolder
from experiment.user_errors import tool_main
from networks.weights import load_weights_file
from reports.model_card import model_card
from reports.results import METRICS_FILE
from tools.experiments import experiment_config, load_trained

LINKED = ("num_classes", "class_names", "image_size", "image_channels")  # set from the data at training time
NOT_EXPORTED = {"finetuned_checkpoint": None}  # the weights come from model.safetensors, not this path


def checkpoint_of(run_or_checkpoint: Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = RunFolder(path).last_checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: name a run folder (with checkpoints/last.ckpt) or a .ckpt file"
        )
    return path


def export_config(checkpoint_path: Path, checkpoint: dict) -> dict:
    """What rebuilds the model: the run's `model` section with the options the data set (classes, image size),
    where it was trained from, and the training data's section for the card."""
    run_config = yaml.safe_load(experiment_config(checkpoint_path, checkpoint))
    hparams = checkpoint.get("hyper_parameters") or {}
    model = run_config["model"]
    init_args = dict(model.get("init_args") or {})
    init_args |= {key: _plain(hparams[key]) for key in LINKED if key in hparams}
    init_args |= {key: value for key, value in NOT_EXPORTED.items() if key in init_args}
    return {
        "model": {"class_path": model["class_path"], "init_args": init_args},
        "input": {
            "image_size": init_args.get("image_size"),
            "image_channels": init_args.get("image_channels", 3),
            "range": [-1.0, 1.0],
            "class_names": init_args.get("class_names"),
        },  # fmt: skip
        "training_data": run_config.get("data", {}),
        "source": {"checkpoint": str(checkpoint_path.resolve()), "global_step": checkpoint.get("global_step")},
    }


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def run_calibration(checkpoint_path: Path, model) -> tuple[dict | None, str | None]:
    """The run's calibration.json if it belongs to these weights and settings; else (None, why)."""
    file = RunFolder.around(checkpoint_path).calibration
    if not file.is_file():
        return None, f"no {file}: run validate first"
    calibration = json.loads(file.read_text())
    mismatch = binding_mismatch(calibration, weights_digest(model), model.decision_settings())
    return (None, f"{file} does not belong to these weights: {mismatch}") if mismatch else (calibration, None)


def run_metrics(checkpoint_path: Path) -> tuple[dict | None, str | None]:
    """The newest test metrics.json of the run that tested this checkpoint, if any."""
    run = RunFolder.around(checkpoint_path).root
    for path in sorted(run.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime, reverse=True):
        metrics = json.loads(path.read_text())
        tested = metrics.get("checkpoint")
        if tested and Path(tested).resolve() == checkpoint_path.resolve():
            return metrics, str(path)
    return None, None


def check_export_folder(output: Path, overwrite: bool) -> None:
    """The export goes to a new or empty folder, or replaces an earlier export (its model.safetensors); a folder of
    other files (a user's README.md, config.yaml) is refused unless --overwrite says to replace them."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} is a file: give a folder for the export")
    if overwrite or not output.is_dir() or (output / WEIGHTS_FILE).is_file():
        return
    present = sorted(path.name for path in output.iterdir())
    if present:
        shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
        raise ValueError(
            f"{output} holds files that are not an export ({shown}): export into a new folder, or pass --overwrite "
            "to replace them"
        )


def export(run_or_checkpoint, output, overwrite: bool = False) -> Path:
    check_export_folder(Path(output), overwrite)
    checkpoint_path = checkpoint_of(Path(run_or_checkpoint))
    checkpoint = load_weights_file(checkpoint_path)
    if not checkpoint.get("hyper_parameters"):
        raise ValueError(f"{checkpoint_path} records no hyperparameters (written outside LightningCLI?): cannot export")
    config = export_config(checkpoint_path, checkpoint)
    model = load_trained(checkpoint_path).model.eval()
    output = Path(output)
    save_pretrained(model, output, config)
    config = yaml.safe_load((output / "config.yaml").read_text())
    calibration, reason = run_calibration(checkpoint_path, model)
    if calibration:
        (output / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
    else:
        (output / CALIBRATION_FILE).unlink(missing_ok=True)
        print(
            f"note: calibration not exported ({reason}); refusal, referral and prediction sets are OFF for the export"
        )
    metrics, source = run_metrics(checkpoint_path)
    (output / CARD_FILE).write_text(model_card(config, metrics, source, calibration, reason))
    size = (output / WEIGHTS_FILE).stat().st_size
    print(f"exported {checkpoint_path} -> {output}/ (weights {size / 1e6:.1f} MB, checkpoint "
          f"{checkpoint_path.stat().st_size / 1e6:.1f} MB); model card: {output / CARD_FILE}")  # fmt: skip
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_or_checkpoint", help="a run folder (its checkpoints/last.ckpt) or a checkpoint file")
    parser.add_argument(
        "output",
        nargs="?",
        default=None,
        help=f"the folder to write (created; an earlier export in it is replaced); default <run>/{EXPORT_DIR}",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that holds other files, replacing same names"
    )
    args = parser.parse_args(argv)
    try:
        output = args.output or RunFolder.around(checkpoint_of(Path(args.run_or_checkpoint))).export
        export(args.run_or_checkpoint, output, args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    tool_main(main, "python -m tools.export ...")
