"""Reading checkpoints and weight files without running code from them.

A checkpoint is what users pass around (a paper's weights on a shared drive). `torch.load` with
weights_only=False unpickles arbitrary objects, so a crafted file would run its code the moment it
is named on the command line. Everything the suite saves (tensors, numbers, strings, lists, dicts,
the random states as tuples) loads with weights_only=True; a file that needs more is refused,
named, before anything else reads it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


class UnreadableWeightsError(ValueError):
    """A checkpoint or weight file that is missing, not a PyTorch file, or unsafe; the message names it."""


def load_weights_file(path: str | Path, mmap: bool = True) -> dict:
    """torch.load(weights_only=True) of a checkpoint or weights file, refusing unsafe or foreign files by name.
    mmap: map the tensors instead of reading them (the metadata of a 12 GB checkpoint costs nothing)."""
    path = Path(path)
    if path.is_dir():
        hint = (
            "it holds no config.yaml, so it is no export either (tools.export writes one)"
            if not (path / "config.yaml").is_file()
            else "an exported model is read from its folder by cli.py and tools.classify"
        )
        checkpoints = sorted(path.glob("checkpoints/*.ckpt")) or sorted(path.glob("*.ckpt"))
        found = f"; it holds {checkpoints[-1]}" if checkpoints else ""
        raise UnreadableWeightsError(f"{path} is a folder, not a checkpoint file: {hint}{found}")
    if not path.is_file():
        raise UnreadableWeightsError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap and zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL " in str(error):  # the weights-only unpickler met a class or function it does not allow
            culprit = str(error).split("GLOBAL ", 1)[-1].split(" ", 1)[0]
            raise UnreadableWeightsError(
                f"refused to load {path}: it needs arbitrary unpickling ({culprit} is not a tensor, number or "
                "container), which could run code from the file. Only load files whose origin you trust, after "
                "converting them to plain weights"
            ) from None
        raise UnreadableWeightsError(
            f"{path} is not a PyTorch checkpoint (no torch.save file: its unpickling stopped at an unknown instruction)"
        ) from None
    except Exception as error:  # any failure to read a foreign file (torch raises KeyError, RuntimeError, EOFError...)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UnreadableWeightsError(
            f"{path} is not a PyTorch checkpoint (torch.load: {type(error).__name__} {detail})".rstrip()
        ) from None
