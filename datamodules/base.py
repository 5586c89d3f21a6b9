"""What every file-based datamodule shares: checks, balancing, patient-level splits, the cache, loaders.

A dataset subclass only reads its publisher's table into rows (`path` relative to `root`,
`label` class index, `patient` id or empty, optionally `split`) and says which rows it dropped
and why. `TableDataModule` then, before any training step:

1. checks that every class still has images, and reports what was dropped;
2. balances the classes by seeded undersampling (`balance`);
3. splits 80/10/10 by patient (no patient in two splits), stratified by class, or reuses the
   split written earlier to `splits.csv` (so a resumed or repeated run sees the same images);
   every image gets a stable `id` (its row in that file) that seeds its classification noise;
4. checks that every image file exists (`verify_images`: also decodes each one), and that every
   split holds every class;
5. decodes and resizes every image once into a uint8 memmap (`cache_dir`), so training epochs
   read arrays and never decode a JPEG again.

Each bad input raises `DataError` with a message naming the culprit (file, column, label, class,
split). Images reach the model as float32 (3, H, W) in [-1, 1], grayscale repeated to 3 channels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val", "test")
DEFAULT_BATCH_SIZE = 64  # per process, when neither data.init_args.batch_size nor global_batch_size is given
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DataError(ValueError):
    """Bad input data, found before training; the message names the culprit."""


# ----------------------------------------------------------------------------------------------
# Images


def load_image(path: str | os.PathLike, size: int, channels: int, crop: bool = False) -> np.ndarray:
    """Decode one image file into a (channels, size, size) uint8 array.

    Any PIL mode is accepted: palette, alpha and CMYK go through PIL's own conversion; 16-bit and
    float images (DICOM-derived PNG/TIFF) are min-max scaled per image to 8 bits, since their
    useful range varies (12-bit detectors, windowing) and a fixed /256 would leave them dark.
    `crop=False` squeezes the whole image into the square (keeps the costophrenic angles of a
    chest film); `crop=True` centre-crops to a square first, as MedMNIST does.
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as image:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below `size`; a 3000 px
            # ISIC photograph then decodes several times faster, with no visible difference.
            image.draft(mode, (size, size))
            if image.mode in HIGH_BIT_DEPTH_MODES:
                pixels = np.asarray(image, dtype=np.float32)
                low, high = float(pixels.min()), float(pixels.max())
                pixels = (pixels - low) * (255.0 / max(high - low, 1e-12))
                image = Image.fromarray(pixels.round().astype(np.uint8))
            image = image.convert(mode)
            if crop:
                image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
            else:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            # channels first, as the model wants them: reading then needs no transposing copy
            return np.asarray(image).reshape(size, size, channels).transpose(2, 0, 1).copy()
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on missing/corrupt files
        raise DataError(f"cannot read image {path}: {error}") from None


class DecodedImages:
    """`images[i]`: decode file i now (the slow path: what the cache avoids after the first pass)."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, crop: bool = False):
        self.paths, self.size, self.channels, self.crop = paths, size, channels, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size, self.channels, self.crop)


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
    """Items `{image, label, id[, path]}`; the image of item i is `images[ids[i]]`, uint8 (C, H, W)
    with C = 1 (repeated to 3 here) or 3.

    Labels, ids and paths are numpy arrays (a fixed-width string array for paths), not Python
    lists: worker processes touching list items bump their refcounts, which copies the pages of
    a forked parent's memory one by one until every worker holds its own copy.
    """

    def __init__(self, images, ids: np.ndarray, labels: np.ndarray, paths: np.ndarray | None = None):
        self.images, self.ids, self.labels = images, np.asarray(ids, np.int64), np.asarray(labels, np.int64)
        self.paths = None if paths is None else np.asarray(paths, dtype=str)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        pixels = torch.from_numpy(np.asarray(self.images[self.ids[i]]))
        # one copy: out of the memmap, to float, grayscale repeated (a stride-0 expand made dense)
        image = pixels.expand(3, -1, -1).to(torch.float32, memory_format=torch.contiguous_format)
        image = image.div_(127.5).sub_(1)
        item = {"image": image, "label": torch.tensor(self.labels[i]), "id": torch.tensor(self.ids[i])}
        if self.paths is not None:
            item["path"] = str(self.paths[i])
        return item


# ----------------------------------------------------------------------------------------------
# Tables: balancing and splitting


def balance_classes(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Undersample every class to the size of the smallest, seeded (rows kept in table order)."""
    rng = np.random.default_rng(seed)
    smallest = table["label"].value_counts().min()
    keep = [
        rng.choice(np.flatnonzero(table["label"].to_numpy() == c), smallest, replace=False)
        for c in sorted(table["label"].unique())
    ]
    return table.iloc[np.sort(np.concatenate(keep))]


