"""A user's own images, listed in a CSV (`path,label` and optional `patient_id`, `split`)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd

from datamodules.errors import DataError
from datamodules.table_datamodule import TableDataModule
from datamodules.table_reading import SPLITS, check_label_spellings, label_indices, read_csv


class CSVDataModule(TableDataModule):
    """Images of any size and mode listed in a CSV.

    Columns: `path` (relative to `root`, or absolute), `label` (class name, any string);
    optional `patient_id` (the split keeps each patient in one split), `split`
    (`train`/`val`/`test` for every row: the split is taken as given, nothing is re-split) and
    `mask` (a segmentation of the finding, relative to `root` like `path`, empty for none: explain.json
    then scores how well the explanations point at it; validation and test only).

    Args:
        root: folder the image paths are relative to.
        csv: the CSV file, relative to `root` or absolute.
        class_names: the classes in class-index order; a label outside them is an error.
            None: the sorted distinct labels (numerically when they are all numbers).
        balance: undersample every class to the smallest (within each given split); off by default.
        path_column, label_column, patient_column: the CSV's names for the image path, the class label and
            the patient id, when a publisher names them otherwise (e.g. `Image Index`, `Finding Labels`,
            `Patient ID`); a new publisher's CSV is then one YAML file (configs/data/).
        **kwargs: the shared options of `TableDataModule` (image_size, batch_size, num_workers,
            seed, split_fractions, splits_file, cache_dir, verify_images, crop, num_folds, fold).
    """

    def __init__(self, root: str, csv: str, class_names: list[str] | None = None, balance: bool = False,
                 path_column: str = "path", label_column: str = "label", patient_column: str = "patient_id",
                 **kwargs):  # fmt: skip
        super().__init__(root, balance=balance, **kwargs)
        self.columns = {path_column: "path", label_column: "label", patient_column: "patient_id"}
        self.csv = self.root / csv  # an absolute `csv` stays absolute
        self.name = f"csv-{os.path.splitext(os.path.basename(csv))[0]}"
        self._given_class_names = None if class_names is None else [str(c) for c in class_names]

    @functools.cached_property
    def _csv_table(self) -> pd.DataFrame:
        table = read_csv(self.csv, list(self.columns)[:2], "CSV")
        clashes = [name for given, name in self.columns.items() if given != name and name in table.columns]
        if clashes:
            raise DataError(f"{self.csv} has both {clashes} and the column(s) named to stand for them: rename one")
        table = table.rename(columns=self.columns)
        check_label_spellings(table["label"], self.csv)
        return table

    @property
    def class_names(self) -> list[str]:  # needed at model construction, so read from the CSV then
        if self._given_class_names is not None:
            return self._given_class_names
        labels = self._csv_table["label"].unique()
        if len(labels) < 2:
            raise DataError(
                f"{self.csv}: every row has the label {labels[0]!r}: a classifier needs at least two classes"
            )
        numeric = pd.to_numeric(pd.Series(labels), errors="coerce")
        return [str(v) for v in (labels[np.argsort(numeric)] if numeric.notna().all() else sorted(labels))]

    def read_table(self):
        table = self._csv_table
        rows = pd.DataFrame(
            {
                "path": table["path"],
                "label": label_indices(
                    table["label"].tolist(),
                    self.class_names,
                    self.csv,
                    [f"row {i + 2}, {path}" for i, path in enumerate(table["path"])],
                ),
                "patient": table.get("patient_id", pd.Series("", index=table.index)),
            }
        )
        if "mask" in table.columns:
            rows["mask"] = table["mask"]
        if "split" in table.columns:
            bad = ~table["split"].isin(SPLITS)
            if bad.any():
                raise DataError(
                    f"{self.csv}: split {table['split'][bad].iloc[0]!r} (row {np.flatnonzero(bad)[0] + 2}) "
                    f"is not one of {list(SPLITS)}"
                )
            rows["split"] = table["split"]
        return rows, {}
