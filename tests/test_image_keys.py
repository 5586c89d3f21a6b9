"""Same image, same answer (diffusion/noise.image_keys): an image's row depends on the weights, the settings and the
image alone, not on the other files in its folder or CSV, their order, the batch size or the folder's name; two
identical files stay two rows."""

import csv
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.noise import image_keys
from tools import classify

BOOKKEEPING = ("id", "path")  # the row's position in this listing and where the file lies: all else is the image's


def test_keys_depend_on_the_pixels_alone():
    pixels = torch.randint(0, 256, (6, 3, 16, 16))
    images = pixels.float() / 127.5 - 1.0
    keys = image_keys(images)
    assert len(set(keys.tolist())) == 6 and (keys >= 0).all()
    assert torch.equal(image_keys(images.flip(0)), keys.flip(0))  # batch order
    assert torch.equal(image_keys(images[2:3]), keys[2:3])  # batch company
    assert torch.equal(image_keys(images.bfloat16().float()), keys)  # 8-bit images survive bfloat16
    changed = images.clone()
    changed[4, 1, 7, 3] += 2 / 255  # one level of one channel of one pixel
    assert image_keys(changed)[4] != keys[4] and torch.equal(image_keys(changed)[:4], keys[:4])
    assert image_keys(images[:, :, :8])[0] != image_keys(images[:, :, 8:])[0]


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"scan_{seed}_{i:02d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(path)
    return paths


def rows(run: Path, source: Path, output: Path, *extra: str) -> list[dict]:
    assert classify.main([str(run / "checkpoints" / "last.ckpt"), str(source), "--output", str(output), *extra]) == 0
    (version,) = (output / "tensorboard").glob("version_*")
    with (version / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def row_of(found: list[dict], name: str) -> dict:
    (row,) = [row for row in found if Path(row["path"]).name == name]
    return {key: value for key, value in row.items() if key not in BOOKKEEPING}


def test_an_images_row_is_its_own_whatever_else_is_listed_with_it(calibrated_tiny_run, tmp_path):
    calibrated_run = calibrated_tiny_run
    crowd = write_images(tmp_path / "ward_a", 49, seed=0)
    alone = tmp_path / "alone"
    alone.mkdir()
    target = alone / "patient.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (24, 24), dtype=np.uint8)).save(target)
    shutil.copy(target, tmp_path / "ward_a" / "patient.png")
    first = tmp_path / "ward_b"
    shutil.copytree(tmp_path / "ward_a", first)
    write_images(first, 1, seed=9)[0].rename(first / "0000_sorts_first.png")
    table = tmp_path / "listed.csv"
    listed = [*reversed(crowd), tmp_path / "ward_a" / "patient.png", target]  # another order, and the file twice
    table.write_text("path\n" + "".join(f"{path}\n" for path in listed))

    reference = row_of(rows(calibrated_run, alone, tmp_path / "out_alone"), "patient.png")
    assert reference["out_of_distribution"] in ("true", "false") and reference["prediction_set"] != "off"
    in_folder = rows(calibrated_run, tmp_path / "ward_a", tmp_path / "out_folder")
    assert len(in_folder) == 50
    assert row_of(in_folder, "patient.png") == reference
    assert row_of(rows(calibrated_run, first, tmp_path / "out_first"), "patient.png") == reference
    batch_of_7 = rows(calibrated_run, tmp_path / "ward_a", tmp_path / "out_b7", "--batch-size", "7")
    assert row_of(batch_of_7, "patient.png") == reference
    from_csv = rows(calibrated_run, table, tmp_path / "out_csv", "--keep-duplicates")
    twice = [row for row in from_csv if Path(row["path"]).name == "patient.png"]
    assert len(from_csv) == 51 and len(twice) == 2  # identical files: two rows, one answer
    for row in twice:
        assert {key: value for key, value in row.items() if key not in BOOKKEEPING} == reference
