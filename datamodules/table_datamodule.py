"""What every file-based datamodule shares: checks, balancing, patient-level splits, the cache, loaders.

A dataset subclass only reads its publisher's table into rows (`path` relative to `root`,
`label` class index, `patient` id or empty, optionally `split`) and says which rows it dropped
and why. `TableDataModule` then, before any training step:

1. checks that every class still has images, and reports what was dropped;
2. balances the classes by seeded undersampling (`balance`);
3. splits 80/10/10 by patient (no patient in two splits), stratified by class, or, with
   `num_folds`, takes fold `fold` of a patient-level k-fold cross-validation as the test split
   (`tables.fold_splits`); or reuses the split written earlier to `splits.csv` (so a resumed or
   repeated run sees the same images); every image gets a stable `id` (its row in that file)
   that seeds its classification noise;
4. checks that every image file exists (`verify_images`: also decodes each one), and that every
   split holds every class;
5. decodes and resizes every image once into a uint8 memmap (`cache_dir`), so training epochs
   read arrays and never decode a JPEG again.

Each bad input raises `DataError` with a message naming the culprit (file, column, label, class,
split). Images reach the model as float32 (3, H, W) in [-1, 1], grayscale repeated to 3 channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from datamodules.decoding import CachedImages, DecodedImages, ImageDataset, MaskFiles, warn_small_images
from datamodules.errors import DataError
from datamodules.loaders import SplitDataModule, check_root
from datamodules.table_reading import (
    SPLITS,
    UNUSED,
    assign_splits,
    balance_classes,
    check_folds,
    check_mask_files,
    check_saved_folds,
    digest,
    fold_of,
    fold_splits,
    mask_paths,
    patient_groups,
    read_csv,
)


class TableDataModule(SplitDataModule):
    """Base of the file-based datamodules: a subclass implements `read_table` and sets
    `name`, `class_names` and `channels` (1 to cache grayscale sources at a third of the size).

    Args:
        root: folder of the data set as published.
        image_size: side of the square images the model sees (paper: 256).
        batch_size: images per batch in every loader, per process; None (the default): from the
            CLI's global_batch_size, or DEFAULT_BATCH_SIZE.
        num_workers: loader worker processes (also used to build the cache).
        seed: seed of the balancing, of the split and of the folds.
        balance: undersample every class to the size of the smallest (seeded); done before the
            split, and before the folds (the same images in every fold).
        split_fractions: train / val / test fractions (by images, whole patients per split). With
            num_folds only train : val counts (validation is val / (train + val) of the non-test images).
        splits_file: CSV of the split (`path,label,class,patient,split,id`, plus `fold,num_folds`
            with num_folds), written on first use and reused when present. None: `splits.csv` in
            `trainer.default_root_dir` (beside the run's checkpoints), or `runs/splits/<name>.csv`
            without a Trainer. With num_folds, `_fold{fold}of{num_folds}` is added to the name, so
            the k folds' files live side by side. When the data no longer gives the images it lists,
            or the file is of another fold setting, the run stops and says what changed.
        resplit: split again and rewrite splits_file even if it exists (after the data changed).
        cache_dir: folder of the decoded-image cache (uint8 `.npy` memmaps named by data set,
            size and a hash of the root and file list); None decodes every image at every access.
        verify_images: decode every image up front (done anyway when the cache is built);
            otherwise only their existence is checked before training.
        crop: centre-crop to a square before resizing instead of squeezing the whole image.
        num_folds: k of a patient-level k-fold cross-validation; None (the default): the single
            split of split_fractions. A patient's fold is a hash of the seed and its patient id
            (an image without one is its own patient), so added rows never move a patient; fold
            `fold` is the test split, validation is carved from the other folds' patients
            (stratified by class, val share of split_fractions), the rest trains. Across the k
            runs every (balanced) image is tested exactly once. Not with a given `split` column.
        fold: which fold is the test split, 0 <= fold < num_folds (only with num_folds).
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
        num_folds: int | None = None,
        fold: int = 0,
    ):
        super().__init__(image_size, batch_size, num_workers)
        self.root = check_root(root)
        if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to 1, got {split_fractions!r}")
        self.seed, self.balance, self.split_fractions = seed, balance, tuple(split_fractions)
        self.splits_file, self.cache_dir = splits_file, cache_dir
        self.verify_images, self.crop, self.resplit = verify_images, crop, resplit
        check_folds(num_folds, fold)
        self.num_folds, self.fold = num_folds, fold
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
        if self.given_split and self.num_folds:
            raise DataError(
                f"{self.name}: the data gives a `split` column, and num_folds={self.num_folds} would split "
                "again: drop the column to cross-validate, or leave num_folds unset to keep the given split"
            )
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
        columns = ["id", "path", "label", "class", "patient", "split"]
        if self.num_folds:  # every row's fold (balanced-away ones too), and the k, checked on reuse
            rows = rows.assign(fold=fold_of(patient_groups(rows), self.num_folds, self.seed), num_folds=self.num_folds)
            columns += ["fold", "num_folds"]
        file.parent.mkdir(parents=True, exist_ok=True)
        rows.assign(**{"class": np.array(self.class_names)[rows["label"].to_numpy(np.int64)]})[columns].to_csv(
            file, index=False
        )
        return split

    def _split(self, table: pd.DataFrame) -> pd.DataFrame:
        has_split = self.given_split
        if self.balance:
            before = len(table)
            groups = [table[table["split"] == s] for s in SPLITS] if has_split else [table]
            table = pd.concat([balance_classes(g, self.seed) for g in groups if len(g)])
            self.dropped["undersampled to balance the classes"] = before - len(table)
        labels, groups = table["label"].to_numpy(), patient_groups(table)
        if self.num_folds:
            train, val, _ = self.split_fractions
            split, _ = fold_splits(labels, groups, self.num_folds, self.fold, val / (train + val), self.seed)
            # ids by path alone: the same in every fold (the balanced rows are), so the k folds share
            # one cache and every image keeps its classification noise across the folds
            return (
                table.assign(split=split)
                .sort_values("path", kind="stable")
                .reset_index(drop=True)
                .assign(id=np.arange(len(table)))
            )
        if not has_split:
            table = table.assign(split=assign_splits(labels, groups, self.split_fractions, self.seed))
        order = table["split"].map(SPLITS.index)
        table = table.assign(order=order).sort_values(["order", "path"], kind="stable").drop(columns="order")
        return table.reset_index(drop=True).assign(id=np.arange(len(table)))

    def _reuse_splits(self, file: Path, data: pd.DataFrame) -> pd.DataFrame:
        """The saved split, if the data still holds the images the file lists, with the same labels
        (and given splits); otherwise an error that counts what was added, removed or relabelled."""
        saved = read_csv(file, ["id", "path", "label", "patient", "split"], "splits")
        check_saved_folds(saved, self.num_folds, self.fold, file)
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
        key = digest(str(self.root.resolve()), self.channels, self.crop, self.table["path"].tolist())
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
            file = Path(self.splits_file)
        elif self.trainer is not None:
            file = Path(self.trainer.default_root_dir) / "splits.csv"
        else:
            file = Path("runs/splits") / f"{self.name}.csv"
        # A file per fold, rather than one file checked against the setting: the k runs of a cross-
        # validation (often one config, hence one splits_file, e.g. configs/data/*_shared_split.yaml)
        # each keep their split beside the others instead of refusing or overwriting each other's.
        # The file still records fold and num_folds (check_saved_folds), for a file named by hand.
        if self.num_folds:
            file = file.with_name(f"{file.stem}_fold{self.fold}of{self.num_folds}{file.suffix}")
        return file
