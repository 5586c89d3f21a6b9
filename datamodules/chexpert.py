"""CheXpert (Irvin et al. 2019): pleural effusion vs no finding on frontal chest X-rays (paper sec. 3.1)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.errors import DataError
from datamodules.table_datamodule import TableDataModule
from datamodules.table_reading import parse_flags, read_csv

LAYOUTS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
COLUMNS = ["Path", "Frontal/Lateral", "No Finding", "Pleural Effusion"]
RULES = ("drop", "negative", "positive")


class CheXpertDataModule(TableDataModule):
    """CheXpert as published (`CheXpert-v1.0-small` or `CheXpert-v1.0`): `train.csv` and `valid.csv`
    pooled, then re-split 80/10/10 by patient (`patientNNNNN` in `Path`) and balanced.

    Frontal views only. Positive (`pleural_effusion`) = `Pleural Effusion` == 1; negative
    (`no_finding`) = `No Finding` == 1; rows with neither are dropped. The paper's 20,404
    images are the balanced result.

    Args:
        root: the `CheXpert-v1.0-small` (or `CheXpert-v1.0`) folder, or the folder holding it.
        uncertain: rows with `Pleural Effusion` == -1 (uncertain): "drop" them (default), count
            them as "positive", or as "negative" (then they are negatives only if `No Finding` == 1).
        both: rows with both `No Finding` == 1 and `Pleural Effusion` == 1 (after `uncertain`):
            "drop" (default), "positive" or "negative".
        **kwargs: the shared options of `TableDataModule` (image_size, batch_size, num_workers,
            seed, balance, split_fractions, splits_file, cache_dir, verify_images, crop, num_folds, fold).
    """

    name = "chexpert"
    class_names = ["no_finding", "pleural_effusion"]
    channels = 1  # grayscale films: cache one channel, repeat to 3 when loading

    def __init__(self, root: str, uncertain: str = "drop", both: str = "drop", **kwargs):
        for option, value in [("uncertain", uncertain), ("both", both)]:
            if value not in RULES:
                raise ValueError(f"{option} must be one of {RULES}, got {value!r}")
        super().__init__(root, **kwargs)
        self.uncertain, self.both = uncertain, both

    def dataset_dir(self):
        for folder in [self.root, *(self.root / layout for layout in LAYOUTS)]:
            if (folder / "train.csv").is_file():
                return folder
        raise DataError(f"CheXpert train.csv not found in {self.root} nor in its {' or '.join(LAYOUTS)} folder")

    def read_table(self):
        folder = self.dataset_dir()
        tables = [
            read_csv(folder / name, COLUMNS, "CheXpert")
            for name in ("train.csv", "valid.csv")
            if name == "train.csv" or (folder / name).is_file()
        ]
        table = pd.concat(tables, ignore_index=True)
        # `Path` starts with the data set's folder name ("CheXpert-v1.0-small/train/..."): replace
        # it by the folder found, so a renamed or moved copy still resolves.
        prefix = folder.relative_to(self.root)
        path = table["Path"].str.split("/", n=1).str[1]
        dropped = {}

        frontal = table["Frontal/Lateral"].eq("Frontal").to_numpy()
        dropped["not a frontal view"] = int((~frontal).sum())
        effusion = parse_flags(table["Pleural Effusion"], "Pleural Effusion", folder)
        no_finding = parse_flags(table["No Finding"], "No Finding", folder)

        uncertain = effusion == -1
        effusion = np.where(uncertain, {"drop": np.nan, "negative": 0.0, "positive": 1.0}[self.uncertain], effusion)
        positive, negative = effusion == 1, no_finding == 1
        label = np.where(positive, 1, np.where(negative, 0, -1))
        both = positive & negative
        label[both] = {"drop": -1, "negative": 0, "positive": 1}[self.both]
        dropped_uncertain = frontal & uncertain if self.uncertain == "drop" else np.zeros_like(frontal)
        dropped_both = frontal & both & ~dropped_uncertain if self.both == "drop" else np.zeros_like(frontal)
        label[dropped_uncertain] = -1
        keep = frontal & (label >= 0)
        dropped["uncertain Pleural Effusion (-1)"] = int(dropped_uncertain.sum())
        dropped["both No Finding and Pleural Effusion"] = int(dropped_both.sum())
        dropped["neither No Finding nor Pleural Effusion"] = int(
            (frontal & ~keep & ~dropped_uncertain & ~dropped_both).sum()
        )
        rows = pd.DataFrame(
            {
                "path": [str(prefix / p) for p in path[keep]],
                "label": label[keep],
                "patient": path[keep].str.extract(r"(patient\d+)", expand=False).fillna("").to_numpy(),
            }
        )
        return rows, dropped
