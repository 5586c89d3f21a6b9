"""The real-data datamodules on tiny fake trees in their publishers' layouts (CSV headers as
published, small JPG/PNG files made with PIL), plus the real PneumoniaMNIST subset in ../shared.

Covered: CheXpert's filtering rules and both layouts, ISIC 2020 / 2019 / pooled, the CSV folder
(any image mode, given splits, class names), exact balance, 80/10/10 counts, no patient in two
splits, splits.csv reuse, the cache equal to direct decoding and the batch contract. The bad inputs:
tests/test_data_refusals.py.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datamodules import CheXpertDataModule, CSVDataModule, ISICDataModule, MedMNISTDataModule
from datamodules.decoding import load_image
from datamodules.errors import DataError
from tests.helpers.data import PNEUMONIAMNIST, needs_pneumoniamnist
from tests.helpers.publishers import (
    assert_no_patient_in_two_splits,
    make_chexpert,
    make_csv_folder,
    make_isic2019,
    make_isic2020,
    options,
    write_csv,
)

# ----------------------------------------------------------------------------------------------
# CheXpert


def test_chexpert_filters_frontal_views_and_the_two_labels(chexpert_root, tmp_path, capsys):
    dm = CheXpertDataModule(root=str(chexpert_root), balance=False, **options(tmp_path))
    table, dropped = dm.read_table()
    assert np.bincount(table["label"]).tolist() == [61, 50]  # valid.csv's two rows pooled in
    assert dropped == {
        "not a frontal view": 5,
        "uncertain Pleural Effusion (-1)": 3,
        "both No Finding and Pleural Effusion": 2,
        "neither No Finding nor Pleural Effusion": 4,
    }
    assert table["path"].str.startswith("CheXpert-v1.0-small/").all()
    assert not table["path"].str.contains("lateral").any()
    assert table["patient"].str.fullmatch(r"patient\d{5}").all()
    dm.setup("fit")
    assert "dropped 5 rows: not a frontal view" in capsys.readouterr().out


@pytest.mark.parametrize(
    "uncertain, both, counts",
    [
        ("positive", "drop", [61, 53]),
        ("negative", "drop", [61, 50]),
        ("drop", "positive", [61, 52]),
        ("drop", "negative", [63, 50]),
    ],
)
def test_chexpert_uncertain_and_both_rules_are_configurable(chexpert_root, tmp_path, uncertain, both, counts):
    dm = CheXpertDataModule(root=str(chexpert_root), uncertain=uncertain, both=both, balance=False, **options(tmp_path))
    assert np.bincount(dm.read_table()[0]["label"]).tolist() == counts


def test_chexpert_is_balanced_exactly_and_split_80_10_10(chexpert_root, tmp_path):
    dm = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path))
    dm.setup("fit")
    table = dm.table
    assert dm.dropped["undersampled to balance the classes"] == 11
    counts = pd.crosstab(table["split"], table["label"])
    assert counts.to_dict("index") == {"train": {0: 40, 1: 40}, "val": {0: 5, 1: 5}, "test": {0: 5, 1: 5}}
    assert sorted(table["id"]) == list(range(100))


@pytest.mark.parametrize("layout", ["CheXpert-v1.0", "CheXpert-v1.0-small"])
@pytest.mark.parametrize("point_at", ["parent", "dataset"])
def test_chexpert_reads_both_layouts_from_the_folder_or_its_parent(tmp_path, layout, point_at):
    folder = make_chexpert(tmp_path / "data", layout=layout, positives=10, negatives=10, extra=False)
    root = folder if point_at == "dataset" else folder.parent
    dm = CheXpertDataModule(root=str(root), **options(tmp_path))
    dm.setup("fit")
    assert sum(len(d) for d in dm.datasets.values()) == 20
    assert all(os.path.isfile(p) for p in dm.datasets["train"].paths)


def test_chexpert_splits_by_patient(tmp_path):
    make_chexpert(tmp_path / "data", positives=60, negatives=60, extra=False, per_patient=4)
    dm = CheXpertDataModule(root=str(tmp_path / "data"), **options(tmp_path))
    dm.setup("fit")
    assert_no_patient_in_two_splits(dm.table)
    assert dm.table["patient"].value_counts().max() == 4  # patient00001 pooled across train.csv and valid.csv
    sizes = dm.table["split"].value_counts()
    for split, target in [("train", 96), ("val", 12), ("test", 12)]:  # off by at most a patient per class
        assert abs(sizes[split] - target) <= 8


# ----------------------------------------------------------------------------------------------
# ISIC


def test_isic_2020_layout(tmp_path):
    make_isic2020(tmp_path / "isic")
    dm = ISICDataModule(root=str(tmp_path / "isic"), **options(tmp_path))
    dm.setup("fit")
    assert np.bincount(dm.table["label"]).tolist() == [20, 20]
    assert dm.table["patient"].str.startswith("IP_").all()
    assert_no_patient_in_two_splits(dm.table)
    assert dm.datasets["train"][0]["image"].shape == (3, 16, 16)


def test_isic_2019_layout_groups_by_lesion_id(tmp_path):
    make_isic2019(tmp_path / "isic", melanomas=20, benign=30)
    dm = ISICDataModule(root=str(tmp_path / "isic"), balance=False, **options(tmp_path))
    dm.setup("fit")
    assert np.bincount(dm.table["label"]).tolist() == [30, 20]
    assert (dm.table["patient"] == "").sum() == 10  # images without lesion_id are their own group
    assert_no_patient_in_two_splits(dm.table)


def test_isic_pools_2019_and_2020_like_the_paper(tmp_path):
    make_isic2020(tmp_path / "isic")
    make_isic2019(tmp_path / "isic", melanomas=10, benign=16)
    dm = ISICDataModule(root=str(tmp_path / "isic"), **options(tmp_path))
    dm.setup("fit")
    assert np.bincount(dm.table["label"]).tolist() == [30, 30]  # 2 x all melanomas, as 2 x 5,106 = 10,212
    assert dm.table["path"].str.startswith("ISIC_2019_Training_Input/").sum() >= 10
    assert_no_patient_in_two_splits(dm.table)


# ----------------------------------------------------------------------------------------------
# CSV folder


def test_csv_folder_reads_any_mode_and_size_with_class_names_from_labels(tmp_path):
    make_csv_folder(tmp_path / "mine")
    dm = CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path))
    assert dm.class_names == ["benign", "malignant"] and dm.num_classes == 2  # before setup: linked into the model
    dm.setup("fit")
    assert sum(len(d) for d in dm.datasets.values()) == 40
    assert_no_patient_in_two_splits(dm.table)
    for split in ("train", "val", "test"):
        image = dm.datasets[split][0]["image"]
        assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1


def test_csv_folder_takes_a_given_split_and_an_absolute_csv(tmp_path):
    make_csv_folder(tmp_path / "mine", n=20, split=lambda i: ["train", "val", "test", "train", "train"][i % 5])
    dm = CSVDataModule(root=str(tmp_path / "mine"), csv=str(tmp_path / "mine/labels.csv"), **options(tmp_path))
    dm.setup("fit")
    given = pd.read_csv(tmp_path / "mine/labels.csv").set_index("path")["split"]
    assert (dm.table.set_index("path")["split"] == given[dm.table["path"]]).all()


def test_csv_numeric_labels_sort_numerically(tmp_path):
    write_csv(tmp_path / "l.csv", ["path", "label"], [["a.png", "10"], ["b.png", "2"], ["c.png", "2"]])
    assert CSVDataModule(root=str(tmp_path), csv="l.csv", **options(tmp_path)).class_names == ["2", "10"]


def write_square_mask(path: Path, size: int, box: slice) -> None:
    pixels = np.zeros((size, size), np.uint8)
    pixels[box, box] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_csv_masks_reach_validation_and_test_items_aligned_with_their_image(tmp_path):
    """An optional `mask` column: squeezed to the image size like the image (nearest, stays 0/1),
    empty for none; train items carry none; a reused split keeps them; a missing file is named."""
    make_csv_folder(tmp_path / "mine")
    table = pd.read_csv(tmp_path / "mine/labels.csv")
    table["mask"] = [f"masks/{i:03d}.png" if label == "malignant" else "" for i, label in enumerate(table["label"])]
    for path in table["mask"]:
        if path:
            write_square_mask(tmp_path / "mine" / path, 32, slice(8, 24))  # the middle half of a 32 px mask
    table.to_csv(tmp_path / "mine/labels.csv", index=False)
    expected = torch.zeros(1, 16, 16)
    expected[:, 4:12, 4:12] = 1
    for attempt in ("split", "reuse the split"):
        dm = CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path))
        dm.setup("fit")
        assert "mask" not in dm.datasets["train"][0]
        for split in ("val", "test"):
            for item in dm.datasets[split]:
                malignant = dm.class_names[int(item["label"])] == "malignant"
                assert torch.equal(item["mask"], expected if malignant else torch.zeros(1, 16, 16)), attempt
    table.loc[table["mask"] != "", "mask"] = "masks/nowhere.png"
    table.to_csv(tmp_path / "mine/labels.csv", index=False)
    missing = r"mask files listed in csv-labels \(column `mask`\) are missing, e.g. .*nowhere"
    with pytest.raises(DataError, match=missing):
        CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------------------------
# Shared machinery: batches, splits file, cache


def test_batches_follow_the_contract(chexpert_root, tmp_path):
    dm = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    ids = []
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])  # grayscale repeated
        assert batch["label"].dtype == torch.long and batch["id"].dtype == torch.long
        assert isinstance(batch["path"], list) and all(os.path.isfile(p) for p in batch["path"])
    for split in ("train", "val", "test"):
        ids += dm.datasets[split].ids.tolist()
    assert len(set(ids)) == len(ids) == 100
    assert (dm.num_classes, dm.class_names, dm.image_size, dm.image_channels) == (
        2,
        ["no_finding", "pleural_effusion"],
        16,
        3,
    )
    assert dm.train_dataloader().dataset is dm.datasets["train"]


def test_splits_file_is_written_and_reused(chexpert_root, tmp_path):
    first = CheXpertDataModule(root=str(chexpert_root), seed=0, **options(tmp_path))
    first.setup("fit")
    saved = pd.read_csv(tmp_path / "splits.csv")
    assert list(saved.columns) == ["id", "path", "label", "class", "patient", "split"]
    again = CheXpertDataModule(root=str(chexpert_root), seed=1, **options(tmp_path))  # other seed: file wins
    again.setup("fit")
    assert again.table[["id", "path", "split"]].equals(first.table[["id", "path", "split"]])
    other = CheXpertDataModule(
        root=str(chexpert_root), seed=1, **options(tmp_path, splits_file=str(tmp_path / "b.csv"))
    )
    other.setup("fit")
    assert not other.table[["path", "split"]].equals(first.table[["path", "split"]])


def test_splits_file_defaults_beside_the_run(chexpert_root, tmp_path):
    from types import SimpleNamespace

    dm = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path, splits_file=None))
    dm.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), logger=None)
    assert dm.splits_path() == tmp_path / "run" / "splits.csv"


def test_cache_gives_the_same_tensors_as_direct_decoding(chexpert_root, tmp_path):
    cached = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path))
    direct = CheXpertDataModule(root=str(chexpert_root), **options(tmp_path, cache_dir=None))
    cached.setup("test")
    direct.setup("test")
    assert cached.cache_file.is_file() and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    for split in ("train", "test"):
        for i in range(len(cached.datasets[split])):
            a, b = cached.datasets[split][i], direct.datasets[split][i]
            assert torch.equal(a["image"], b["image"]) and a["id"] == b["id"] and a["path"] == b["path"]
    path = cached.datasets["test"].paths[0]
    assert np.array_equal(np.load(cached.cache_file)[cached.datasets["test"].ids[0]], load_image(path, 16, 1))


# ----------------------------------------------------------------------------------------------
def test_a_validation_cut_short_sees_the_classes_in_their_proportions_the_same_every_time(tmp_path):
    """Issue 40, point 13: fit validates on limit_val_batches; for a CSV listed class by class, the first batches
    were one class. The validation loader serves a seeded, class-stratified order: every prefix within one image of
    each class's share, the same at every validation, every image once."""
    labels = ["benign"] * 30 + ["malignant"] * 10  # listed class by class, 3 : 1
    make_csv_folder(tmp_path / "mine", n=40, split=lambda i: "val" if i < 40 else "train")
    table = pd.read_csv(tmp_path / "mine/labels.csv")
    splits = ["val"] * 20 + ["train"] * 6 + ["test"] * 2 + ["train"] * 4 + ["val"] * 4 + ["train"] * 2 + ["test"] * 2
    table["label"], table["split"] = labels, splits  # a patient's two rows (2k, 2k + 1) stay together
    table.to_csv(tmp_path / "mine/labels.csv", index=False)
    dm = CSVDataModule(root=str(tmp_path / "mine"), csv="labels.csv", **options(tmp_path) | {"batch_size": 4})
    dm.setup("fit")
    val_labels = dm.datasets["val"].labels
    assert val_labels.tolist() == sorted(val_labels.tolist())  # the split itself is class by class
    order = [int(i) for batch in dm.val_dataloader() for i in batch["id"]]
    again = [int(i) for batch in dm.val_dataloader() for i in batch["id"]]
    assert order == again and sorted(order) == sorted(dm.datasets["val"].ids.tolist())
    by_id = dict(zip(dm.datasets["val"].ids.tolist(), val_labels.tolist()))
    share = (val_labels == 1).mean()
    for k in range(1, len(order) + 1):
        seen = sum(by_id[i] for i in order[:k])
        assert abs(seen - share * k) <= 1, f"prefix {k}: {seen} of class 1, expected about {share * k:.1f}"


