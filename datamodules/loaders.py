"""The loaders and the properties linked into the model, shared by every datamodule, and the base of those
with three labelled splits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch_plan import DEFAULT_BATCH_SIZE
from datamodules.decoding import ImageDataset
from datamodules.errors import DataError
from datamodules.table_reading import SPLITS


def check_image_size(image_size):
    if not isinstance(image_size, int) or image_size < 8 or image_size % 2:
        raise ValueError(f"image_size must be an even integer >= 8 (the Haar wavelet halves it), got {image_size!r}")


def check_root(root) -> Path:
    if root is None or not Path(root).is_dir():
        raise DataError(
            f"data.init_args.root: {root!r} is not a directory; set it to the data set's folder, "
            f"e.g. --data.init_args.root=/data/CheXpert-v1.0-small"
        )
    return Path(root)


class SplitLoaders:
    """What every datamodule of the suite shares: the four dataloader hooks over its
    `split_dataset(split)` (the training split shuffled, its last partial batch dropped; validation
    and test in order; predict reads the test split) and the properties cli.py links into the model
    besides `class_names` and `image_size`. Needs `batch_size`, `num_workers` and `class_names`."""

    batch_size: int | None
    num_workers: int
    class_names: list[str]

    num_classes = property(lambda self: len(self.class_names))
    image_channels = property(lambda self: 3)  # grey images are repeated to 3 channels (ImageDataset)

    def split_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset, batch_size = self.split_dataset(split), self.batch_size or DEFAULT_BATCH_SIZE
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")


class SplitDataModule(SplitLoaders, L.LightningDataModule):
    """Three labelled splits of ImageDatasets (`self.datasets`), their loaders, and the count report
    (TableDataModule, MedMNISTDataModule)."""

    name = "data"

    def __init__(self, image_size: int, batch_size: int | None, num_workers: int):
        super().__init__()
        check_image_size(image_size)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.datasets: dict[str, ImageDataset] = {}

    def report(self, dropped: dict[str, int] | None = None) -> dict[str, int]:
        """Print (and log, if a logger is attached) the images per split and class."""
        counts = {
            f"data/{split}/{name}": int((self.datasets[split].labels == c).sum())
            for split in SPLITS
            for c, name in enumerate(self.class_names)
        }
        lines = [f"{self.name}: images per split and class"]
        lines += [
            f"  {split:5s} "
            + "  ".join(f"{name}={counts[f'data/{split}/{name}']}" for name in self.class_names)
            + f"  total={len(self.datasets[split])}"
            for split in SPLITS
        ]
        lines += [f"  dropped {n} rows: {reason}" for reason, n in (dropped or {}).items() if n]
        if self.trainer is None or self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)
        logger = getattr(self.trainer, "logger", None) if self.trainer is not None else None
        if logger is not None:
            logger.log_metrics({key: float(n) for key, n in counts.items()}, step=0)
        return counts

    def split_dataset(self, split: str) -> Dataset:
        return self.datasets[split]
