"""New images classified by a trained model in one command (tools/classify.py, datamodules/images.py):
a nested folder of PNG, JPEG and DICOM files, or a CSV of paths, every file predicted once, with
class names, for a diffusion classifier and a baseline, in one process and under 2-process DDP."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import ImagesDataModule
from datamodules.errors import DataError
from tests.helpers import ROOT
from tests.helpers.data import write_dicom
from tests.helpers.runs import free_port
from tools import classify

CLASSES = ["no_finding", "pleural_effusion"]


def image_folder(root: Path) -> list[str]:
    """13 unlabelled images in nested folders: 5 PNG, 3 JPEG, 5 DICOM (two without a suffix)."""
    rng = np.random.default_rng(0)
    (root / "ward" / "bed_3").mkdir(parents=True)
    files = []
    for i in range(5):
        files.append(root / f"png_{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(files[-1])
    for i in range(3):
        files.append(root / "ward" / f"photo_{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(files[-1])
    for i in range(5):
        pixels = rng.integers(0, 4095, (48, 40), dtype=np.uint16)
        files.append(write_dicom(root / "ward" / "bed_3" / (f"IM{i:04d}" + (".dcm" if i > 1 else "")), pixels))
    (root / "ward" / "notes.txt").write_text("not an image\n")
    return sorted(str(path) for path in files)


@pytest.fixture
def checkpoints(tiny_checkpoint, tiny_baseline_checkpoint) -> dict[str, Path]:
    return {"unet": tiny_checkpoint, "resnet": tiny_baseline_checkpoint}


def predictions(output: Path) -> list[dict]:
    (version,) = (output / "tensorboard").glob("version_*")
    with (version / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("model", ["unet", pytest.param("resnet", marks=pytest.mark.slow)])  # resnet: make test-all
def test_a_folder_of_new_images_gives_one_row_per_file_with_class_names(model, checkpoints, tmp_path):
    files = image_folder(tmp_path / "images")
    # the baseline's MC dropout draws its masks from each process's own random state: off, to compare
    options = ["--", "--model.init_args.mc_dropout_passes=0"] if model == "resnet" else []
    out = ["--output", str(tmp_path / "out")]
    assert classify.main([str(checkpoints[model]), str(tmp_path / "images"), *out, *options]) == 0
    rows = predictions(tmp_path / "out")
    assert [row["path"] for row in rows] == files and [int(row["id"]) for row in rows] == list(range(13))
    assert all(row["predicted_class"] == CLASSES[int(row["prediction"])] for row in rows)
    assert "label" not in rows[0]
    # the same under 2-process DDP, every image once: the tool re-runs itself for the second rank
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tools.classify", str(checkpoints[model]), str(tmp_path / "images"),
               "--output", str(tmp_path / "ddp"), *(options or ["--"]), "--trainer.accelerator=cpu",
               "--trainer.devices=2", "--trainer.strategy=ddp"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp_rows = predictions(tmp_path / "ddp")
    assert [row["path"] for row in ddp_rows] == files
    assert [r["prediction"] for r in ddp_rows] == [r["prediction"] for r in rows]
    assert [float(r["entropy"]) for r in ddp_rows] == pytest.approx([float(r["entropy"]) for r in rows], rel=1e-3)


def test_a_csv_of_paths_with_labels_is_tested_and_explained(checkpoints, tmp_path):
    files = image_folder(tmp_path / "images")
    table = tmp_path / "images" / "list.csv"
    square = np.zeros((20, 20), np.uint8)
    square[5:15, 5:15] = 255
    Image.fromarray(square).save(tmp_path / "images" / "finding.png")  # a segmentation for the effusions
    table.write_text("path,label,mask\n" + "".join(
        f"{Path(f).relative_to(table.parent)},{CLASSES[i % 2]},{'finding.png' if i % 2 else ''}\n"
        for i, f in enumerate(files)
    ))  # fmt: skip
    assert classify.main([str(checkpoints["unet"]), str(table), "--output", str(tmp_path / "tested")]) == 0
    (version,) = (tmp_path / "tested" / "tensorboard").glob("version_*")
    metrics = json.loads((version / "metrics.json").read_text())
    rows = predictions(tmp_path / "tested")
    assert metrics["n_images"] == 13 and metrics["checkpoint"] == str(checkpoints["unet"])
    assert metrics["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in rows) / 13)
    fast = ["--model.init_args.explanation.sampling_steps=2", "--model.init_args.explanation.flip_steps=0"]
    explained = ["--output", str(tmp_path / "explained"), "--explain", "--", *fast]
    assert classify.main([str(checkpoints["unet"]), str(table), *explained]) == 0
    (version,) = (tmp_path / "explained" / "tensorboard").glob("version_*")
    assert len(list((version / "explanations").glob("image_*.png"))) == 13
    explain = json.loads((version / "explain.json").read_text())
    assert explain["n_images"] == 13
    # the 6 images with a mask are scored against it: the chance level is the square's quarter of the image
    assert explain["n_localised"] == 6 and explain["chance_mass"] == pytest.approx(0.25)
    assert 0 <= explain["pointing_game"] <= 1 and 0 <= explain["mass_inside_mask"] <= 1


def test_refusals_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="neither a folder, an image nor a CSV"):
        ImagesDataModule(str(tmp_path / "nowhere"), CLASSES, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no image files in .*empty"):
        ImagesDataModule(str(tmp_path / "empty"), CLASSES, 32)
    image_folder(tmp_path / "images")
    table = tmp_path / "list.csv"
    table.write_text("path,label\nimages/png_0.png,pneumothorax\n")
    with pytest.raises(DataError, match="'pneumothorax' of .*png_0.png is not one of the classes"):
        ImagesDataModule(str(table), CLASSES, 32)
    unlabelled = ImagesDataModule(str(tmp_path / "images"), CLASSES, 32)
    unlabelled.setup("test")
    with pytest.raises(DataError, match="has no labels: `test` needs"):
        unlabelled.test_dataloader()


def test_images_far_smaller_than_the_input_are_counted_and_warned_about(tmp_path):
    image_folder(tmp_path / "images")
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(tmp_path / "images" / "dot.png")
    data = ImagesDataModule(str(tmp_path / "images"), CLASSES, 32)
    with pytest.warns(UserWarning, match=r"1 image\(s\) are far smaller than image_size=32 .*dot.png \(1x1\)"):
        data.setup("predict")


def test_a_labelled_set_of_one_class_writes_json_with_the_reason_for_an_undefined_auroc(checkpoints, tmp_path):
    """Issue 40, point 12: AUROC of one class used to be a bare NaN in metrics.json and a silently dropped row in
    the report. It is null, with its reason under `undefined`, and the report shows the reason."""
    files = image_folder(tmp_path / "images")
    table = tmp_path / "list.csv"
    table.write_text("path,label\n" + "".join(f"{f},{CLASSES[0]}\n" for f in files))
    assert classify.main([str(checkpoints["unet"]), str(table), "--output", str(tmp_path / "out")]) == 0
    (version,) = (tmp_path / "out" / "tensorboard").glob("version_*")
    text = (version / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert metrics["auroc"] is None and "one class" in metrics["undefined"]["auroc"]
    report = (version / "report.html").read_text()
    assert "undefined" in report and "one class" in report


def test_ctrl_c_in_the_first_seconds_of_a_classify_is_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    """Issue 40, point 11: Ctrl-C while the intake reads the files used to end in a traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(classify, "take_in", interrupted)
    image_folder(tmp_path / "images")
    assert classify.main([str(checkpoints["unet"]), str(tmp_path / "images"), "--output", str(tmp_path / "o")]) == 130
    error = capsys.readouterr().err
    assert error.startswith("interrupted (Ctrl-C)") and "Traceback" not in error
