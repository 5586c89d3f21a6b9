"""Where a run writes, checked before it starts: the run root, the TensorBoard logger of a run (and the
version a resumed run continues), and whether the folders can be written and hold two checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

LOGGER_NAME = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CALIBRATION_FILE = "calibration.json"  # validate's decision rules (decisions/calibration.py)
EXPORT_DIR = "export"  # tools/export.py's default folder inside a run
# A checkpoint holds about 4 copies of the trained parameters (weights, EMA weights, Adam's two
# moments) and one of the frozen ones (e.g. Stable Diffusion's VAE and text encoder), and
# ModelCheckpoint writes the new file before it deletes the old one: room for two.
CHECKPOINT_PARAMETER_COPIES = 8
CHECKPOINT_FROZEN_COPIES = 2


class RunFolderError(RuntimeError):
    """A run folder cannot be written, or its disk is too full; the message names the folder."""


def run_root(default_root_dir: str | None) -> str:
    return default_root_dir or os.getcwd()


def tensorboard_logger(default_root_dir: str | None, version: int | str | None = None) -> TensorBoardLogger:
    return TensorBoardLogger(
        save_dir=run_root(default_root_dir), name=LOGGER_NAME, version=version, default_hp_metric=False
    )


def latest_version(logger_root: str) -> int | None:
    numbers = [
        int(m.group(1)) for d in Path(logger_root).glob("version_*") if (m := re.fullmatch(r"version_(\d+)", d.name))
    ]
    return max(numbers, default=None)


def check_writable(folder: str) -> None:
    """Create `folder` and write and delete a probe file in it, or raise RunFolderError naming it."""
    probe = Path(folder) / f".write_probe_{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(
            f"cannot write to the run folder {folder}: {error.strerror or error}; "
            "choose a writable --trainer.default_root_dir"
        ) from None


def check_free_space(folder: str, min_free_bytes: int) -> None:
    """Fail now, naming the folder, rather than at the first checkpoint hours later."""
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise RunFolderError(
            f"only {free / 1e9:.2f} GB free on the disk of {folder}; this run needs at least "
            f"{min_free_bytes / 1e9:.2f} GB (--min_free_gb; default: {CHECKPOINT_PARAMETER_COPIES} x the "
            "model's parameter bytes, room for two checkpoints). Free some space, choose another "
            "--trainer.default_root_dir, or set --min_free_gb 0 to skip the check"
        )


def checkpoint_bytes(model, saves_checkpoints: bool) -> int:
    """Room for two checkpoints of `model` (see the copies above); 0 when the run saves none."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return CHECKPOINT_PARAMETER_COPIES * trained + CHECKPOINT_FROZEN_COPIES * frozen if saves_checkpoints else 0


DATA_FILE = "data.json"  # the data a run folder's training run learned from
DATA_IDENTITY_OPTIONS = ("root", "csv", "flag", "kind")  # what names a data set (not how it is loaded)


def data_identity(datamodule) -> dict:
    """What a training run learned from: the datamodule's class, its classes, and the options that name the data
    (folder, table, MedMNIST flag, synthetic kind); loader settings (batch size, workers) are left out."""
    identity = {"datamodule": type(datamodule).__name__, "class_names": list(datamodule.class_names)}
    for name in DATA_IDENTITY_OPTIONS:
        value = getattr(datamodule, name, None)
        if value is not None:
            is_path = name in ("root", "csv") and Path(str(value)).exists()
            identity[name] = str(Path(value).resolve()) if is_path else str(value)
    return identity


def check_same_data(default_root_dir: str | None, identity: dict) -> None:
    """A fit into a run folder that already holds a run of other data is refused (its checkpoints, --ckpt_path last
    and its test results would mix two data sets); otherwise the folder records this run's data in data.json."""
    folder = Path(run_root(default_root_dir))
    recorded_file = folder / DATA_FILE
    if recorded_file.is_file():
        recorded = json.loads(recorded_file.read_text())
        if recorded != identity:
            differ = [key for key in sorted({*recorded, *identity}) if recorded.get(key) != identity.get(key)]
            changes = "; ".join(f"{key}: {recorded.get(key)!r} there, {identity.get(key)!r} now" for key in differ)
            example = identity.get("kind") or Path(identity.get("root") or "my_data").name
            raise RunFolderError(
                f"the run folder {folder} holds a run of other data ({changes}): give this run a folder of its own "
                f"with --trainer.default_root_dir, e.g. runs/{example}"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    recorded_file.write_text(json.dumps(identity, indent=2) + "\n")


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and the places of what the suite writes in it, named here once:

    <root>/checkpoints/       last.ckpt and the best ones (RunCheckpoint)
    <root>/calibration.json   what `validate` fitted (decision rules), beside checkpoints/
    <root>/data.json          the data a training run learned from
    <root>/export/            tools.export's default folder (model.safetensors, config.yaml, card)
    <root>/tensorboard/version_N/   a stage's logs and files: predictions.csv, metrics.json, report.html
    """

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def calibration(self) -> Path:
        return self.root / CALIBRATION_FILE

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / LOGGER_NAME

    @property
    def data(self) -> Path:
        return self.root / DATA_FILE

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    def version(self, number: int | str) -> Path:
        return self.tensorboard / f"version_{number}"

    def versions(self) -> list[Path]:
        """The TensorBoard version folders, oldest first (by their number)."""
        found = [(int(m.group(1)), d) for d in self.tensorboard.glob("version_*")
                 if (m := re.fullmatch(r"version_(\d+)", d.name))]  # fmt: skip
        return [folder for _, folder in sorted(found)]

    @classmethod
    def around(cls, checkpoint: str | Path) -> RunFolder:
        """The run folder of a checkpoint file (<root>/checkpoints/<name>.ckpt), symlinks resolved."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunFolder | None:
        """The run whose checkpoints/ folder holds `checkpoint`, named by a relative or absolute path or through a
        symlink to it: the named run when its calibration.json is there, else the resolved one's, else the named
        one; None for a checkpoint outside any run's checkpoints/ folder."""
        named, resolved = Path(checkpoint), Path(checkpoint).resolve()
        runs = [cls(path.parent.parent) for path in (named, resolved) if path.parent.name == CHECKPOINTS_DIR]
        return next((run for run in runs if run.calibration.is_file()), runs[0] if runs else None)


def calibration_file(weights: str | Path | None, exported: bool, default_root_dir: str | None) -> Path:
    """calibration.json of the weights that classify: in an exported folder, beside the run's checkpoints/ folder
    (so tools.classify finds it for new images), or in default_root_dir."""
    if weights and exported:
        return Path(weights) / CALIBRATION_FILE
    run = RunFolder.of_checkpoint(weights) if weights else None
    return (run or RunFolder(Path(run_root(default_root_dir)))).calibration
