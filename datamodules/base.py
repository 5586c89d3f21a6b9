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
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from datamodules.batch_plan import DEFAULT_BATCH_SIZE
from datamodules.dicom import dicom_size, is_dicom, read_dicom
from datamodules.errors import DataError

SPLITS = ("train", "val", "test")
UNUSED = "unused"  # splits.csv's split of the images balancing left out
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


# ----------------------------------------------------------------------------------------------
# Images


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
    try:
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
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on missing/corrupt files
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {path}: {error}") from None


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
    try:
        if is_dicom(path):
            return dicom_size(path)
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read image {path}: {error}") from None


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
    try:
        with Image.open(path) as image:
            pixels = _square(image, "L", size, 1, crop, Image.Resampling.NEAREST)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from None
    return torch.from_numpy(pixels > 0).float()


class MaskFiles:
    """`masks[i]`: the mask of image i, read now; an empty path means no finding (all zeros).
    Masks score explanations only (validation and test), so they are never cached or trained on."""

    def __init__(self, paths: np.ndarray, size: int, crop: bool = False):
        self.paths, self.size, self.crop = np.asarray(paths, dtype=str), size, crop

    def __getitem__(self, i):
        path = self.paths[i]
        return load_mask(path, self.size, self.crop) if path else torch.zeros(1, self.size, self.size)


def mask_paths(table: pd.DataFrame, base) -> np.ndarray | None:
    """Full paths of a table's optional `mask` column ('' where a row has none); None without the column."""
    if "mask" not in table.columns:
        return None
    return np.array([os.path.join(base, m) if m else "" for m in table["mask"]], dtype=str)


def check_mask_files(masks: np.ndarray | None, source) -> None:
    missing = [] if masks is None else [m for m in masks if m and not os.path.isfile(m)]
    if missing:
        raise DataError(f"{len(missing)} mask files listed in {source} (column `mask`) are missing, e.g. {missing[0]}")


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
    """A CSV as strings (no NaN guessing), with a clear error for a missing or empty file or a missing column."""
    if not file.is_file():
        raise DataError(f"{what or 'CSV'} file not found: {file}")
    try:
        table = pd.read_csv(file, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{what or 'CSV'} file {file} is empty: expected a header with {required} and one row per image"
        ) from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{file} lacks column(s) {missing}; found: {list(table.columns)}")
    if table.empty:
        raise DataError(f"{what or 'CSV'} file {file} has a header but no rows: one row per image is expected")
    return table


