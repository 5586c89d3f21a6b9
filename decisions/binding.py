"""What a calibration is bound to: the weights that classified and the settings its thresholds depend on.

A referral threshold, conformal thresholds and refusal p-values are numbers about one model's
outputs. Applied to other weights, or to the same weights classifying with another N, they are
numbers about something else, and their guarantees are void. So calibration.json records

  weights   a SHA-256 digest of the tensors that classify (the module's state_dict after the
            checkpoint is loaded, which holds the EMA weights where the run kept them: Lightning's
            EMAWeightAveraging saves the average as the state_dict), names, dtypes and shapes included;
  settings  the options that change a per-image output (a diffusion classifier's N, t range, error
            space, rule, early exit, seed...; a baseline's flips and dropout passes), without the
            speed-only ones that give identical results (max_forward_batch).

and test and predict apply it only when both match, whatever path the checkpoint was named by:
a relative or absolute path, a symlink, a moved or copied run folder all hold the same tensors.
"""

from __future__ import annotations

import hashlib

import torch

DIGEST_PREFIX = "sha256:"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the module's state_dict, in name order, with its name, dtype and shape."""
    return state_digest(module.state_dict())


def state_digest(state: dict) -> str:
    """weights_digest of a state_dict (e.g. a module's after a checkpoint's state_dict is loaded into it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return DIGEST_PREFIX + digest.hexdigest()


def plain(value):
    """Settings in the form JSON gives them back (tuples as lists), so a saved and a live value compare."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def binding_mismatch(calibration: dict, weights: str, settings: dict) -> str | None:
    """Why `calibration` does not belong to these weights and settings, in one clause; None when it does."""
    saved = calibration.get("weights")
    if not saved:
        return "it records no digest of the weights it calibrated (written by an older version of the suite)"
    if saved != weights:
        return f"the weights differ (calibrated {short(saved)}, these are {short(weights)})"
    saved_settings = calibration.get("classification", {})
    current = plain(settings)
    differing = [
        f"{key} {saved_settings.get(key)!r} there, {current.get(key)!r} here"
        for key in sorted(set(saved_settings) | set(current))
        if saved_settings.get(key) != current.get(key)
    ]
    if differing:
        return "the settings its thresholds depend on differ: " + "; ".join(differing)
    return None


def short(digest: str) -> str:
    return digest.removeprefix(DIGEST_PREFIX)[:12]
