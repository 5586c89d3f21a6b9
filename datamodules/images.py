"""New images to classify with a trained model: every image file of a folder, or every row of a CSV.

Nothing is split, balanced or dropped: `predict` (and `test`, when labels are given) reads every
image once, in a fixed order (sorted paths), and an image's id is its place in that order. The
classes and the input size are the trained model's (tools/classify.py reads them from the
checkpoint), so a folder of new X-rays needs no table at all:

    python -m tools.classify runs/demo/checkpoints/last.ckpt path/to/new/images

The source is a folder (searched recursively, symlinked folders followed once), an image file, a
list of image files and folders, or a CSV. datamodules/intake.py sorts every file found into the
images to classify and the files skipped with a named reason (skipped.csv beside predictions.csv),
before any model loads; `strict` refuses to go on when anything would be skipped. A CSV needs a
`path` column (relative to its own folder, or `root`, or absolute); a `label` column (class names)
is optional and used for metrics, never required; a
`mask` column (segmentations of the finding, paths like `path`, empty for none) is optional and
scores the explanations (`--explain`) against them.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import Dataset

from datamodules.decoding import DecodedImages, ImageDataset, MaskFiles, warn_small_images
from datamodules.errors import DataError
from datamodules.intake import Intake, check_intake, take_in
from datamodules.loaders import SplitLoaders, check_image_size
from datamodules.table_reading import check_mask_files, label_indices


class ImagesDataModule(SplitLoaders, L.LightningDataModule):
    """Every image of a folder (recursive) or of a CSV, for `predict`, or `test` when labelled.

    Args:
        source: a folder of images, an image file, a list of image files and folders, or a CSV file with a
            `path` column (and optionally `label` and `mask`); from Python also the `Intake` of one
            (datamodules.intake.take_in: tools.classify takes the files in once, before the model loads).
        class_names: the trained model's classes, in its order (tools/classify.py takes them from the
            checkpoint); labels of a CSV must be among them.
        image_size: the trained model's input side (from the checkpoint too); every image is resized to it.
        root: folder the CSV's relative paths start from; default: the CSV's own folder.
        crop: centre-crop to a square before resizing instead of squeezing the whole image.
        batch_size: images per batch, per process; None: from the CLI's global_batch_size.
        num_workers: loader worker processes (decoding).
        strict: stop before any model loads when a file would be skipped, naming every one; default:
            classify the readable images and list the others in skipped.csv.
        keep_duplicates: classify every listed file, also a second copy of a file already listed
            (same path or same bytes); default: the copy is skipped as "duplicate of <first>",
            so metrics count each image once.
    """

    def __init__(self, source: str | list[str], class_names: list[str], image_size: int, root: str | None = None,
                 crop: bool = False, batch_size: int | None = None, num_workers: int = 0, strict: bool = False,
                 keep_duplicates: bool = False):  # fmt: skip
        super().__init__()
        check_image_size(image_size)
        self.source, self.class_names, self.image_size = source, list(class_names), image_size
        self.crop, self.batch_size, self.num_workers = crop, batch_size, num_workers
        if len(self.class_names) < 2:
            raise DataError(f"data.init_args.class_names={self.class_names}: a classifier has at least two classes")
        if isinstance(source, str) and not Path(source).exists():
            raise DataError(f"data.init_args.source: {source} is neither a folder, an image nor a CSV file")
        if isinstance(source, Intake):
            self.intake = source  # taken in and checked by the caller
        else:  # checked now, before any model loads: every file a row or a reason
            self.intake = take_in(source, root, keep_duplicates)
            check_intake(self.intake, strict)
        self.paths = np.array(self.intake.paths, dtype=str)
        self.masks = None if self.intake.masks is None else np.array(self.intake.masks, dtype=str)
        check_mask_files(self.masks, self.intake.source)
        labels = self.intake.labels
        self.labels = (
            None if labels is None else label_indices(labels, self.class_names, self.intake.source, self.paths)
        )
        self.dataset: ImageDataset | None = None
        print(f"{self.intake.source}: {self.intake.summary()}", flush=True)

    def setup(self, stage: str | None = None):
        if self.dataset is None:
            warn_small_images(self.paths, self.image_size, self.intake.source)
            images = DecodedImages(self.paths, self.image_size, 3, self.crop)
            masks = None if self.masks is None else MaskFiles(self.masks, self.image_size, self.crop)
            self.dataset = ImageDataset(images, np.arange(len(self.paths)), self.labels, self.paths, masks)
            labelled = "labelled" if self.labels is not None else "without labels"
            print(f"{self.intake.source}: {len(self.paths)} images, {labelled}, classes {self.class_names}", flush=True)

    def split_dataset(self, split: str) -> Dataset:
        if split == "test" and self.labels is None:
            raise DataError(
                f"{self.intake.source} has no labels: `test` needs a CSV with a label column; use `predict`"
            )
        if split in ("train", "val"):
            raise DataError(f"{type(self).__name__} holds new images for predict (or test): nothing to {split} on")
        return self.dataset

    def predict_dataloader(self):
        return self._loader("predict")