def assign_splits(labels: np.ndarray, groups: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Split names per row: whole patients (groups) per split, stratified by class.

    Patients are shuffled (seeded) within the stratum of their most frequent label, then cut where
    the cumulative image count crosses 80 % and 90 %: a patient goes where the middle of its
    images falls. With one image per patient the counts are exact; otherwise off by at most one
    patient per class and boundary.
    """
    rows = pd.DataFrame({"label": labels, "group": groups})
    per_group = pd.crosstab(rows["group"], rows["label"])  # groups x classes, sorted by group
    sizes, strata = per_group.to_numpy().sum(1), per_group.to_numpy().argmax(1)
    order = np.random.default_rng(seed).permutation(len(per_group))
    cuts = np.cumsum(fractions)[:-1]
    group_split = np.empty(len(per_group), dtype=np.int64)
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        ends = np.cumsum(sizes[members])
        middles = (ends - sizes[members] / 2) / ends[-1]
        group_split[members] = np.searchsorted(cuts, middles, side="right")
    split_of = dict(zip(per_group.index, np.array(SPLITS)[group_split]))
    return rows["group"].map(split_of).to_numpy()


def read_csv(file: Path, required: list[str], what: str = "") -> pd.DataFrame:
    """A CSV as strings (no NaN guessing), with a clear error for a missing file or column."""
    if not file.is_file():
        raise DataError(f"{what or 'CSV'} file not found: {file}")
    table = pd.read_csv(file, dtype=str, keep_default_na=False, skipinitialspace=True)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{file} lacks column(s) {missing}; found: {list(table.columns)}")
    return table


def parse_flags(values: pd.Series, column: str, file, allowed=(1.0, 0.0, -1.0)) -> np.ndarray:
    """Numeric label column (`1.0`, `0`, `-1`, blank = NaN) checked against the allowed values."""
    numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce").to_numpy(np.float64)
    bad = ~np.isnan(numbers) & ~np.isin(numbers, allowed) | (values.ne("").to_numpy() & np.isnan(numbers))
    if bad.any():
        raise DataError(
            f"{file}: column {column!r} holds {values[bad].iloc[0]!r} (row {np.flatnonzero(bad)[0] + 2}); "
            f"expected one of {list(allowed)} or blank"
        )
    return numbers


def _digest(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).hexdigest()


# ----------------------------------------------------------------------------------------------
# Datamodules


def _check_image_size(image_size):
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
    """The four dataloader hooks of a datamodule, over its `split_dataset(split)`: the training
    split shuffled (its last partial batch dropped), validation and test in order; predict reads
    the test split. Needs `batch_size` and `num_workers` attributes."""

    batch_size: int | None
    num_workers: int

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


class ImageDataModule(SplitLoaders, L.LightningDataModule):
    """Loaders, the properties linked into the model, and the count report."""

    name = "data"

    def __init__(self, image_size: int, batch_size: int | None, num_workers: int):
        super().__init__()
        _check_image_size(image_size)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.datasets: dict[str, ImageDataset] = {}

    num_classes = property(lambda self: len(self.class_names))
    image_channels = property(lambda self: 3)

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


class TableDataModule(ImageDataModule):
    """Base of the file-based datamodules: a subclass implements `read_table` and sets
    `name`, `class_names` and `channels` (1 to cache grayscale sources at a third of the size).

    Args:
        root: folder of the data set as published.
        image_size: side of the square images the model sees (paper: 256).
        batch_size: images per batch in every loader, per process; None (the default): from the
            CLI's global_batch_size, or DEFAULT_BATCH_SIZE.
        num_workers: loader worker processes (also used to build the cache).
        seed: seed of the balancing and of the split.
        balance: undersample every class to the size of the smallest (seeded).
        split_fractions: train / val / test fractions (by images, whole patients per split).
        splits_file: CSV of the split (`path,label,class,patient,split,id`), written on first use
            and reused when present. None: `splits.csv` in `trainer.default_root_dir` (beside the
            run's checkpoints), or `runs/splits/<name>.csv` without a Trainer. Delete it to re-split.
        cache_dir: folder of the decoded-image cache (uint8 `.npy` memmaps named by data set,
            size and a hash of the root and file list); None decodes every image at every access.
        verify_images: decode every image up front (done anyway when the cache is built);
            otherwise only their existence is checked before training.
        crop: centre-crop to a square before resizing instead of squeezing the whole image.
    """

    class_names: list[str] = []
    channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        batch_size: int | None = None,
        num_workers: int = 8,
        seed: int = 0,
        balance: bool = True,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        splits_file: str | None = None,
        cache_dir: str | None = "runs/cache",
        verify_images: bool = False,
        crop: bool = False,
    ):
        super().__init__(image_size, batch_size, num_workers)
        self.root = check_root(root)
        if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to 1, got {split_fractions!r}")
        self.seed, self.balance, self.split_fractions = seed, balance, tuple(split_fractions)
        self.splits_file, self.cache_dir = splits_file, cache_dir
        self.verify_images, self.crop = verify_images, crop
        self.table: pd.DataFrame | None = None
        self.dropped: dict[str, int] = {}

    def read_table(self) -> tuple[pd.DataFrame, dict[str, int]]:
        """Rows `path` (relative to root, or absolute), `label` (class index), `patient` (str, ''
        when unknown) and optionally `split`; and the number of rows dropped per reason."""
        raise NotImplementedError

    # -- the pipeline ---------------------------------------------------------------------------

    def prepare_data(self):
        self.prepare()

    def setup(self, stage: str | None = None):
        if self.table is None:  # DDP ranks > 0 of a node: prepare_data ran elsewhere, files exist
            self.prepare()
        if not self.datasets:
            table, paths = self.table, self.full_paths(self.table)
            images = (
                CachedImages(self.cache_file)
                if self.cache_dir
                else DecodedImages(paths, self.image_size, self.channels, self.crop)
            )
            for split in SPLITS:
                rows = table.index[table["split"] == split].to_numpy()
                self.datasets[split] = ImageDataset(
                    images, table["id"].to_numpy()[rows], table["label"].to_numpy()[rows], paths[rows]
                )
            self.report(self.dropped)

    def prepare(self) -> pd.DataFrame:
        """Read, check, balance, split (or reuse the split), check files, build the cache."""
        table, self.dropped = self.read_table()
        table = table.sort_values("path", kind="stable").reset_index(drop=True)
        twice = table["path"].duplicated()
        if twice.any():  # one image twice could land in train and test
            raise DataError(
                f"{self.name}: image {table['path'][twice].iloc[0]} is listed {int(twice.sum()) + 1}+ times"
            )
        self._check_classes(table, "after filtering")
        file = self.splits_path()
        if file.is_file():
            table = self._reuse_splits(file, table)
        else:
            table = self._split(table)
            file.parent.mkdir(parents=True, exist_ok=True)
            table.assign(**{"class": np.array(self.class_names)[table["label"]]})[
                ["id", "path", "label", "class", "patient", "split"]
            ].to_csv(file, index=False)
        for split in SPLITS:
            self._check_classes(table[table["split"] == split], f"in split {split!r}")
        self.table = table
        self._check_files(table)
        if self.cache_dir:
            self._build_cache(table)
        return table

    def _split(self, table: pd.DataFrame) -> pd.DataFrame:
        has_split = "split" in table.columns
        if self.balance:
            before = len(table)
            groups = [table[table["split"] == s] for s in SPLITS] if has_split else [table]
            table = pd.concat([balance_classes(g, self.seed) for g in groups if len(g)])
            self.dropped["undersampled to balance the classes"] = before - len(table)
        if not has_split:
            groups = table["patient"].where(table["patient"] != "", "path:" + table["path"]).to_numpy()
            table = table.assign(
                split=assign_splits(table["label"].to_numpy(), groups, self.split_fractions, self.seed)
            )
        order = table["split"].map(SPLITS.index)
        table = table.assign(order=order).sort_values(["order", "path"], kind="stable").drop(columns="order")
        return table.reset_index(drop=True).assign(id=np.arange(len(table)))

    def _reuse_splits(self, file: Path, table: pd.DataFrame) -> pd.DataFrame:
        saved = read_csv(file, ["id", "path", "label", "patient", "split"], "splits")
        saved = saved.astype({"id": np.int64, "label": np.int64}).sort_values("id").reset_index(drop=True)
        if not np.array_equal(saved["id"], np.arange(len(saved))):  # ids index the cache rows
            raise DataError(f"splits file {file}: ids are not 0..{len(saved) - 1}; delete the file to split again")
        given = ["label", "split"] if "split" in table.columns else ["label"]
        now = saved.merge(table[["path", *given]], on="path", how="left", suffixes=("", "_now"))
        gone = now["label_now"].isna()
        changed = ~gone & (now[[f"{c}_now" for c in given]].to_numpy() != now[given].to_numpy()).any(1)
        for bad, what in [
            (gone, "are no longer in the data (missing or filtered out)"),
            (changed, "changed label or given split"),
        ]:
            if bad.any():
                raise DataError(
                    f"splits file {file}: {int(bad.sum())} images {what}, e.g. {now['path'][bad].iloc[0]}; "
                    f"delete the file to split again"
                )
        self.dropped["not in the reused split (balancing)"] = len(table) - len(saved)
        print(f"{self.name}: reusing the split in {file}", flush=True)
        return saved

    def _check_classes(self, table: pd.DataFrame, where: str):
        counts = np.bincount(table["label"].to_numpy(np.int64), minlength=len(self.class_names))
        for name, n in zip(self.class_names, counts):
            if n == 0:
                dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items() if n) or "none"
                raise DataError(
                    f"{self.name}: class {name!r} has no images {where} "
                    f"(counts {dict(zip(self.class_names, counts.tolist()))}; dropped rows: {dropped})"
                )

    def _check_files(self, table: pd.DataFrame):
        paths = pd.Series(self.full_paths(table))
        missing = paths[~paths.map(os.path.isfile)]
        if len(missing):
            raise DataError(
                f"{len(missing)} image files are missing, e.g. {missing.iloc[0]}"
                + (f" and {list(missing.iloc[1:4])}" if len(missing) > 1 else "")
            )
        if self.verify_images and not (self.cache_dir and self.cache_file.is_file()):
            for _ in self._decode_all(paths.to_numpy(str)):
                pass

    # -- the cache ------------------------------------------------------------------------------

    @property
    def cache_file(self) -> Path:
        key = _digest(str(self.root.resolve()), self.channels, self.crop, self.table["path"].tolist())
        return Path(self.cache_dir) / f"{self.name}-{self.image_size}px-{key}.npy"

    def _build_cache(self, table: pd.DataFrame):
        file, shape = self.cache_file, (len(table), self.channels, self.image_size, self.image_size)
        if file.is_file():
            found = np.load(file, mmap_mode="r").shape
            if found != shape:
                raise DataError(
                    f"cache {file} holds images of shape {found[1:]} x {found[0]}, this run needs "
                    f"{shape[1:]} x {shape[0]}: it was built for another size or data; delete it"
                )
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npy")  # never read half-built
        print(f"{self.name}: decoding {len(table)} images once into {file}", flush=True)
        try:
            cache = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            start = 0
            for batch in self._decode_all(self.full_paths(table)):
                cache[start : start + len(batch)] = batch
                start += len(batch)
            cache.flush()
            del cache
            os.replace(partial, file)
        finally:
            partial.unlink(missing_ok=True)

    def _decode_all(self, paths: np.ndarray):
        """Batches of decoded images in order, decoded by `num_workers` processes."""
        images = DecodedImages(paths, self.image_size, self.channels, self.crop)
        loader = DataLoader(images, batch_size=32, num_workers=self.num_workers, collate_fn=np.stack)
        return iter(loader)

    def full_paths(self, table: pd.DataFrame) -> np.ndarray:
        return np.array([os.path.join(self.root, p) for p in table["path"]], dtype=str)

    def splits_path(self) -> Path:
        if self.splits_file:
            return Path(self.splits_file)
        if self.trainer is not None:
            return Path(self.trainer.default_root_dir) / "splits.csv"
        return Path("runs/splits") / f"{self.name}.csv"
