"""Publishers' tables to rows of images: reading CSVs with clear errors, label columns, balancing
classes, patient-level splits and k-fold cross-validation folds, optional mask columns."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.errors import DataError

SPLITS = ("train", "val", "test")
UNUSED = "unused"  # splits.csv's split of the images balancing left out


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


def patient_groups(table: pd.DataFrame) -> np.ndarray:
    """The unit of every split, per row: the patient id, or (no id) the image's own path."""
    return table["patient"].where(table["patient"] != "", "path:" + table["path"]).to_numpy()


def check_folds(num_folds: int | None, fold: int) -> None:
    """The k-fold options on their own (before any data is read): clear errors naming the valid range."""
    if num_folds is None:
        if fold != 0:
            raise ValueError(
                f"fold={fold!r} needs num_folds (an integer >= 2, for k-fold cross-validation); "
                "without num_folds leave fold at 0"
            )
        return
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2 (or null for the single split), got {num_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} (num_folds={num_folds}), got {fold!r}")


def fold_of(keys, num_folds: int, seed: int) -> np.ndarray:
    """Fold of each key (a patient id): sha256 of `{seed}:{key}` modulo num_folds. It depends on the key
    and the seed alone, so adding or removing rows never moves another patient to another fold."""
    unique, inverse = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    folds = [int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") % num_folds for key in unique]
    return np.asarray(folds, dtype=np.int64)[inverse.reshape(-1)]


def fold_splits(
    labels: np.ndarray, groups: np.ndarray, num_folds: int, fold: int, val_fraction: float, seed: int, unit="patients"
):
    """Split names per row, and each row's fold, for fold `fold` of `num_folds`.

    test: the rows whose group (patient) hashes to `fold` (`fold_of`), so across the k folds every
    row is tested exactly once; val: `val_fraction` of the other folds' images, whole patients,
    stratified by class (`assign_splits`), never from the test fold; train: the rest. `unit` names
    the groups in the errors.
    """
    patients = len(pd.unique(groups))
    if patients < num_folds:
        raise DataError(
            f"num_folds={num_folds} is more than the {patients} {unit} in the data (each fold needs at "
            f"least one): choose num_folds in 2..{patients}"
        )
    folds = fold_of(groups, num_folds, seed)
    test = folds == fold
    if not test.any():
        raise DataError(
            f"fold {fold} of num_folds={num_folds} holds none of the {patients} {unit} (the hash left it "
            "empty): choose fewer folds"
        )
    split = np.full(len(labels), "test", dtype=object)
    split[~test] = assign_splits(labels[~test], groups[~test], (1 - val_fraction, val_fraction), seed)
    return split, folds


def check_saved_folds(saved: pd.DataFrame, num_folds: int | None, fold: int, file: Path) -> None:
    """A reused splits file must be of this run's fold setting (its `fold` and `num_folds` columns):
    the per-fold file name keeps the folds apart, this catches a file named by hand."""
    if "num_folds" in saved.columns:
        test = saved.loc[saved["split"] == "test", "fold"].unique().tolist()
        written = f"fold {'/'.join(test)} of num_folds={'/'.join(saved['num_folds'].unique())}"
    else:
        written = "the single split (no num_folds)"
    now = "the single split (no num_folds)" if num_folds is None else f"fold {fold} of num_folds={num_folds}"
    if written != now:
        raise DataError(
            f"splits file {file} was written for {written}, this run asks for {now}: point "
            "data.init_args.splits_file elsewhere, or set data.init_args.resplit=true to rewrite it"
        )


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
    header = pd.read_csv(file, header=None, nrows=1, dtype=str, keep_default_na=False, skipinitialspace=True)
    names = header.iloc[0].tolist() if len(header) else []
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # pandas would read the second as "label.1" and keep the first in silence
        raise DataError(f"{file}: column(s) {repeated} appear more than once in the header {names}: keep one of each")
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{file} lacks column(s) {missing}; found: {list(table.columns)}")
    if table.empty:
        raise DataError(f"{what or 'CSV'} file {file} has a header but no rows: one row per image is expected")
    return table


def label_indices(labels, class_names: list[str], source, rows=None) -> np.ndarray:
    """Class indices of class-name labels; a label outside `class_names` is refused naming its row: rows[i]
    (a path, or "row 7, images/x.png"), or the CSV line number."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [i for i, label in enumerate(labels) if label not in index]
    if unknown:
        row = unknown[0]
        which = rows[row] if rows is not None else f"row {row + 2}"
        raise DataError(f"{source}: label {list(labels)[row]!r} of {which} is not one of the classes {class_names}")
    return np.array([index[label] for label in labels], dtype=np.int64)


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


def digest(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).hexdigest()


def mask_paths(table: pd.DataFrame, base) -> np.ndarray | None:
    """Full paths of a table's optional `mask` column ('' where a row has none); None without the column."""
    if "mask" not in table.columns:
        return None
    return np.array([os.path.join(base, m) if m else "" for m in table["mask"]], dtype=str)


def check_mask_files(masks: np.ndarray | None, source) -> None:
    missing = [] if masks is None else [m for m in masks if m and not os.path.isfile(m)]
    if missing:
        raise DataError(f"{len(missing)} mask files listed in {source} (column `mask`) are missing, e.g. {missing[0]}")
