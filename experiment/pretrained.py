"""A trained classifier as one folder that travels: weights as safetensors, the config that rebuilds it, its
calibration and a model card. Loading it unpickles nothing.

    model.safetensors   the classifying weights only (a Lightning checkpoint of a run with EMA holds the EMA
                        weights as its state_dict: those), no optimiser state; for Stable Diffusion only the
                        fine-tuned UNet, the frozen VAE and text encoder coming from the local weights_dir named
                        in the config
    config.yaml         the model's class and every option it was built with (network, classes, image size and
                        channels, wavelet, schedule, classification settings), what its input is, and the SHA-256
                        digest of the weights (decisions/binding.py), which catches a changed or swapped file
    calibration.json    the run's calibration, bound to the same digest
    README.md           the model card (tools/export.py writes it; its `classes` must be the config's)

tools/export.py writes the folder; `ClassifierModule.from_pretrained(folder)`, `python cli.py test/predict
--ckpt_path FOLDER` and `python -m tools.classify FOLDER images/` read it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning import LightningModule
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decisions.binding import short, weights_digest
from experiment.user_errors import yaml_error_place

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
REQUIRED = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
FORMAT = 1  # config.yaml's `format`: raised when the folder's layout changes


class PretrainedFolderError(ValueError):
    """An exported folder that cannot be loaded as it is; the message names the file and what is wrong."""


def is_pretrained_folder(path) -> bool:
    """A folder written by tools/export.py (judged by its config.yaml; missing files are reported on loading)."""
    return path is not None and Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def exported_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: the state_dict, less the frozen parts a model names instead (`frozen_parts`)."""
    frozen = tuple(f"{name}." for name in getattr(model, "frozen_parts", ()))
    return {
        name: tensor.detach().cpu().clone().contiguous()  # clone: safetensors refuses tensors that share memory
        for name, tensor in model.state_dict().items()
        if not name.startswith(frozen)
    }


def save_pretrained(model: torch.nn.Module, folder: Path, config: dict) -> str:
    """Writes model.safetensors and config.yaml (`config`, the weights' digest, the format); returns the digest."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = weights_digest(model)
    save_file(exported_state(model), folder / WEIGHTS_FILE, metadata={"weights": digest})
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; a model to pass on is readable like its config
    config = {"format": FORMAT, "weights": digest} | config
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return digest


def read_config(folder: Path) -> dict:
    """config.yaml of an exported folder, after checking every file is there and the card names the same classes."""
    folder = Path(folder)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PretrainedFolderError(
            f"{folder} is not a complete exported model: {', '.join(missing)} missing (export it again with "
            "python -m tools.export RUN_OR_CKPT OUT/)"
        )
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except yaml.YAMLError as error:
        where = f" ({yaml_error_place(error)})" if yaml_error_place(error) else ""
        raise PretrainedFolderError(
            f"{folder / CONFIG_FILE} is not valid YAML{where}: export the model again"
        ) from None
    if not isinstance(config, dict) or "model" not in config or "weights" not in config:
        raise PretrainedFolderError(f"{folder / CONFIG_FILE} has no `model` and `weights` entries: not an export")
    card = card_header(folder / CARD_FILE)
    classes = config["model"]["init_args"].get("class_names")
    if card.get("classes") != classes:
        raise PretrainedFolderError(
            f"{folder / CARD_FILE} names the classes {card.get('classes')}, {folder / CONFIG_FILE} {classes}: the card "
            "does not describe this model"
        )
    return config


def card_header(path: Path) -> dict:
    """The YAML header of a model card (between the first two `---` lines); empty when it has none."""
    text = path.read_text()
    if not text.startswith("---"):
        return {}
    header = text.split("---", 2)[1]
    return yaml.safe_load(header) or {}


def build_model(config: dict) -> LightningModule:
    """The model of config.yaml's `model` section (class_path and init_args), with untrained weights."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model")
    parsed = parser.parse_object({"model": config["model"]})
    return parser.instantiate_classes(parsed).model


def load_weights(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """model.safetensors into `model`, refusing a file that does not fit it or whose weights are not the digest's."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise PretrainedFolderError(f"{path} is not a safetensors file ({error})") from None
    expected = exported_state(model)
    problems = [f"{name}: missing" for name in expected if name not in state]
    problems += [f"{name}: not in this model" for name in state if name not in expected]
    problems += [
        f"{name}: {list(state[name].shape)} in the file, {list(tensor.shape)} here"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if problems:
        raise PretrainedFolderError(
            f"{path} does not fit the model of {Path(folder) / CONFIG_FILE}: {len(problems)} tensors differ, e.g. "
            + "; ".join(problems[:3])
        )
    model.load_state_dict(state, strict=False)  # the frozen parts, if any, are the model's own (checked below)
    digest = weights_digest(model)
    if digest != config["weights"]:
        raise PretrainedFolderError(
            f"{path} holds other weights than {Path(folder) / CONFIG_FILE} was exported with (digest {short(digest)}, "
            f"recorded {short(config['weights'])}): the file was changed or swapped, or the frozen parts a model "
            "loads from its weights_dir differ; export it again"
        )


def load_pretrained(folder) -> LightningModule:
    """The classifier of an exported folder, its weights checked against the digest; it knows its folder, so its
    calibration.json is found there."""
    folder = Path(folder)
    config = read_config(folder)
    model = build_model(config)
    load_weights(model, folder, config)
    model.pretrained_folder = folder
    return model


def load_exported(model: LightningModule, folder) -> None:
    """`--ckpt_path FOLDER`: the folder's weights into the model the CLI built from its config (nothing unpickled),
    after checking that the data's classes and image size are the exported model's; its calibration then applies."""
    config = read_config(Path(folder))
    exported = config["model"]["init_args"]
    for key in ("class_names", "image_size", "image_channels"):
        if key in exported and key in model.hparams and exported[key] != model.hparams[key]:
            raise PretrainedFolderError(
                f"{folder} was exported with {key}={exported[key]!r}, this config has {model.hparams[key]!r} "
                "(linked from the data): use the exported config.yaml's classes and image size"
            )
    load_weights(model, Path(folder), config)
    model.pretrained_folder = Path(folder)
