"""The real-data datamodules on tiny fake trees in their publishers' layouts (CSV headers as
published, small JPG/PNG files made with PIL), plus the real PneumoniaMNIST subset in ../shared.

Covered: CheXpert's filtering rules and both layouts, ISIC 2020 / 2019 / pooled, the CSV folder
(any image mode, given splits, class names), exact balance, 80/10/10 counts, no patient in two
splits, splits.csv reuse, the cache equal to direct decoding, the batch contract, and one test per
bad input, each asserting the message names the culprit.
"""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datamodules import CheXpertDataModule, CSVDataModule, ISICDataModule, MedMNISTDataModule
from datamodules.decoding import load_image
from datamodules.errors import DataError
from tests.helpers import PNEUMONIAMNIST, needs_pneumoniamnist

CHEXPERT_HEADER = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
ISIC2020_HEADER = [
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
]
ISIC2019_HEADER = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_META_HEADER = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]


def write_image(path: Path, seed: int, mode: str = "L", size=(20, 24)):
    """A small random image (so that two images differ) in any PIL mode, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 4096, size[::-1], dtype=np.uint16)).save(path)
        return
    rgb = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    (rgb.quantize(16) if mode == "P" else rgb.convert(mode)).save(path)


def write_csv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def chexpert_row(layout, split, patient, study, view, no_finding, effusion):
    name = f"view1_{view.lower()}.jpg" if view == "Frontal" else "view2_lateral.jpg"
    row = dict.fromkeys(CHEXPERT_HEADER, "")
    row.update(
        {
            "Path": f"{layout}/{split}/patient{patient:05d}/study{study}/{name}",
            "Sex": "Female",
            "Age": "63",
            "Frontal/Lateral": view,
            "AP/PA": "AP" if view == "Frontal" else "",
            "No Finding": no_finding,
            "Pleural Effusion": effusion,
            "Support Devices": "1.0",
        }
    )
    return [row[c] for c in CHEXPERT_HEADER]


def make_chexpert(root: Path, layout="CheXpert-v1.0-small", positives=50, negatives=60, extra=True, per_patient=1):
    """`positives` / `negatives` frontal images (`per_patient` per patient, one study each), plus
    rows each filtering rule must drop: 5 lateral, 3 uncertain, 2 both, 4 neither."""
    rows, patient = [], 0
    for count, flags in [(positives, ("", "1.0")), (negatives, ("1.0", "0.0"))]:
        for i in range(count):
            patient += i % per_patient == 0
            rows.append(chexpert_row(layout, "train", patient, i % per_patient + 1, "Frontal", *flags))
    if extra:
        rows += [chexpert_row(layout, "train", 900 + i, 1, "Lateral", "", "1.0") for i in range(5)]
        rows += [chexpert_row(layout, "train", 910 + i, 1, "Frontal", "", "-1.0") for i in range(3)]
        rows += [chexpert_row(layout, "train", 920 + i, 1, "Frontal", "1.0", "1.0") for i in range(2)]
        rows += [chexpert_row(layout, "train", 930 + i, 1, "Frontal", "", "0.0") for i in range(4)]
    valid = [chexpert_row(layout, "valid", 64541, 1, "Frontal", "1.0", "0.0"), rows.pop(0)[:]]
    valid[1][0] = valid[1][0].replace("/train/", "/valid/")
    write_csv(root / layout / "train.csv", CHEXPERT_HEADER, rows)
    write_csv(root / layout / "valid.csv", CHEXPERT_HEADER, valid)
    for i, row in enumerate(rows + valid):
        write_image(root / row[0], seed=i)
    return root / layout


def make_isic2020(root: Path, melanomas=20, benign=40, per_patient=2):
    rows = [
        [
            f"ISIC_{i:07d}",
            f"IP_{i // per_patient:07d}",
            "male",
            "45.0",
            "torso",
            "melanoma" if i < melanomas else "nevus",
            "malignant" if i < melanomas else "benign",
            int(i < melanomas),
        ]
        for i in range(melanomas + benign)
    ]
    write_csv(root / "train.csv", ISIC2020_HEADER, rows)
    for i, row in enumerate(rows):
        write_image(root / "train" / f"{row[0]}.jpg", seed=1000 + i, mode="RGB", size=(40, 30))


def make_isic2019(root: Path, melanomas=8, benign=16, lesion_every=2):
    rows = [
        [f"ISIC_{9000000 + i:07d}", "1.0" if i < melanomas else "0.0", "0.0" if i < melanomas else "1.0"] + ["0.0"] * 7
        for i in range(melanomas + benign)
    ]
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ISIC2019_HEADER, rows)
    meta = [
        [r[0], "50.0", "anterior torso", f"HAM_{i // lesion_every:07d}" if i % 5 else "", "female"]
        for i, r in enumerate(rows)
    ]  # every 5th image has no lesion_id (as the MSK images)
    write_csv(root / "ISIC_2019_Training_Metadata.csv", ISIC2019_META_HEADER, meta)
    for i, row in enumerate(rows):
        write_image(root / "ISIC_2019_Training_Input" / f"{row[0]}.jpg", seed=2000 + i, mode="RGB", size=(30, 30))


def options(tmp_path, **overrides):
    return {
        "image_size": 16,
        "num_workers": 0,
        "batch_size": 8,
        "splits_file": str(tmp_path / "splits.csv"),
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    }


def assert_no_patient_in_two_splits(table):
    known = table[table["patient"] != ""]
    assert known.groupby("patient")["split"].nunique().max() == 1


# ----------------------------------------------------------------------------------------------
# CheXpert


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    make_chexpert(root)
    return root


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


def make_csv_folder(root: Path, n=40, modes=("L", "RGB", "RGBA", "P", "I;16"), split=None):
    """n images, two per patient, patients alternately malignant and benign; any PIL modes."""
    rows = []
    for i in range(n):
        mode = modes[i % len(modes)]
        path = f"images/{i:03d}.{'jpg' if mode in ('L', 'RGB') else 'png'}"
        write_image(root / path, seed=3000 + i, mode=mode, size=(20 + i % 7, 16 + i % 5))
        rows.append(
            [path, "malignant" if (i // 2) % 2 == 0 else "benign", f"p{i // 2}"] + ([split(i)] if split else [])
        )
    header = ["path", "label", "patient_id"] + (["split"] if split else [])
    write_csv(root / "labels.csv", header, rows)


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


# ----------------------------------------------------------------------------------------------
# Bad input: each a DataError naming the culprit, before training


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
    with pytest.raises(DataError, match=r"label 'malignant' \(row 2, images/000\.jpg\) is not in the class list"):
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


def test_cache_benchmark_runs(capsys):
    from tools.bench_data import main as bench

    result = bench(["--n", "30", "--width", "64", "--height", "48", "--image-size", "16"])
    assert result["images"] > 0 and result["decode_images_per_s"] > 0 and result["cache_images_per_s"] > 0
