"""Patient-level k-fold cross-validation (`num_folds`, `fold`) through the real datamodules: the CSV
folder datamodule on a tiny tree with several images per patient (TableDataModule, shared with
CheXpert and ISIC), and MedMNIST, which folds its pooled official train + val images one by one.

Covered: the k test splits partition the (balanced) rows; no patient in two splits of a fold;
validation never holds a test-fold patient; rows added keep every patient's fold; the per-fold splits
file and its refusal of another fold's file; the bad options; num_folds=None is the old split exactly.
"""

import shutil

import numpy as np
import pandas as pd
import pytest

from datamodules import CSVDataModule, MedMNISTDataModule
from datamodules.errors import DataError
from datamodules.table_reading import SPLITS, assign_splits, balance_classes
from tests.helpers.data import PNEUMONIAMNIST, needs_pneumoniamnist
from tests.helpers.publishers import assert_no_patient_in_two_splits, options, write_csv, write_image

K = 5


def write_tree(root, patients=40, start=0, loners=6):
    """Patients p{start}.. with 1 to 4 images each, of both classes (one class more often), plus
    `loners` images without a patient id (each its own patient). Rows listed in labels.csv."""
    rows = []
    for p in range(start, start + patients):
        for i in range(1 + p % 4):
            label = "malignant" if (p + i) % 3 == 0 else "benign"  # patients with 3-4 images have both
            rows.append([f"img/p{p}_{i}.png", label, f"p{p}"])
    rows += [[f"img/loner{start + i}.png", ["benign", "malignant"][i % 2], ""] for i in range(loners)]
    for n, (path, *_) in enumerate(rows):
        if not (root / path).is_file():
            write_image(root / path, seed=n, size=(8, 8))
    old = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False).values.tolist() if start else []
    write_csv(root / "labels.csv", ["path", "label", "patient_id"], old + rows)
    return root


def folds_of(root, tmp_path, **overrides):
    """The k datamodules of a cross-validation, set up (no cache: no image is decoded)."""
    modules = []
    for fold in range(K):
        dm = CSVDataModule(root=str(root), csv="labels.csv", num_folds=K, fold=fold,
                           **options(tmp_path, cache_dir=None, **overrides))  # fmt: skip
        dm.setup("fit")
        modules.append(dm)
    return modules


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("folds") / "data")


def patients(table, split):
    rows = table[table["split"] == split]
    return set(rows["patient"].where(rows["patient"] != "", "path:" + rows["path"]))


@pytest.mark.parametrize("balance", [False, True])
def test_the_k_test_splits_partition_the_kept_rows_by_patient(tree, tmp_path, balance):
    modules = folds_of(tree, tmp_path, balance=balance)
    kept = modules[0].table.set_index("path")["id"]
    if balance:
        assert modules[0].dropped["undersampled to balance the classes"] > 0
        assert len(set(np.bincount(modules[0].table["label"]))) == 1
    else:
        assert len(kept) == len(pd.read_csv(tree / "labels.csv"))
    tested = []
    for fold, dm in enumerate(modules):
        table = dm.table
        # balancing comes first: every fold keeps the same rows, with the same ids (one cache for all folds)
        assert table.set_index("path")["id"].sort_index().equals(kept.sort_index())
        assert_no_patient_in_two_splits(table)
        test, val, train = (patients(table, s) for s in ("test", "val", "train"))
        assert not (test & val) and not (test & train) and not (val & train)  # patientless images too
        saved = pd.read_csv(tmp_path / f"splits_fold{fold}of{K}.csv")  # the per-fold file, with every row's fold
        assert (saved["num_folds"] == K).all() and (saved.loc[saved["split"] == "test", "fold"] == fold).all()
        assert not (
            saved.loc[saved["split"].isin(["train", "val"]), "fold"] == fold
        ).any()  # val never from the test fold
        rest = table["split"] != "test"
        assert abs((table["split"] == "val").sum() - rest.sum() / 9) <= 4  # val / (train + val) of split_fractions
        tested += table.loc[table["split"] == "test", "path"].tolist()
    assert len(tested) == len(set(tested)) == len(kept)  # every kept row tested exactly once
    assert set(tested) == set(kept.index)


