"""Test data: the real PneumoniaMNIST file in ../shared, a four-class synthetic set, DICOM and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
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


def awkward_folder(root: Path) -> dict[str, str | None]:
    """A folder as a new user's might be: each file name -> the reason it is skipped (None: classified).
    Readable images in odd modes (16-bit, CMYK, palette), files that are no image or cannot be read,
    a DICOM without pixels and one with two frames, a broken link, a symlinked subfolder and a copy."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    grey = lambda: rng.integers(0, 255, (24, 24), dtype=np.uint8)  # noqa: E731
    Image.fromarray(grey()).save(root / "plain.png")
    Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)).save(root / "sixteen_bit.png")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(grey()).convert("P").save(root / "palette.png")
    Image.fromarray(grey()).save(root / "photo.webp")
    (root / "zero_bytes.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "full.png").unlink()
    (root / "text.jpg").write_text("this is a note, saved with the wrong suffix\n")
    (root / "scan.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    write_dicom(root / "report.dcm")
    no_pixels = pydicom.dcmread(root / "report.dcm")
    del no_pixels.PixelData
    no_pixels.Modality = "SR"
    no_pixels.save_as(root / "report.dcm")
    two_frames = write_dicom(root / "cine.dcm", np.concatenate([STORED, STORED]))
    frames = pydicom.dcmread(two_frames)
    frames.NumberOfFrames, frames.Rows = 2, STORED.shape[0]
    frames.save_as(two_frames)
    (root / "gone.png").symlink_to(root / "nowhere.png")
    linked = root.parent / f"{root.name}_elsewhere"
    linked.mkdir()
    for i in range(3):
        Image.fromarray(grey()).save(linked / f"linked_{i}.png")
    (root / "linked").symlink_to(linked, target_is_directory=True)
    (linked / "loop").symlink_to(root, target_is_directory=True)  # back to where the walk started
    (root / "plain_copy.png").write_bytes((root / "plain.png").read_bytes())
    return {
        "plain.png": None, "sixteen_bit.png": None, "cmyk.jpg": None, "palette.png": None, "photo.webp": None,
        "linked_0.png": None, "linked_1.png": None, "linked_2.png": None,
        "zero_bytes.png": "empty file", "truncated.png": "unreadable", "text.jpg": "not an image",
        "scan.heic": "unsupported type", "report.dcm": "no pixel data", "cine.dcm": "multi-frame",
        "gone.png": "broken link", "plain_copy.png": "duplicate", "loop": "folder already read",
    }  # fmt: skip
