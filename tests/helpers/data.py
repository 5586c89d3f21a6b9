"""Test data: the real PneumoniaMNIST file in ../shared, a four-class synthetic set, DICOM and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch.utils.data import Dataset

from datamodules import SyntheticDataModule
from tests.helpers import ROOT

PNEUMONIAMNIST = ROOT.parent / "shared/data/pneumoniamnist/pneumoniamnist.npz"
needs_pneumoniamnist = pytest.mark.skipif(
    not PNEUMONIAMNIST.is_file(), reason=f"the real PneumoniaMNIST subset is not at {PNEUMONIAMNIST} (../shared/data)"
)


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


def write_pngs(folder: Path, kind: str, count: int, size: int = 32) -> list[str]:
    """`count` synthetic test images of `kind` ("chest" or "skin") as PNG files, their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    split = SyntheticDataModule(kind=kind, image_size=size, num_train=0, num_val=0, num_test=count).split("test")
    paths = []
    for i in range(count):
        pixels = ((split[i]["image"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        paths.append(str(folder / f"{kind}_{i:02d}.png"))
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1])
    return paths
