"""New images to classify with a trained model: every image file of a folder, or every row of a CSV.

Nothing is split, balanced or dropped: `predict` (and `test`, when labels are given) reads every
image once, in a fixed order (sorted paths), and an image's id is its place in that order. The
classes and the input size are the trained model's (tools/classify.py reads them from the
checkpoint), so a folder of new X-rays needs no table at all:

    python -m tools.classify runs/demo/checkpoints/last.ckpt path/to/new/images

Folders are searched recursively for PNG, JPEG, TIFF, BMP and DICOM files (DICOM also without a
suffix, by its marker). A CSV needs a `path` column (relative to its own folder, or `root`, or
absolute); a `label` column (class names) is optional and used for metrics, never required; a
`mask` column (segmentations of the finding, paths like `path`, empty for none) is optional and
scores the explanations (`--explain`) against them.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from datamodules.decoding import DecodedImages, ImageDataset, MaskFiles, warn_small_images
from datamodules.dicom import DICOM_SUFFIXES, is_dicom
from datamodules.errors import DataError
from datamodules.loaders import SplitLoaders, check_image_size
from datamodules.tables import check_mask_files, mask_paths, read_csv

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)
SKIPPED_SUFFIXES = (".csv", ".txt", ".json", ".yaml", ".md", ".npz", ".npy", ".ckpt")


class ImagesDataModule(SplitLoaders, L.LightningDataModule):
    """Every image of a folder (recursive) or of a CSV, for `predict`, or `test` when labelled.

    Args:
        source: a folder of images, or a CSV file with a `path` column (and optionally `label`).
        class_names: the trained model's classes, in its order (tools/classify.py takes them from the
            checkpoint); labels of a CSV must be among them.
        image_size: the trained model's input side (from the checkpoint too); every image is resized to it.
        root: folder the CSV's relative paths start from; default: the CSV's own folder.
        crop: centre-crop to a square before resizing instead of squeezing the whole image.
        batch_size: images per batch, per process; None: from the CLI's global_batch_size.
        num_workers: loader worker processes (decoding).
    """

    def __init__(self, source: str, class_names: list[str], image_size: int, root: str | None = None,
                 crop: bool = False, batch_size: int | None = None, num_workers: int = 0):  # fmt: skip
        super().__init__()
        check_image_size(image_size)
        self.source, self.class_names, self.image_size = Path(source), list(class_names), image_size
        self.root = None if root is None else Path(root)
        self.crop, self.batch_size, self.num_workers = crop, batch_size, num_workers
        if len(self.class_names) < 2:
            raise DataError(f"data.init_args.class_names={self.class_names}: a classifier has at least two classes")
        self.masks: np.ndarray | None = None  # full mask paths, from a CSV's optional `mask` column
        self.paths, self.labels = self.read_source()
        self.dataset: ImageDataset | None = None

    def read_source(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Image paths (sorted) and class indices (None without labels), checked now, before any model loads."""
        if self.source.is_dir():
            paths, labels = image_files(self.source), None
        elif self.source.is_file():
            paths, labels = self.paths_and_labels(read_csv(self.source, ["path"], "image list"))
        else:
            raise DataError(f"data.init_args.source: {self.source} is neither a folder nor a CSV file")
        if len(paths) == 0:
            raise DataError(f"no image files in {self.source} (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM files)")
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image files listed in {self.source} are missing, e.g. {missing[0]}")
        return np.array(paths, dtype=str), labels

    def paths_and_labels(self, table: pd.DataFrame) -> tuple[list[str], np.ndarray | None]:
        base = self.root or self.source.parent
        rows = table.assign(path=[str(base / path) for path in table["path"]]).sort_values("path", kind="stable")
        self.masks = mask_paths(rows, base)
        check_mask_files(self.masks, self.source)
        if "label" not in rows.columns:
            return rows["path"].tolist(), None
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = ~rows["label"].isin(index)
        if unknown.any():
            row = rows[unknown].iloc[0]
            raise DataError(f"{self.source}: label {row['label']!r} of {row['path']} is not a class of the model "
                            f"{self.class_names}")  # fmt: skip
        return rows["path"].tolist(), rows["label"].map(index).to_numpy(np.int64)

    def setup(self, stage: str | None = None):
        if self.dataset is None:
            warn_small_images(self.paths, self.image_size, str(self.source))
            images = DecodedImages(self.paths, self.image_size, 3, self.crop)
            masks = None if self.masks is None else MaskFiles(self.masks, self.image_size, self.crop)
            self.dataset = ImageDataset(images, np.arange(len(self.paths)), self.labels, self.paths, masks)
            labelled = "labelled" if self.labels is not None else "without labels"
            print(f"{self.source}: {len(self.paths)} images, {labelled}, classes {self.class_names}", flush=True)

    def split_dataset(self, split: str) -> Dataset:
        if split == "test" and self.labels is None:
            raise DataError(f"{self.source} has no labels: `test` needs a CSV with a label column; use `predict`")
        if split in ("train", "val"):
            raise DataError(f"{type(self).__name__} holds new images for predict (or test): nothing to {split} on")
        return self.dataset

    def predict_dataloader(self):
        return self._loader("predict")


def image_files(folder: Path) -> list[str]:
    """Every image file under `folder`, sorted: by suffix, or DICOM by its marker when it has no suffix."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or (suffix not in SKIPPED_SUFFIXES and is_dicom(path)):
            found.append(str(path))
    return found