def test_rows_added_keep_every_patients_fold(tmp_path):
    root = write_tree(tmp_path / "data", patients=30)
    before = CSVDataModule(root=str(root), csv="labels.csv", num_folds=K, fold=2,
                           **options(tmp_path / "a", cache_dir=None))  # fmt: skip
    before.setup("fit")
    write_tree(root, patients=25, start=30)  # new patients, and new patientless images
    extra = [[f"img/p{p}_9.png", "malignant", f"p{p}"] for p in range(0, 30, 3)]  # old patients' new images
    for path, *_ in extra:
        write_image(root / path, seed=99, size=(8, 8))
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    pd.concat([table, pd.DataFrame(extra, columns=table.columns)]).to_csv(root / "labels.csv", index=False)
    after = CSVDataModule(root=str(root), csv="labels.csv", num_folds=K, fold=2,
                          **options(tmp_path / "b", cache_dir=None))  # fmt: skip
    after.setup("fit")
    fold = {}
    for folder in ("a", "b"):
        saved = pd.read_csv(tmp_path / folder / f"splits_fold2of{K}.csv", dtype=str, keep_default_na=False)
        fold[folder] = dict(zip(saved["patient"].where(saved["patient"] != "", saved["path"]), saved["fold"]))
    assert len(fold["b"]) > len(fold["a"]) and all(fold["b"][p] == f for p, f in fold["a"].items())
    old_test = set(before.table.loc[before.table["split"] == "test", "path"])
    assert old_test <= set(after.table.loc[after.table["split"] == "test", "path"])


def test_splits_file_is_per_fold_reused_and_refuses_another_fold(tree, tmp_path):
    def make(**kwargs):
        return CSVDataModule(root=str(tree), csv="labels.csv", **options(tmp_path, cache_dir=None, **kwargs))

    first = make(num_folds=K, fold=1)
    first.setup("fit")
    assert first.splits_path() == tmp_path / f"splits_fold1of{K}.csv"
    again = make(num_folds=K, fold=1, seed=7)  # the file wins, as without folds
    again.setup("fit")
    assert again.table[["id", "path", "split"]].equals(first.table[["id", "path", "split"]].astype({"id": np.int64}))
    shutil.copy(tmp_path / f"splits_fold1of{K}.csv", tmp_path / f"splits_fold3of{K}.csv")  # named by hand
    with pytest.raises(
        DataError, match=rf"written for fold 1 of num_folds={K}, this run asks for fold 3 of num_folds={K}"
    ):
        make(num_folds=K, fold=3).setup("fit")
    shutil.copy(tmp_path / f"splits_fold1of{K}.csv", tmp_path / "splits.csv")
    with pytest.raises(DataError, match=r"written for fold 1 of num_folds=5, this run asks for the single split"):
        make().setup("fit")
    make(num_folds=K, fold=3, resplit=True).setup("fit")  # resplit rewrites it


def test_bad_fold_options_are_refused_before_any_image_is_read(tmp_path):
    def make(root=tmp_path, **kwargs):
        return CSVDataModule(root=str(root), csv="labels.csv", **options(tmp_path, **kwargs))

    with pytest.raises(ValueError, match=r"fold must be in 0\.\.4 \(num_folds=5\), got 5"):
        make(num_folds=5, fold=5)
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.4 \(num_folds=5\), got -1"):
        make(num_folds=5, fold=-1)
    with pytest.raises(ValueError, match=r"num_folds must be an integer >= 2 .*got 1"):
        make(num_folds=1)
    with pytest.raises(ValueError, match=r"fold=2 needs num_folds"):
        make(fold=2)
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.2 \(num_folds=3\), got 3"):
        MedMNISTDataModule(root=str(tmp_path), num_folds=3, fold=3)
    # image files that do not exist: the fold errors come before any file is looked at
    rows = [[f"nowhere/{i}.png", "ab"[i % 2], f"p{i // 2}"] for i in range(6)]
    write_csv(tmp_path / "labels.csv", ["path", "label", "patient_id"], rows)
    with pytest.raises(DataError, match=r"num_folds=5 is more than the 3 patients in the data.*num_folds in 2\.\.3"):
        make(num_folds=5, verify_images=True).setup("fit")
    write_csv(tmp_path / "labels.csv", ["path", "label", "split"], [[p, lab, "train"] for p, lab, _ in rows])
    with pytest.raises(DataError, match=r"gives a `split` column, and num_folds=2 would split again"):
        make(num_folds=2).setup("fit")


