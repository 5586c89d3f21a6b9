"""MedMNIST v2 (Yang et al. 2023): any 2D flag at 28/64/128/224 pixels, with its own splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from datamodules.decoding import ImageDataset
from datamodules.errors import DataError
from datamodules.loaders import SplitDataModule
from datamodules.table_reading import SPLITS, check_folds, fold_splits

SIZES = (28, 64, 128, 224)
TASKS = ("binary-class", "multi-class", "ordinal-regression")  # one label per image


class MedMNISTDataModule(SplitDataModule):
    """MedMNIST from `{root}/{flag}.npz` (size 28) or `{root}/{flag}_{size}.npz`, read with numpy.

    The splits are the file's own (`train_*`, `val_*`, `test_*` arrays): the package's dataset
    classes are not used because they assert the official split sizes and refuse a subset such
    as the balanced PneumoniaMNIST in `../shared/data/pneumoniamnist`. The package gives the class
    names (`INFO`) and, with `download=True`, fetches a missing official file.
    Sample ids are the row in train, val, test concatenated.

    With `num_folds` (k-fold cross-validation; MedMNIST has no patient ids, so images are folded one
    by one): the official train and val images are pooled, an image's fold is a hash of the seed and
    its id (its row in the pool), fold `fold` is the test split, validation is carved from the other
    folds (stratified by class, in the file's own val : train proportion) and the rest trains. The
    official test split is then not used at all. Across the k runs every pooled image is tested
    exactly once. Beware: images of one patient (MedMNIST keeps them in one official split) may
    then land in different folds.

    Args:
        root: folder of the npz files.
        flag: MedMNIST 2D data set name, e.g. "pneumoniamnist", "dermamnist", "bloodmnist".
        size: which published resolution to read (28, 64, 128 or 224).
        image_size: side the model sees; None = `size`, otherwise resized once in `setup`.
        batch_size: images per batch in every loader, per process; None (the default): from the
            CLI's global_batch_size, or DEFAULT_BATCH_SIZE.
        num_workers: loader worker processes.
        download: download the official file through the `medmnist` package when it is absent.
        seed: seed of the folds and of the validation carved from them (with num_folds); otherwise
            unused (the splits are the file's).
        num_folds: k of a k-fold cross-validation over the pooled official train + val images (see
            above); None (the default): the file's own train / val / test splits.
        fold: which fold is the test split, 0 <= fold < num_folds (only with num_folds).
    """

    def __init__(
        self,
        root: str,
        flag: str = "pneumoniamnist",
        size: int = 28,
        image_size: int | None = None,
        batch_size: int | None = None,
        num_workers: int = 2,
        download: bool = False,
        seed: int = 0,
        num_folds: int | None = None,
        fold: int = 0,
    ):
        from medmnist import INFO

        if flag not in INFO or flag.endswith("3d"):
            raise DataError(
                f"flag {flag!r} is not a 2D MedMNIST data set; choose from "
                f"{sorted(f for f in INFO if not f.endswith('3d'))}"
            )
        if INFO[flag]["task"] not in TASKS:
            raise DataError(f"flag {flag!r} is a {INFO[flag]['task']} task; only {TASKS} are supported")
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        check_folds(num_folds, fold)
        super().__init__(size if image_size is None else image_size, batch_size, num_workers)
        self.num_folds, self.fold = num_folds, fold
        self.root, self.flag, self.size, self.download, self.seed = Path(root), flag, size, download, seed
        self.name = flag
        self.info = INFO[flag]
        self.class_names = [self.info["label"][k] for k in sorted(self.info["label"], key=int)]
        if not download and not self.root.is_dir():
            raise DataError(f"data.init_args.root: {root!r} is not a directory (expected {self.file.name} in it)")

    @property
    def file(self) -> Path:
        return self.root / (f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz")

    def prepare_data(self):
        if self.download and not self.file.is_file():
            import medmnist

            self.root.mkdir(parents=True, exist_ok=True)
            getattr(medmnist, self.info["python_class"])(
                split="train", root=str(self.root), size=self.size, download=True
            )

    def setup(self, stage: str | None = None):
        if self.datasets:
            return
        if not self.file.is_file():
            raise DataError(f"MedMNIST file not found: {self.file} (set download: true to fetch the official one)")
        with np.load(self.file) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
            if missing:
                raise DataError(f"{self.file} lacks array(s) {missing}; found: {npz.files}")
            images = [npz[f"{s}_images"] for s in SPLITS]
            labels = [npz[f"{s}_labels"].reshape(len(npz[f"{s}_labels"]), -1)[:, 0].astype(np.int64) for s in SPLITS]
        for i, split in enumerate(SPLITS):
            bad = (labels[i] < 0) | (labels[i] >= self.num_classes)
            if bad.any():
                raise DataError(f"{self.file}: {split} label {labels[i][bad][0]} is not a class of {self.class_names}")
        if self.num_folds:  # ids = rows of train and val pooled (the same as without folds); test unused
            splits = self._fold_splits(labels)
            images, labels = images[:2], np.concatenate(labels[:2])
        pixels = np.concatenate(images)
        pixels = pixels[..., None] if pixels.ndim == 3 else pixels  # (N, H, W, C), C = 1 or 3
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # channels first, as ImageDataset reads them
        if self.image_size != pixels.shape[-1]:  # once, here, not per item
            pixels = TF.resize(pixels, [self.image_size] * 2, antialias=True)
        pixels = pixels.contiguous().numpy()
        offsets = np.cumsum([0] + [len(x) for x in images])
        for i, split in enumerate(SPLITS):
            if self.num_folds:
                ids = np.flatnonzero(splits == split)
                self.datasets[split] = ImageDataset(pixels, ids, labels[ids])
            else:
                self.datasets[split] = ImageDataset(pixels, np.arange(offsets[i], offsets[i + 1]), labels[i])
        self.report()

    def _fold_splits(self, labels: list[np.ndarray]) -> np.ndarray:
        """Split names of the pooled train + val images for fold `fold`: each image its own group."""
        pooled = np.concatenate(labels[:2])
        val_fraction = len(labels[1]) / len(pooled)
        if not 0 < val_fraction < 1:
            raise DataError(
                f"{self.file}: num_folds pools the train and val images and carves validation in their "
                f"proportion, but found {len(labels[0])} train and {len(labels[1])} val images"
            )
        ids = np.arange(len(pooled))
        return fold_splits(pooled, ids, self.num_folds, self.fold, val_fraction, self.seed, unit="images")[0]
