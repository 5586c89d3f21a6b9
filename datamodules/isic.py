"""ISIC melanoma (paper sec. 3.1): melanoma vs not, from the ISIC 2020 and/or ISIC 2019 challenge data."""

from __future__ import annotations

import pandas as pd

from datamodules.errors import DataError
from datamodules.table_datamodule import TableDataModule
from datamodules.table_reading import parse_flags, read_csv

GROUND_TRUTH_2019 = "ISIC_2019_Training_GroundTruth.csv"
METADATA_2019 = "ISIC_2019_Training_Metadata.csv"
IMAGES_2019 = "ISIC_2019_Training_Input"


class ISICDataModule(TableDataModule):
    """ISIC as published; every layout found under `root` is read and pooled:

    - ISIC 2020: `train.csv` (`image_name`, `patient_id`, `target`) with the JPGs in `train/`
      (or Kaggle's `jpeg/train/`); split by `patient_id`.
    - ISIC 2019: `ISIC_2019_Training_GroundTruth.csv` (`image`, `MEL`, ...) with the JPGs in
      `ISIC_2019_Training_Input/`; split by `lesion_id` from the optional
      `ISIC_2019_Training_Metadata.csv` (images without one are their own group).

    Balanced and split 80/10/10. Both years pooled give 584 + 4,522 = 5,106 melanomas, i.e. the
    paper's 10,212 balanced images.

    Args:
        root: folder holding the files above (one or both years).
        **kwargs: the shared options of `TableDataModule` (image_size, batch_size, num_workers,
            seed, balance, split_fractions, splits_file, cache_dir, verify_images, crop, num_folds, fold).
    """

    name = "isic"
    class_names = ["benign", "melanoma"]

    def read_table(self):
        parts = []
        if (self.root / "train.csv").is_file():
            parts.append(self._read_2020())
        if (self.root / GROUND_TRUTH_2019).is_file():
            parts.append(self._read_2019())
        if not parts:
            raise DataError(
                f"no ISIC table in {self.root}: expected train.csv (ISIC 2020) and/or {GROUND_TRUTH_2019} (ISIC 2019)"
            )
        return pd.concat(parts, ignore_index=True), {}

    def _read_2020(self):
        file = self.root / "train.csv"
        table = read_csv(file, ["image_name", "patient_id", "target"], "ISIC 2020")
        images = next((d for d in ("train", "jpeg/train") if (self.root / d).is_dir()), "train")
        return pd.DataFrame(
            {
                "path": images + "/" + table["image_name"] + ".jpg",
                "label": parse_flags(table["target"], "target", file, allowed=(0.0, 1.0)).astype(int),
                "patient": table["patient_id"],
            }
        )

    def _read_2019(self):
        file = self.root / GROUND_TRUTH_2019
        table = read_csv(file, ["image", "MEL"], "ISIC 2019")
        label = parse_flags(table["MEL"], "MEL", file, allowed=(0.0, 1.0))
        if pd.isna(label).any():
            raise DataError(f"{file}: column 'MEL' is blank for image {table['image'][pd.isna(label)].iloc[0]}")
        patient = pd.Series("", index=table.index)
        if (self.root / METADATA_2019).is_file():
            meta = read_csv(self.root / METADATA_2019, ["image", "lesion_id"], "ISIC 2019 metadata")
            patient = table["image"].map(meta.set_index("image")["lesion_id"]).fillna("")
        return pd.DataFrame(
            {"path": IMAGES_2019 + "/" + table["image"] + ".jpg", "label": label.astype(int), "patient": patient}
        )
