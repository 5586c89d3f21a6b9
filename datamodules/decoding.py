"""Image files to the arrays a model reads: decoding (PNG, JPEG, TIFF, 16-bit, DICOM), squaring and
resizing, segmentation masks, the uint8 cache's rows, and the dataset whose items every datamodule gives:
`{image (3, H, W) float32 in [-1, 1], id[, label][, path][, mask]}`."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from datamodules.dicom import dicom_size, is_dicom, read_dicom
from datamodules.errors import DataError

HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@contextmanager
def reading(what: str, path):
    """Turns what PIL and the DICOM reader raise on a missing or corrupt file into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read {what} {path}: {error}") from None


def load_image(path: str | os.PathLike, size: int, channels: int, crop: bool = False) -> np.ndarray:
    """Decode one image file into a (channels, size, size) uint8 array.

    Any PIL mode is accepted: palette, alpha and CMYK go through PIL's own conversion; 16-bit and
    float images (DICOM-derived PNG/TIFF) are min-max scaled per image to 8 bits, since their
    useful range varies (12-bit detectors, windowing) and a fixed /256 would leave them dark.
    DICOM files are read with their own rescale and window (datamodules/dicom.py).
    `crop=False` squeezes the whole image into the square (keeps the costophrenic angles of a
    chest film); `crop=True` centre-crops to a square first, as MedMNIST does.
    """
    mode = "L" if channels == 1 else "RGB"
    with reading("image", path):
        if is_dicom(path):
            return _square(Image.fromarray(read_dicom(path)), mode, size, channels, crop)
        with Image.open(path) as image:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below `size`; a 3000 px
            # ISIC photograph then decodes several times faster, with no visible difference.
            image.draft(mode, (size, size))
            if image.mode in HIGH_BIT_DEPTH_MODES:
                pixels = np.asarray(image, dtype=np.float32)
                low, high = float(pixels.min()), float(pixels.max())
                pixels = (pixels - low) * (255.0 / max(high - low, 1e-12))
                image = Image.fromarray(pixels.round().astype(np.uint8))
            return _square(image, mode, size, channels, crop)


def _square(image: Image.Image, mode: str, size: int, channels: int, crop: bool,
            resample=Image.Resampling.BICUBIC) -> np.ndarray:  # fmt: skip
    image = image.convert(mode)
    if crop:
        image = ImageOps.fit(image, (size, size), resample)
    else:
        image = image.resize((size, size), resample)
    # channels first, as the model wants them: reading then needs no transposing copy
    return np.asarray(image).reshape(size, size, channels).transpose(2, 0, 1).copy()


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with reading("image", path):
        if is_dicom(path):
            return dicom_size(path)
        with Image.open(path) as image:
            return image.size


def warn_small_images(paths, image_size: int, name: str) -> int:
    """Count the images whose shorter side is below a quarter of `image_size` (they are stretched
    beyond recognition into the model's input) and say so; returns the count."""
    small = [(path, size) for path in paths if min(size := image_size_of(path)) * 4 < image_size]
    if small:
        (path, (width, height)), more = small[0], f" and {len(small) - 1} more" if len(small) > 1 else ""
        warnings.warn(
            f"{name}: {len(small)} image(s) are far smaller than image_size={image_size} and will be stretched "
            f"to it, e.g. {path} ({width}x{height}){more}: check that these are the images you meant",
            stacklevel=2,
        )
    return len(small)


class DecodedImages:
    """`images[i]`: decode file i now (the slow path: what the cache avoids after the first pass)."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, crop: bool = False):
        self.paths, self.size, self.channels, self.crop = paths, size, channels, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size, self.channels, self.crop)


def load_mask(path: str | os.PathLike, size: int, crop: bool = False) -> torch.Tensor:
    """A segmentation mask file as a (1, size, size) float tensor of 0 and 1 (any non-zero pixel is
    inside), squeezed or cropped exactly as its image is; nearest-neighbour, so it stays binary."""
    with reading("mask", path), Image.open(path) as image:
        pixels = _square(image, "L", size, 1, crop, Image.Resampling.NEAREST)
    return torch.from_numpy(pixels > 0).float()


class MaskFiles:
    """`masks[i]`: the mask of image i, read now; an empty path means no finding (all zeros).
    Masks score explanations only (validation and test), so they are never cached or trained on."""

    def __init__(self, paths: np.ndarray, size: int, crop: bool = False):
        self.paths, self.size, self.crop = np.asarray(paths, dtype=str), size, crop

    def __getitem__(self, i):
        path = self.paths[i]
        return load_mask(path, self.size, self.crop) if path else torch.zeros(1, self.size, self.size)


class CachedImages:
    """`images[i]`: row i of the uint8 cache, opened lazily in each worker process.

    Not opened in `__init__`: a memmap handle must not be pickled into spawned workers (it would
    be copied as a full array); each process maps the file itself and the OS shares the pages.
    """

    def __init__(self, file: str | os.PathLike):
        self.file, self._array = str(file), None

    def __getstate__(self):
        return {"file": self.file, "_array": None}

    def __getitem__(self, i):
        if self._array is None:
            self._array = np.load(self.file, mmap_mode="c")  # copy-on-write: writable for torch, file untouched
        return self._array[i]


class ImageDataset(Dataset):
    """Items `{image, id[, label][, path][, mask]}`; the image of item i is `images[ids[i]]`, uint8
    (C, H, W) with C = 1 (repeated to 3 here) or 3. Without labels (new images to classify) items have
    none; with `masks` (a data set's optional `mask` column) item i has the (1, H, W) mask `masks[i]`.

    Labels, ids and paths are numpy arrays (a fixed-width string array for paths), not Python
    lists: worker processes touching list items bump their refcounts, which copies the pages of
    a forked parent's memory one by one until every worker holds its own copy.
    """

    def __init__(self, images, ids: np.ndarray, labels: np.ndarray | None, paths: np.ndarray | None = None,
                 masks: MaskFiles | None = None):  # fmt: skip
        self.images, self.ids = images, np.asarray(ids, np.int64)
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        self.paths = None if paths is None else np.asarray(paths, dtype=str)
        self.masks = masks  # item i's mask is masks[i]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        pixels = torch.from_numpy(np.asarray(self.images[self.ids[i]]))
        # one copy: out of the memmap, to float, grayscale repeated (a stride-0 expand made dense)
        image = pixels.expand(3, -1, -1).to(torch.float32, memory_format=torch.contiguous_format)
        image = image.div_(127.5).sub_(1)
        item = {"image": image, "id": torch.tensor(self.ids[i])}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i])
        if self.paths is not None:
            item["path"] = str(self.paths[i])
        if self.masks is not None:
            item["mask"] = self.masks[i]
        return item
