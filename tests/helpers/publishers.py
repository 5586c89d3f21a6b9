"""Tiny fake data trees in their publishers' layouts (CSV headers as published, small JPG/PNG files made
with PIL): CheXpert, ISIC 2020 and 2019, a folder with a CSV of labels; and the datamodule options of
the tests (16 px, no workers, the splits file and cache in the test's folder)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

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