@pytest.mark.parametrize("balance", [False, True])
def test_no_num_folds_is_the_old_split_bit_for_bit(tree, tmp_path, balance):
    dm = CSVDataModule(root=str(tree), csv="labels.csv", balance=balance, **options(tmp_path, cache_dir=None))
    dm.setup("fit")
    table = dm.read_table()[0].sort_values("path", kind="stable").reset_index(drop=True)
    table = balance_classes(table, 0) if balance else table
    groups = table["patient"].where(table["patient"] != "", "path:" + table["path"]).to_numpy()
    table = table.assign(split=assign_splits(table["label"].to_numpy(), groups, (0.8, 0.1, 0.1), 0))
    table = table.assign(order=table["split"].map(SPLITS.index)).sort_values(["order", "path"], kind="stable")
    expected = table.reset_index(drop=True).assign(id=np.arange(len(table)))
    expected["class"] = np.array(dm.class_names)[expected["label"]]
    columns = ["id", "path", "label", "class", "patient", "split"]
    assert dm.table[columns[:2] + ["split"]].equals(expected[columns[:2] + ["split"]])
    saved = pd.read_csv(tmp_path / "splits.csv", dtype=str, keep_default_na=False)  # the file, as before
    assert list(saved.columns) == columns
    assert saved[saved["split"] != "unused"].equals(expected[columns].astype(str))


# ----------------------------------------------------------------------------------------------
# MedMNIST: no patient ids, so the pooled official train + val images are folded one by one


def check_medmnist_folds(root, flag, size, pooled, official_val):
    tested = []
    for fold in range(K):
        dm = MedMNISTDataModule(root=str(root), flag=flag, size=size, num_workers=0, num_folds=K, fold=fold)
        dm.setup("fit")
        ids = {s: set(d.ids.tolist()) for s, d in dm.datasets.items()}
        assert not (ids["test"] & ids["val"]) and not (ids["test"] & ids["train"]) and not (ids["val"] & ids["train"])
        assert set.union(*ids.values()) == set(range(pooled))  # the official test split is not used
        rest = pooled - len(ids["test"])
        assert abs(len(ids["val"]) - rest * official_val / pooled) <= dm.num_classes
        tested += sorted(ids["test"])
    assert sorted(tested) == list(range(pooled))  # the test folds partition the pooled images
    return dm


def test_medmnist_folds_partition_train_and_val(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"train": 60, "val": 15, "test": 20}
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in counts.items()}
    arrays |= {f"{s}_labels": rng.integers(0, 2, (n, 1), dtype=np.uint8) for s, n in counts.items()}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    dm = check_medmnist_folds(tmp_path, "pneumoniamnist", 28, 75, 15)
    item = dm.datasets["test"][0]  # an image keeps its id, the row in train + val
    pooled = np.concatenate([arrays["train_images"], arrays["val_images"]])
    assert np.array_equal(((item["image"][0] + 1) * 127.5).round().numpy(), pooled[int(item["id"])])


@needs_pneumoniamnist
def test_medmnist_folds_partition_the_real_pneumoniamnist_train_and_val():
    check_medmnist_folds(PNEUMONIAMNIST.parent, "pneumoniamnist", 28, 2428 + 270, 270)