def check_label_spellings(labels: pd.Series, file: Path) -> None:
    """Refuse labels that differ only by surrounding whitespace or by case: they would become classes of their own."""
    names = pd.Series(labels.unique())
    for what, key in (("surrounding whitespace", names.str.strip()), ("case", names.str.strip().str.casefold())):
        clashes = names.groupby(key.to_numpy()).unique()
        clash = next((list(group) for group in clashes if len(group) > 1), None)
        if clash:
            rows = [int(i) + 2 for i in np.flatnonzero(labels.isin(clash).to_numpy())[:4]]
            raise DataError(f"{file}: labels {clash} differ only by {what} (rows {rows}): write each class one way")


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
        check_image_size(image_size)
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
            run's checkpoints), or `runs/splits/<name>.csv` without a Trainer. When the data no
            longer gives the images it lists, the run stops and says what changed.
        resplit: split again and rewrite splits_file even if it exists (after the data changed).
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
        resplit: bool = False,
    ):
        super().__init__(image_size, batch_size, num_workers)
        self.root = check_root(root)
        if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to 1, got {split_fractions!r}")
        self.seed, self.balance, self.split_fractions = seed, balance, tuple(split_fractions)
        self.splits_file, self.cache_dir = splits_file, cache_dir
        self.verify_images, self.crop, self.resplit = verify_images, crop, resplit
        self.given_split = False
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
            masks = mask_paths(table, self.root)
            for split in SPLITS:
                rows = table.index[table["split"] == split].to_numpy()
                scored = masks is not None and split != "train"  # masks score explanations, not training
                self.datasets[split] = ImageDataset(
                    images, table["id"].to_numpy()[rows], table["label"].to_numpy()[rows], paths[rows],
                    MaskFiles(masks[rows], self.image_size, self.crop) if scored else None,
                )  # fmt: skip
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
        self.given_split = "split" in table.columns
        file = self.splits_path()
        if file.is_file() and not self.resplit:
            reused = self._reuse_splits(file, table)
            # splits.csv records the split, not the masks: they come from the data, every time
            table = reused.merge(table[["path", "mask"]], on="path", how="left") if "mask" in table else reused
        else:
            if file.is_file():
                print(f"{self.name}: splitting again (resplit: true), rewriting {file}", flush=True)
            table = self._write_splits(file, table, self._split(table))
        for split in SPLITS:
            self._check_classes(table[table["split"] == split], f"in split {split!r}")
        self.table = table
        self._check_files(table)
        if self.cache_dir:
            self._build_cache(table)
        return table

    def _write_splits(self, file: Path, data: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
        """splits.csv: every image of the data, those balancing left out too (split `unused`, id -1),
        so that a later run can tell images added to or removed from the data from balancing."""
        unused = data[~data["path"].isin(split["path"])].assign(split=UNUSED, id=-1)
        rows = pd.concat([split, unused], ignore_index=True)
        file.parent.mkdir(parents=True, exist_ok=True)
        rows.assign(**{"class": np.array(self.class_names)[rows["label"].to_numpy(np.int64)]})[
            ["id", "path", "label", "class", "patient", "split"]
        ].to_csv(file, index=False)
        return split

    def _split(self, table: pd.DataFrame) -> pd.DataFrame:
        has_split = self.given_split
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

    def _reuse_splits(self, file: Path, data: pd.DataFrame) -> pd.DataFrame:
        """The saved split, if the data still holds the images the file lists, with the same labels
        (and given splits); otherwise an error that counts what was added, removed or relabelled."""
        saved = read_csv(file, ["id", "path", "label", "patient", "split"], "splits")
        saved = saved.astype({"id": np.int64, "label": np.int64})
        used = saved[saved["split"].isin(SPLITS)].sort_values("id").reset_index(drop=True)
        if not np.array_equal(used["id"], np.arange(len(used))):  # ids index the cache rows
            raise DataError(f"splits file {file}: ids are not 0..{len(used) - 1}; delete the file to split again")
        both = saved.merge(data[["path", "label", *["split"] * self.given_split]], on="path", how="outer",
                           suffixes=("", "_now"), indicator=True)  # fmt: skip
        common = both[both["_merge"] == "both"]
        changed = common["label_now"].to_numpy() != common["label"].to_numpy()
        if self.given_split:  # a given split must still be the one the image was used in
            changed |= common["split"].isin(SPLITS).to_numpy() & (common["split_now"] != common["split"]).to_numpy()
        # a file of an older version lists only the used images: with balancing, others may be new or unused
        knows_unused = (saved["split"] == UNUSED).any() or not self.balance
        problems = [
            f"{int(mask.sum())} {what}, e.g. {paths[mask].iloc[0]}"
            for mask, paths, what in [
                ((both["_merge"] == "right_only") & knows_unused, both["path"], "in the data, not in the file"),
                (both["_merge"] == "left_only", both["path"], "in the file, no longer in the data"),
                (pd.Series(changed, index=common.index), common["path"], "with another label or given split"),
            ]
            if mask.any()
        ]
        if problems:
            raise DataError(
                f"splits file {file} no longer matches the data ({len(saved)} images listed, {len(data)} in the "
                f"data): {'; '.join(problems)}. Set data.init_args.resplit=true to split again and rewrite it, or "
                "point data.init_args.splits_file elsewhere"
            )
        reason = (
            "undersampled to balance the classes"
            if knows_unused
            else ("not in the split file (written by an older version: added to the data, or balanced away)")
        )
        self.dropped[reason] = len(data) - len(used)
        print(f"{self.name}: reusing the split in {file}", flush=True)
        return used

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
        check_mask_files(mask_paths(table, self.root), self.name)
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
        warn_small_images(self.full_paths(table), self.image_size, self.name)
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
