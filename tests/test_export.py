"""A model that travels (tools/export.py, experiment/pretrained.py): one folder of safetensors weights, config,
calibration and card; tools.classify on it gives the rows the checkpoint gives, its rules applied from the folder;
nothing is unpickled; a folder with a missing, changed or mismatched file is refused in one line."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli import main
from experiment.pretrained import PretrainedFolderError, load_pretrained, read_config, save_pretrained
from lightning_modules import BaselineClassifier, DiffusionClassifier, StableDiffusionClassifier
from tests.helpers.runs import TINY_UNET, tiny_args
from tests.helpers.stable_diffusion import IMAGE_SIZE, tiny_test_batch
from tools import classify, export

TINY_DIT = [
    "--model.network.class_path=networks.DiT",
    "--model.network.init_args.patch_size=2",
    "--model.network.init_args.hidden_size=32",
    "--model.network.init_args.depth=1",
    "--model.network.init_args.num_heads=2",
]


@pytest.fixture(scope="module")
def exported(calibrated_tiny_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "demo_model"
    assert export.main([str(calibrated_tiny_run), str(folder)]) == 0
    return folder


def rows_of(checkpoint, images: Path, output: Path, capsys) -> tuple[list[dict], str]:
    assert classify.main([str(checkpoint), str(images), "--output", str(output)]) == 0
    (version,) = (output / "tensorboard").glob("version_*")
    with (version / "predictions.csv").open() as handle:
        rows = [{k: v for k, v in row.items() if k != "path"} for row in csv.DictReader(handle)]
    return rows, capsys.readouterr().out.split("Classified")[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from tests.helpers.data import write_pngs

    folder = tmp_path_factory.mktemp("to_classify")
    write_pngs(folder, "chest", 6)
    return folder


def test_the_folder_holds_weights_config_calibration_and_card(exported, calibrated_tiny_run):
    assert sorted(path.name for path in exported.iterdir()) == [
        "README.md", "calibration.json", "config.yaml", "model.safetensors"
    ]  # fmt: skip
    config = read_config(exported)
    init = config["model"]["init_args"]
    assert init["class_names"] == ["no_finding", "pleural_effusion"] and init["image_size"] == 16
    assert init["classification"]["num_steps"] == 3 and init["wavelet"] is True
    calibration = json.loads((exported / "calibration.json").read_text())
    assert calibration == json.loads((calibrated_tiny_run / "calibration.json").read_text())
    assert calibration["weights"] == config["weights"]
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "Not for diagnostic use" in card and "## How to cite" in card
    assert (exported / "model.safetensors").stat().st_size < (
        calibrated_tiny_run / "checkpoints/last.ckpt"
    ).stat().st_size


def test_classify_on_the_folder_gives_the_checkpoints_rows_and_applies_its_rules(
    exported, calibrated_tiny_run, images, tmp_path, capsys, monkeypatch
):
    original, _ = rows_of(calibrated_tiny_run / "checkpoints" / "last.ckpt", images, tmp_path / "a", capsys)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on an exported folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    travelled, summary = rows_of(exported, images, tmp_path / "b", capsys)
    assert travelled == original and len(travelled) == 6
    assert "refer" in travelled[0] and "ood_pvalue" in travelled[0]
    assert "refusal OFF" not in summary and "of 6 images refused" in summary


def test_from_pretrained_rebuilds_the_model_with_the_same_weights(exported, calibrated_tiny_run):
    model = DiffusionClassifier.from_pretrained(exported)
    state = torch.load(calibrated_tiny_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    with pytest.raises(PretrainedFolderError, match="holds a DiffusionClassifier, not a BaselineClassifier"):
        BaselineClassifier.from_pretrained(exported)


def test_a_baseline_and_a_dit_travel_too(tiny_baseline_checkpoint, tmp_path, images, capsys):
    folder = tmp_path / "resnet"
    assert export.main([str(tiny_baseline_checkpoint), str(folder)]) == 0
    assert "calibration not exported" in capsys.readouterr().out  # the tiny baseline was never validated
    original, _ = rows_of(tiny_baseline_checkpoint, images, tmp_path / "a", capsys)
    travelled, summary = rows_of(folder, images, tmp_path / "b", capsys)
    assert travelled == original and "no calibration" in summary
    dit_run = tmp_path / "dit"
    main(["fit", *[a for a in tiny_args(dit_run) if a not in TINY_UNET], *TINY_DIT, "--trainer.max_steps=1"])
    assert export.main([str(dit_run), str(tmp_path / "dit_export")]) == 0
    model = DiffusionClassifier.from_pretrained(tmp_path / "dit_export")
    assert type(model.network).__name__ == "DiT"


def test_stable_diffusion_exports_its_unet_and_names_the_frozen_parts(weights, tmp_path):
    model = StableDiffusionClassifier(str(weights), class_names=["no_finding", "pleural_effusion"],
                                      image_size=IMAGE_SIZE, gradient_checkpointing=False).eval()  # fmt: skip
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.01)  # "fine-tuned"
    init = {"weights_dir": str(weights), "num_classes": 2, "class_names": ["no_finding", "pleural_effusion"],
            "image_size": IMAGE_SIZE, "gradient_checkpointing": False}  # fmt: skip
    config = {"model": {"class_path": "lightning_modules.StableDiffusionClassifier", "init_args": init}}
    save_pretrained(model, tmp_path, config)
    (tmp_path / "README.md").write_text("---\nclasses: [no_finding, pleural_effusion]\n---\n")
    assert {name.split(".")[0] for name in load_file(tmp_path / "model.safetensors")} == {"unet"}
    loaded = load_pretrained(tmp_path)
    batch = tiny_test_batch()
    with torch.no_grad():
        expected, found = model.classify_batch(batch), loaded.classify_batch(batch)
    assert torch.equal(expected["mean_error"], found["mean_error"])


def test_a_broken_folder_is_refused_in_one_line(exported, tmp_path):
    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        return folder

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(PretrainedFolderError, match="model.safetensors missing"):
        load_pretrained(missing)
    reshaped = copy("reshaped")
    config = yaml.safe_load((reshaped / "config.yaml").read_text())
    config["model"]["init_args"]["network"]["init_args"]["block_out_channels"] = [16, 16]
    (reshaped / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(PretrainedFolderError, match="does not fit the model of .* tensors differ, e.g. .* in the file"):
        load_pretrained(reshaped)
    tampered = copy("tampered")
    state = load_file(tampered / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, tampered / "model.safetensors")
    with pytest.raises(PretrainedFolderError, match="holds other weights than .* was exported with"):
        load_pretrained(tampered)
    other_card = copy("other_card")
    card = (other_card / "README.md").read_text().replace("- pleural_effusion", "- melanoma", 1)
    (other_card / "README.md").write_text(card)
    with pytest.raises(PretrainedFolderError, match=r"names the classes \['no_finding', 'melanoma'\]"):
        load_pretrained(other_card)


def test_exporting_an_old_checkpoint_without_its_information_is_refused(tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, old)
    assert export.main([str(old), str(tmp_path / "out")]) == 2
    assert "records no hyperparameters" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