# MedMNIST


@needs_pneumoniamnist
@pytest.mark.parametrize("image_size", [None, 32])
def test_medmnist_reads_the_real_pneumoniamnist_subset(image_size):
    dm = MedMNISTDataModule(root=str(PNEUMONIAMNIST.parent), image_size=image_size, num_workers=0)
    dm.setup("fit")
    side = image_size or 28
    assert dm.class_names == ["normal", "pneumonia"] and dm.image_size == side
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 2428, "val": 270, "test": 468}
    for split, n in [("train", 2428), ("val", 270), ("test", 468)]:
        assert np.bincount(dm.datasets[split].labels).tolist() == [n // 2, n // 2]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (64, 3, side, side) and batch["image"].dtype == torch.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1 and "path" not in batch
    ids = np.concatenate([d.ids for d in dm.datasets.values()])
    assert np.array_equal(ids, np.arange(3166))


def test_medmnist_reads_sized_files_and_colour_flags(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_{k}": (
            rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
            if k == "images"
            else rng.integers(0, 8, (n, 1), dtype=np.uint8)
        )
        for s, n in [("train", 12), ("val", 4), ("test", 4)]
        for k in ("images", "labels")
    }
    np.savez(tmp_path / "bloodmnist_64.npz", **arrays)
    dm = MedMNISTDataModule(root=str(tmp_path), flag="bloodmnist", size=64, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 8 and dm.image_size == 64
    item = dm.datasets["val"][1]
    expected = torch.from_numpy(arrays["val_images"][1]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["image"], expected) and item["id"] == 13


def test_cache_benchmark_runs(capsys):
    from tools.bench_data import main as bench

    result = bench(["--n", "30", "--width", "64", "--height", "48", "--image-size", "16"])
    assert result["images"] > 0 and result["decode_images_per_s"] > 0 and result["cache_images_per_s"] > 0


def test_a_publishers_csv_with_its_own_column_names_is_one_yaml(tmp_path):
    """configs/data/example_publisher.yaml reads `file,diagnosis,subject` through the real CLI."""
    from cli import main

    make_csv_folder(tmp_path / "mine")
    table = pd.read_csv(tmp_path / "mine" / "labels.csv", dtype=str)
    renamed = table.rename(columns={"path": "file", "label": "diagnosis", "patient_id": "subject"})
    renamed.to_csv(tmp_path / "mine" / "labels.csv", index=False)
    data = ["--data=configs/data/example_publisher.yaml", f"--data.init_args.root={tmp_path / 'mine'}",
            "--data.init_args.cache_dir=null", "--data.init_args.image_size=16"]  # fmt: skip
    cli = main(["fit", "--config=configs/demo.yaml", *data, f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.max_steps=0", "--trainer.limit_val_batches=0"], exit_on_error=False)  # fmt: skip
    data_module = cli.datamodule
    assert data_module.class_names == sorted(table["label"].unique())
    assert data_module.table["patient"].tolist() and set(data_module.table["patient"]) <= set(table["patient_id"])
    assert_no_patient_in_two_splits(data_module.table)
