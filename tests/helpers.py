"""What several test files share: the repository root, the real PneumoniaMNIST file, tiny CLI runs."""

from __future__ import annotations

import copy
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch.utils.data import Dataset

from datamodules import SyntheticDataModule

ROOT = Path(__file__).resolve().parents[1]
PNEUMONIAMNIST = ROOT.parent / "shared/data/pneumoniamnist/pneumoniamnist.npz"
needs_pneumoniamnist = pytest.mark.skipif(
    not PNEUMONIAMNIST.is_file(), reason=f"the real PneumoniaMNIST subset is not at {PNEUMONIAMNIST} (../shared/data)"
)

# The demo's UNet shrunk to seconds on a CPU: two levels, 16 and 32 channels.
TINY_UNET = [
    "--model.network.class_path=networks.ClassConditionalUNet",
    "--model.network.init_args.block_out_channels=[16, 32]",
    "--model.network.init_args.layers_per_block=1",
    "--model.network.init_args.cross_attention_resolution=8",
    "--model.network.init_args.cross_attention_dim=32",
    "--model.network.init_args.attention_heads=2",
    "--model.network.init_args.norm_num_groups=8",
]
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
]
NUM_TEST = 7  # does not divide by 2 processes
TEST_IDS = list(range(24 + 8, 24 + 8 + NUM_TEST))  # synthetic ids follow the 24 train and 8 val images
TINY_SYNTHETIC = [
    "--data.init_args.num_train=24",
    "--data.init_args.num_val=8",
    f"--data.init_args.num_test={NUM_TEST}",
    "--global_batch_size=4",
]
# validate every 3 steps on one batch, or (the default of tiny_args) not at all
WITH_VALIDATION = ["--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]
WITHOUT_VALIDATION = ["--trainer.limit_val_batches=0"]


class FourClasses(Dataset):
    """A synthetic split with four classes: the chest image's label, plus 2 for odd ids."""

    def __init__(self, split: Dataset):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        item = self.split[index]
        return item | {"label": item["label"] + 2 * (item["id"] % 2)}


class FourClassSynthetic(SyntheticDataModule):
    """The synthetic chest data as a 4-class problem, for class pruning (`--data=tests.helpers.FourClassSynthetic`)."""

    num_classes = property(lambda self: 4)
    class_names = property(lambda self: ["none", "effusion", "none_odd", "effusion_odd"])

    def split_dataset(self, split: str) -> Dataset:
        return FourClasses(super().split_dataset(split))


def tiny_args(root, *extra, validate: bool = False) -> list[str]:
    """The demo config shrunk to seconds: 16-pixel images, a 2-level UNet, N = 3 steps."""
    return [
        f"--config={ROOT / 'configs/demo.yaml'}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        *(WITH_VALIDATION if validate else WITHOUT_VALIDATION),
        "--data.init_args.image_size=16",
        *TINY_SYNTHETIC,
        "--model.init_args.val_steps=2",
        "--model.init_args.classification.num_steps=3",
        "--model.init_args.explanation.every_n_epochs=0",  # monitoring images: tested in test_explain.py
        *TINY_UNET,
        *extra,
    ]


def tiny_baseline_args(root, *extra) -> list[str]:
    """configs/baseline_demo.yaml shrunk to seconds: a ResNet-18 with MC dropout (T = 3) on 7 test images."""
    return [
        f"--config={ROOT / 'configs/baseline_demo.yaml'}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        *TINY_SYNTHETIC,
        "--model.init_args.mc_dropout_passes=3",
        *extra,
    ]


EXPERIMENTS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def resolved(name: str) -> dict:
    """configs/<name>.yaml as the CLI resolves it (includes and defaults): a fresh copy to change at will."""
    return copy.deepcopy(_resolved(name))


@functools.cache
def _resolved(name: str) -> dict:
    from tools.experiments import resolved_config

    return resolved_config(ROOT / "configs" / f"{name}.yaml")


def free_port() -> int:
    # other engineers' DDP tests run on this machine too: never the default 29500
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python cli.py ...` as a user runs it, in the repository root; DDP re-launches this command for rank 1."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def flip_rate_of(arrays) -> float:
    """explain.json's flip rate recomputed from the raw .npz records: counterfactuals classified as their target."""
    flips = [
        int(row[target] == target)
        for a in arrays
        for row, factual in zip(a["flip_prediction"], a["factual"])
        for target in range(len(row))
        if target != factual
    ]
    return sum(flips) / len(flips)


class LabelledLinear(torch.nn.Module):
    """A small untrained denoiser whose output depends on z, t and the label (classes 0, 1; null label 2)."""

    def __init__(self, channels=3):
        super().__init__()
        self.mix = torch.nn.Conv2d(channels, channels, 1)
        self.label_shift = torch.nn.Embedding(3, channels)
        torch.nn.init.normal_(self.label_shift.weight)

    def forward(self, z, t, labels):
        return self.mix(z) * (1 + t.view(-1, 1, 1, 1)) + self.label_shift(labels)[:, :, None, None]


def dit_parameter_count(num_classes, in_channels, patch, hidden, depth, mlp_ratio=4.0, freq=256):
    """DiT parameter count by hand, layer by layer (weights + biases)."""
    mlp = int(hidden * mlp_ratio)
    patch_embed = in_channels * patch * patch * hidden + hidden
    t_embed = (freq * hidden + hidden) + (hidden * hidden + hidden)
    label_table = (num_classes + 1) * hidden
    block = (
        (hidden * 3 * hidden + 3 * hidden)  # attention qkv
        + (hidden * hidden + hidden)  # attention proj
        + (hidden * mlp + mlp)
        + (mlp * hidden + hidden)  # MLP
        + (hidden * 6 * hidden + 6 * hidden)  # adaLN: shift/scale/gate x 2
    )
    patch_out = patch * patch * in_channels
    final = (hidden * 2 * hidden + 2 * hidden) + (hidden * patch_out + patch_out)  # adaLN + linear
    return patch_embed + t_embed + label_table + depth * block + final


# DICOM files for the readers' tests: 12-bit grey, values chosen to span the window arithmetic
STORED = np.array([[0, 100, 1000, 2000], [2047, 2500, 3000, 4095]], dtype=np.uint16)


def write_dicom(path, pixels=STORED, photometric="MONOCHROME2", window=None, rescale=(1.0, 0.0), syntax=None):
    """A single-frame 12-bit grayscale DICOM file; window = (center, width) or None."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    if syntax is not None:  # compressed: the bytes must be encapsulated (here, not a valid JPEG stream)
        dataset.PixelData = encapsulate([dataset.PixelData])
    dataset.save_as(str(path), enforce_file_format=True)
    return path
