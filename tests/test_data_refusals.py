"""Bad input to the datamodules: each a DataError naming the culprit (file, row, column, label,
class, split, option), raised before any training step."""

import os
import shutil

import pandas as pd
import pytest

from datamodules import CheXpertDataModule, CSVDataModule, ISICDataModule, MedMNISTDataModule
from datamodules.errors import DataError
from tests.helpers.publishers import make_chexpert, make_csv_folder, options


def test_bad_missing_root(tmp_path):
    for make in (
        lambda r: CheXpertDataModule(root=r),
        lambda r: ISICDataModule(root=r),
        lambda r: CSVDataModule(root=r, csv="x.csv"),
        lambda r: MedMNISTDataModule(root=r),
    ):
        with pytest.raises(DataError, match=r"data\.init_args\.root: .*nowhere.* is not a directory"):
            make(str(tmp_path / "nowhere"))


def test_bad_missing_csv(tmp_path):
    with pytest.raises(DataError, match=r"CSV file not found: .*nope\.csv"):
        CSVDataModule(root=str(tmp_path), csv="nope.csv", **options(tmp_path)).setup("fit")
    with pytest.raises(DataError, match="CheXpert train.csv not found"):
        CheXpertDataModule(root=str(tmp_path), **options(tmp_path)).setup("fit")
    with pytest.raises(DataError, match="ISIC_2019_Training_GroundTruth.csv"):
        ISICDataModule(root=str(tmp_path), **options(tmp_path)).setup("fit")
    with pytest.raises(DataError, match=r"MedMNIST file not found: .*pneumoniamnist_64\.npz"):
        MedMNISTDataModule(root=str(tmp_path), size=64).setup("fit")


def test_bad_missing_column(tmp_path):
    folder = make_chexpert(tmp_path / "data", positives=4, negatives=4, extra=False)
    table = pd.read_csv(folder / "train.csv").drop(columns="Pleural Effusion")
    table.to_csv(folder / "train.csv", index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['Pleural Effusion'\]; found: \['Path', 'Sex'"):
        CheXpertDataModule(root=str(tmp_path / "data"), **options(tmp_path)).setup("fit")


def test_bad_label_value_in_a_flag_column(tmp_path):
    folder = make_chexpert(tmp_path / "data", positives=4, negatives=4, extra=False)
    table = pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)
    table.loc[2, "No Finding"] = "yes"
    table.to_csv(folder / "train.csv", index=False)
    with pytest.raises(DataError, match=r"column 'No Finding' holds 'yes' \(row 4\)"):
        CheXpertDataModule(root=str(tmp_path / "data"), **options(tmp_path)).setup("fit")


def test_bad_missing_image_file(chexpert_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(chexpert_root, root)
    (root / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image files are missing, e\.g\. .*patient00002/study1/view1_frontal\.jpg"):
        CheXpertDataModule(root=str(root), balance=False, **options(tmp_path)).setup("fit")


@pytest.mark.parametrize("cache", [True, False])
def test_bad_unreadable_image(tmp_path, cache):
    make_csv_folder(tmp_path / "mine", modes=("L",))
    (tmp_path / "mine/images/005.jpg").write_bytes(b"not a jpeg at all")
    dm = CSVDataModule(
        root=str(tmp_path / "mine"),
        csv="labels.csv",
        verify_images=not cache,
        **options(tmp_path, cache_dir=str(tmp_path / "cache") if cache else None),
    )
    with pytest.raises(DataError, match=r"cannot read image .*005\.jpg"):
        dm.setup("fit")


def test_bad_label_not_in_the_class_list(tmp_path):
    make_csv_folder(tmp_path / "mine", n=6, modes=("L",))
    dm = CSVDataModule(
        root=str(tmp_path / "mine"), csv="labels.csv", class_names=["benign", "nevus"], **options(tmp_path)
    )
    with pytest.raises(DataError, match=r"label 'malignant' of row 2, images/000\.jpg is not one of the classes"):
        dm.setup("fit")


def test_bad_class_empty_after_filtering(tmp_path):
    make_chexpert(tmp_path / "data", positives=0, negatives=6, extra=True)
    with pytest.raises(DataError, match=r"class 'pleural_effusion' has no images after filtering.*3 uncertain"):
        CheXpertDataModule(root=str(tmp_path / "data"), **options(tmp_path)).setup("fit")


def test_bad_split_leaves_a_class_absent(tmp_path):
    make_csv_folder(
        tmp_path / "mine",
        n=12,
        modes=("L",),
        split=lambda i: "test" if i in (2, 3) else "val" if i in (0, 1, 6, 7) else "train",
    )
    with pytest.raises(DataError, match=r"class 'malignant' has no images in split 'test'"):
        CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path)).setup("fit")


def test_bad_cache_built_for_another_size(chexpert_root, tmp_path):
    small = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path, image_size=8))
    small.setup("fit")
    big = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path, image_size=16))
    big.table = small.table
    big.cache_file.parent.mkdir(parents=True, exist_ok=True)
    os.replace(small.cache_file, big.cache_file)  # e.g. a cache copied under the wrong name
    big.table = None
    with pytest.raises(DataError, match=r"cache .*16px.* holds images of shape \(1, 8, 8\).*another size"):
        big.setup("fit")


def test_bad_splits_file_that_no_longer_matches_the_data(chexpert_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(chexpert_root, root)
    CheXpertDataModule(root=str(root), **options(tmp_path)).setup("fit")
    kept = pd.read_csv(tmp_path / "splits.csv")["path"].iloc[0]
    table = pd.read_csv(root / "CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False)
    table[~table["Path"].str.endswith(kept.split("/", 1)[1])].to_csv(
        root / "CheXpert-v1.0-small/train.csv", index=False
    )
    with pytest.raises(
        DataError,
        match=r"splits file .*splits\.csv no longer matches the data .*: 1 in the file, no longer in the data, e.g. "
        + kept,
    ):
        CheXpertDataModule(root=str(root), **options(tmp_path)).setup("fit")


def test_bad_medmnist_flag(tmp_path):
    with pytest.raises(DataError, match=r"flag 'organmnist3d' is not a 2D MedMNIST"):
        MedMNISTDataModule(root=str(tmp_path), flag="organmnist3d")


def test_bad_image_listed_twice(tmp_path):
    make_csv_folder(tmp_path / "mine", n=20, modes=("L",))
    with open(tmp_path / "mine/labels.csv", "a") as f:
        f.write("images/003.jpg,benign,p1\n")
    with pytest.raises(DataError, match=r"image images/003\.jpg is listed 2\+ times"):
        CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path)).setup("fit")
