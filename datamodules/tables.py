"""Publishers' tables to rows of images: reading CSVs with clear errors, label columns, balancing
classes, patient-level splits, optional mask columns."""

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
