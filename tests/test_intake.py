"""Every input accounted for (datamodules/intake.py, tools/classify.py): each file in gets a row of
predictions.csv or a named reason in skipped.csv; labelled CSVs are labelled however they are written;
duplicates are counted once; refused images carry no answer; every ordinary mistake is one line, exit 2."""

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImagesDataModule
from datamodules.errors import DataError
from datamodules.intake import take_in
from experiment.user_errors import guarded
from reports import records, results
from tests.helpers.data import awkward_folder, write_dicom
from tools import classify

CLASSES = ["no_finding", "pleural_effusion"]


def read_rows(file: Path) -> list[dict]:
    with file.open(newline="") as handle:
        return list(csv.DictReader(handle))


def version_of(output: Path) -> Path:
    (version,) = (output / "tensorboard").glob("version_*")
    return version


def test_every_file_of_an_awkward_folder_is_classified_or_skipped_with_its_reason(tmp_path):
    expected = awkward_folder(tmp_path / "ward")
    intake = take_in(tmp_path / "ward")
    found = {Path(path).name: None for path in intake.paths}
    found |= {Path(path).name: reason for path, reason in intake.skipped}
    assert found.keys() == expected.keys()
    for name, reason in expected.items():
        assert (found[name] is None) if reason is None else found[name].startswith(reason), (name, found[name])
    skipped = len(expected) - list(expected.values()).count(None)
    assert intake.summary().startswith(f"{len(intake.paths)} images, {skipped} skipped (")
    assert len(intake.paths) == 8 and "duplicate of " + str(tmp_path / "ward" / "plain.png") in found["plain_copy.png"]
    with pytest.raises(DataError) as refused:  # --strict: stop, naming every file that would be skipped
        ImagesDataModule(str(tmp_path / "ward"), CLASSES, 16, strict=True)
    assert all(str(path) in str(refused.value) for path, _ in intake.skipped)
    assert take_in(tmp_path / "ward", keep_duplicates=True).paths.count(str(tmp_path / "ward" / "plain_copy.png")) == 1


CSV_WRITINGS = {
    "quoted header (R's write.csv)": lambda rows: '"path","label"\n' + "".join(f'"{p}","{lab}"\n' for p, lab in rows),
    "byte-order mark": lambda rows: "\ufeffpath,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows),
    "CRLF line ends": lambda rows: "path,label\r\n" + "".join(f"{p},{lab}\r\n" for p, lab in rows),
}


@pytest.mark.parametrize("writing", CSV_WRITINGS)
def test_a_labelled_csv_is_labelled_however_it_is_written_and_gives_metrics(writing, tiny_checkpoint, tmp_path):
    rows = [(f"image_{i}.png", CLASSES[i % 2]) for i in range(4)]
    for name, _ in rows:
        Image.fromarray(np.full((8, 8), 40 * int(name[6]), np.uint8)).save(tmp_path / name)
    table = tmp_path / "list.csv"
    table.write_bytes(CSV_WRITINGS[writing](rows).encode("utf-8"))
    intake = take_in(table)
    assert intake.labelled and intake.labels == [label for _, label in rows]
    assert [Path(path).name for path in intake.paths] == [name for name, _ in rows]
    data = ImagesDataModule(str(table), CLASSES, 16)
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert classify.main([str(tiny_checkpoint), str(table), "--output", str(tmp_path / "out")]) == 0
    metrics = json.loads((version_of(tmp_path / "out") / "metrics.json").read_text())  # `test` ran: labelled
    assert metrics["n_images"] == 4


def test_a_file_listed_twice_is_counted_once_unless_asked(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8), ord(name[0]), np.uint8)).save(tmp_path / name)
    (tmp_path / "list.csv").write_text("path,label\na.png,no_finding\nb.png,pleural_effusion\na.png,no_finding\n")
    intake = take_in(tmp_path / "list.csv")
    assert [Path(p).name for p in intake.paths] == ["a.png", "b.png"] and intake.labels == CLASSES
    assert intake.skipped == [(str(tmp_path / "a.png"), f"duplicate of {tmp_path / 'a.png'} (same file)")]
    assert len(take_in(tmp_path / "list.csv", keep_duplicates=True).paths) == 3


