"""The loaders and the properties linked into the model, shared by every datamodule, and the base of those
with three labelled splits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


VALIDATION_ORDER_SEED = 0


def stratified_order(labels, seed: int = VALIDATION_ORDER_SEED) -> list[int]:
    """The indices of a split in an order whose every prefix is a class-stratified sample: each class's images
    shuffled (seeded), then interleaved by their rank within the class, (j + 1/2) / n_c. A prefix of any length holds
    each class's share to within one image, so a validation cut short by `limit_val_batches` sees the classes in
    their proportions (a table listed class by class would otherwise show it one class), the same images every time."""
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    keyed = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        keyed += [((j + 0.5) / len(members), c, int(i)) for j, i in enumerate(members)]
    return [index for _, _, index in sorted(keyed)]


class StratifiedOrder(Sampler):
    """A sampler that yields stratified_order(labels): a fixed, seeded, class-stratified order of a labelled split."""

    def __init__(self, labels, seed: int = VALIDATION_ORDER_SEED):
        self.order = stratified_order(labels, seed)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


class SplitLoaders:
    """What every datamodule of the suite shares: the four dataloader hooks over its
    `split_dataset(split)` (the training split shuffled, its last partial batch dropped; validation
    in a fixed class-stratified order, stratified_order; test in order; predict reads the test split)
    and the properties cli.py links into the model
    besides `class_names` and `image_size`. Needs `batch_size`, `num_workers` and `class_names`."""

    batch_size: int | None
    num_workers: int
    class_names: list[str]

    num_classes = property(lambda self: len(self.class_names))
    image_channels = property(lambda self: 3)  # grey images are repeated to 3 channels (ImageDataset)

    def split_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool = False, stratified: bool = False) -> DataLoader:
        dataset, batch_size = self.split_dataset(split), self.batch_size or DEFAULT_BATCH_SIZE
        labels = getattr(dataset, "labels", None)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=StratifiedOrder(labels) if stratified and labels is not None else None,
            drop_last=shuffle and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        # stratified: fit's validation may stop after limit_val_batches (the CPU configs: 2); the whole split's
        # metrics do not depend on the order
        return self._loader("val", stratified=True)

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
