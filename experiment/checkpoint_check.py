"""Refuse a checkpoint that does not fit the model of the current config, before any weight is loaded.

Without this, a checkpoint of another model class, another number of classes or another image
size fails deep inside `load_state_dict` with a list of tensor-size mismatches, or, worse, loads:
a 2-class chest model into a 2-class skin config, or a 32-pixel model into a 64-pixel one whose
weights have the same shapes. cli.py calls `check_checkpoint` before fit (`--ckpt_path`),
validate, test and predict, on the file Lightning is about to load.

What is compared:
  * the model class saved by LightningCLI (`hyper_parameters["_class_path"]`): the same class, a
    subclass or a parent class passes;
  * the hyperparameters that fix the task and the input (`CHECKED_HPARAMS`): number and names of
    classes, image size and channels (linked from the data), and the options that shape the
    network input (wavelet) or choose it (backbone);
  * the state_dict: the same parameter names and shapes (this catches other network options).

The checkpoint is opened with `mmap=True`: only its metadata is read, not gigabytes of weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lightning.pytorch.callbacks import WeightAveraging

from decisions.binding import plain
from networks.weights import load_weights_file

# hyperparameter -> where it comes from in a config (for the message)
CHECKED_HPARAMS = {
    "num_classes": "linked from the data",
    "class_names": "linked from the data",
    "image_size": "linked from data.init_args.image_size",
    "image_channels": "linked from the data",
    "wavelet": "model.init_args.wavelet",
    "backbone": "model.init_args.backbone",
}
SHAPE_EXAMPLES = 3  # mismatching tensors named in the message


class IncompatibleCheckpoint(ValueError):
    """The checkpoint was trained for another model, task or input; the message says which option differs."""


def check_checkpoint(path: str | Path, model, datamodule=None, checkpoint: dict | None = None) -> dict:
    """Raise IncompatibleCheckpoint when the checkpoint at `path` does not fit `model`; returns the checkpoint
    (read here, memory-mapped, unless the caller has read it already: `checkpoint`)."""
    checkpoint = load_weights_file(path) if checkpoint is None else checkpoint
    saved = checkpoint.get("hyper_parameters") or {}
    _check_class(path, saved.get("_class_path"), type(model))
    _check_hparams(path, saved, dict(model.hparams), datamodule)
    _check_shapes(path, checkpoint.get("state_dict") or {}, model)
    return checkpoint


def _check_class(path, saved_class_path: str | None, model_class: type) -> None:
    if not saved_class_path:
        return  # not saved by LightningCLI: the state_dict check below still applies
    saved_class = _import(saved_class_path)
    related = (
        (issubclass(model_class, saved_class) or issubclass(saved_class, model_class))
        if saved_class
        else (saved_class_path.rsplit(".", 1)[-1] in {cls.__name__ for cls in model_class.__mro__})
    )
    if not related:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} holds a {saved_class_path}, this config has model.class_path "
            f"{model_class.__module__}.{model_class.__qualname__}: "
            "use a checkpoint of this model, or the config it was trained with"
        )


def _check_hparams(path, saved: dict, current: dict, datamodule) -> None:
    for key, origin in CHECKED_HPARAMS.items():
        if key in saved and key in current and plain(saved[key]) != plain(current[key]):
            data = (
                f", data {type(datamodule).__name__}" if datamodule is not None and origin.startswith("linked") else ""
            )
            raise IncompatibleCheckpoint(
                f"checkpoint {path} was trained with {key}={plain(saved[key])!r}, this config has "
                f"{key}={plain(current[key])!r} (model.init_args.{key}, {origin}{data}): "
                "use the config the checkpoint was trained with, or a checkpoint of this one"
            )


def _check_shapes(path, saved_state: dict, model) -> None:
    current = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = {name: tuple(tensor.shape) for name, tensor in saved_state.items() if hasattr(tensor, "shape")}
    problems = [
        f"{name}: {list(saved[name])} in the checkpoint, {list(shape)} here"
        for name, shape in current.items()
        if name in saved and saved[name] != shape
    ]
    if getattr(model, "strict_loading", True):
        problems += [f"{name}: missing from the checkpoint" for name in current if name not in saved]
        problems += [f"{name}: in the checkpoint, not in this model" for name in saved if name not in current]
    if problems:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} does not fit this model: {len(problems)} tensors differ, e.g. "
            + "; ".join(problems[:SHAPE_EXAMPLES])
            + ". The network options (model.init_args.network / backbone) differ from those it was trained with"
        )


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_weight_averaging(path: str | Path, trainer) -> None:
    """Refuse to resume training across a change of weight averaging (EMA).

    A checkpoint written with Lightning's EMAWeightAveraging holds the averaged weights in its
    state_dict and the raw ones beside them: resumed without the callback, training would go on
    from the averaged weights; with the callback but from a checkpoint without one, the average
    would start again from scratch in the middle of a run. Both silently change the experiment."""
    checkpoint = load_weights_file(path)
    saved = "current_model_state" in checkpoint or any(
        key.split("{")[0].endswith("WeightAveraging") for key in checkpoint.get("callbacks", {})
    )
    configured = any(isinstance(callback, WeightAveraging) for callback in trainer.callbacks)
    if saved != configured:
        has = (
            "holds the EMA state of Lightning's EMAWeightAveraging" if saved else "was trained without weight averaging"
        )
        config = "lists no EMAWeightAveraging callback" if saved else "lists EMAWeightAveraging"
        raise IncompatibleCheckpoint(
            f"checkpoint {path} {has}, but this config {config} under trainer.callbacks: resume with the callbacks it "
            "was trained with (or start a new run from its weights: --model.init_args... and no --ckpt_path)"
        )