def test_refused_images_have_no_answer_and_are_counted_as_refused(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    outputs = {
        "id": torch.arange(4), "label": torch.tensor([0, 0, 0, 1]), "prediction": probs.argmax(1), "probs": probs,
        "entropy": torch.zeros(4), "entropy_normalized": torch.zeros(4), "score": probs[:, 1],
        "out_of_distribution": torch.tensor([False, True, True, False]),
        "ood_score": torch.zeros(4), "ood_pvalue": torch.ones(4),
    }  # fmt: skip
    on = {"refusal": {"on": True}}
    rows = read_rows(results.write_predictions(tmp_path / "on.csv", records.image_records(outputs, on), CLASSES))
    assert [row["prediction"] for row in rows] == ["0", str(records.NO_ANSWER), str(records.NO_ANSWER), "1"]
    assert [row["predicted_class"] for row in rows] == ["no_finding", "", "", "pleural_effusion"]
    assert [row["leading_class"] for row in rows] == [CLASSES[i] for i in probs.argmax(1).tolist()]
    refusal_off = {"refusal": {"on": False, "why": "x"}}
    off = read_rows(
        results.write_predictions(tmp_path / "off.csv", records.image_records(outputs, refusal_off), CLASSES)
    )
    assert [row["predicted_class"] for row in off] == [CLASSES[i] for i in probs.argmax(1).tolist()]
    metrics = results.test_metrics(outputs, 2)
    # by hand: answered are images 0 (right) and 3 (right); 1 (wrong) and 2 (right) refused
    assert (metrics["n_refused"], metrics["n_answered"], metrics["accuracy_answered"]) == (2, 2, 1.0)
    assert metrics["accuracy"] == 0.75  # the leading class on every image, refused ones included


def test_one_image_or_several_are_a_source(tiny_checkpoint, tmp_path):
    images = [tmp_path / "first.png", tmp_path / "second.png"]
    for i, image in enumerate(images):
        Image.fromarray(np.full((20, 20), 60 * i, np.uint8)).save(image)
    intake = take_in(images[0])
    assert intake.paths == [str(images[0])] and not intake.skipped
    output = tmp_path / "two"
    assert classify.main([str(tiny_checkpoint), *map(str, images), "--output", str(output)]) == 0
    assert [row["path"] for row in read_rows(version_of(output) / "predictions.csv")] == list(map(str, images))


def test_a_folder_run_accounts_for_every_file_in_its_rows_and_skipped_csv(tiny_checkpoint, tmp_path, capsys):
    expected = awkward_folder(tmp_path / "ward")
    assert classify.main([str(tiny_checkpoint), str(tmp_path / "ward"), "--output", str(tmp_path / "out")]) == 0
    version = version_of(tmp_path / "out")
    rows, skipped = read_rows(version / "predictions.csv"), read_rows(version / "skipped.csv")
    named = [Path(row["path"]).name for row in rows + skipped]
    assert sorted(named) == sorted(expected) and len(rows) == list(expected.values()).count(None)
    printed = capsys.readouterr().out
    assert f"{len(rows)} images, {len(skipped)} skipped (" in printed
    assert f"Classified {len(rows)} images" in printed and f"{len(skipped)} files skipped" in printed


def test_a_labelled_csv_with_every_oddity_gives_metrics_counting_each_image_once(tiny_checkpoint, tmp_path):
    names = [f"x_{i}.png" for i in range(4)]
    for i, name in enumerate(names):
        Image.fromarray(np.full((12, 12), 50 * i, np.uint8)).save(tmp_path / name)
    listed = [*names, names[0]]  # the first image twice
    text = '\ufeff"path","label"\r\n' + "".join(f'"{n}","{CLASSES[int(n[2]) % 2]}"\r\n' for n in listed)
    (tmp_path / "list.csv").write_bytes(text.encode("utf-8"))
    assert classify.main([str(tiny_checkpoint), str(tmp_path / "list.csv"), "--output", str(tmp_path / "out")]) == 0
    metrics = json.loads((version_of(tmp_path / "out") / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    assert len(read_rows(version_of(tmp_path / "out") / "skipped.csv")) == 1


def ordinary_mistakes(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    """Each mistake -> (tools.classify arguments, what its one line must say)."""
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    report = write_dicom(tmp_path / "report.dcm")
    (tmp_path / "a_file").write_text("x")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "no_hparams.ckpt")
    import pydicom

    sr = pydicom.dcmread(report)
    del sr.PixelData
    sr.save_as(report)
    out = ["--output", str(tmp_path / "out")]
    return {
        "a DICOM without pixels": ([str(checkpoint), str(report), *out], "no pixel data"),
        "--output is a file": ([str(checkpoint), str(image), "--output", str(tmp_path / "a_file")], "is a file"),
        "--output below a file": ([str(checkpoint), str(image), "--output", str(tmp_path / "a_file/x")], "below"),
        "a checkpoint of a bare tensor": ([str(tmp_path / "tensor.ckpt"), str(image), *out], "Tensor"),
        "a checkpoint without hyperparameters": ([str(tmp_path / "no_hparams.ckpt"), str(image), *out],
                                                 "no hyper_parameters"),
        "a source that does not exist": ([str(checkpoint), str(tmp_path / "nowhere"), *out], "not found"),
    }  # fmt: skip


def test_every_ordinary_mistake_is_one_line_with_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFCLS_DEBUG", raising=False)
    for case, (arguments, says) in ordinary_mistakes(tmp_path, tiny_checkpoint).items():
        assert classify.main(arguments) == 2, case
        error = capsys.readouterr().err.strip().splitlines()
        assert error[0].startswith("error: ") and says in error[0] and "Traceback" not in "".join(error), case
        assert len(error) == 2 and "DIFFCLS_DEBUG=1" in error[1], case
    assert not (tmp_path / "out").exists()  # nothing written before the mistake was found (no trained_with.yaml)


@pytest.mark.parametrize("tool", ["summary", "export", "study"])
def test_the_other_tools_say_a_wrong_path_in_one_line(tool, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFCLS_DEBUG", raising=False)
    module = importlib.import_module(f"tools.{tool}")
    wrong = str(tmp_path / "nowhere.yaml")
    assert guarded(lambda: module.main([wrong]), f"python -m tools.{tool} ...") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0].startswith("error: ") and wrong in error[0] and not any("Traceback" in line for line in error)


@pytest.mark.parametrize(
    "name, write",
    [
        ("scan.gif", lambda path: Image.new("L", (16, 16), 128).save(path, format="GIF")),
        ("images.zip", lambda path: path.write_bytes(b"PK\x03\x04" + bytes(60))),
        ("scan_without_suffix", lambda path: Image.new("L", (16, 16), 128).save(path, format="PNG")),
        ("notes.txt", lambda path: path.write_text("path\na.png\n")),
    ],
)
def test_one_file_that_is_no_csv_is_never_read_as_a_table(tmp_path, name, write):
    """Issue 40, points 10 and 11: a GIF, a ZIP, a PNG without a suffix or a text file as the only source used to be
    read as a CSV (a UnicodeDecodeError, or a table of nonsense). Only a .csv is a table; any other file is one image
    to classify or one skipped file with its reason."""
    path = tmp_path / name
    write(path)
    intake = take_in(path)
    assert not intake.labelled
    accounted = intake.paths + [skipped for skipped, _ in intake.skipped]
    assert accounted == [str(path)]


def test_a_csv_beside_other_sources_is_refused_in_one_line(tmp_path):
    (tmp_path / "list.csv").write_text("path\na.png\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="list.csv is a CSV of images .* among 2 sources"):
        take_in([tmp_path / "list.csv", tmp_path / "images"])
