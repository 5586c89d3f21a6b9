"""The discriminative baselines: backbones by name (sizes, one training step at 256x256), local
pretrained weights, MC dropout, the configs, and the same metrics and files as the diffusion
classifier through the real CLI."""

import csv
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from lightning_modules import BaselineClassifier
from lightning_modules.baseline_classifier import dropout_active, dropout_layers
from networks.backbones import BACKBONES, build_backbone
from tests.helpers.configs import resolved
from tests.helpers.data import needs_pneumoniamnist
from tests.helpers.models import four_flips
from tests.helpers.runs import TEST_IDS, tiny_baseline_args

LARGE = {"resnet50", "efficientnet_b4", "vit_b16", "swin_b"}  # minutes of CPU together: make test-all
BY_SIZE = [pytest.param(name, marks=pytest.mark.slow) if name in LARGE else name for name in BACKBONES]
# Published ImageNet parameter counts (1000-class head, 224x224): torchvision and timm model cards.
PUBLISHED = {
    "resnet18": 11.69e6,
    "resnet50": 25.56e6,
    "efficientnet_b0": 5.29e6,
    "efficientnet_b4": 19.34e6,
    "vit_s16": 22.05e6,
    "vit_b16": 86.57e6,
    "swin_b": 87.77e6,
}
DATASETS = {"chexpert": "datamodules.CheXpertDataModule", "isic": "datamodules.ISICDataModule"}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- backbones ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BY_SIZE)
def test_parameter_counts_match_the_published_ones(name, capsys):
    model = build_backbone(name, num_classes=1000, image_size=256)
    measured = count(model)
    # At 256x256 a ViT has (256/16)^2 = 256 patch position embeddings instead of (224/16)^2 = 196:
    # 60 x embed_dim parameters more than the published 224x224 model. CNNs and Swin (relative
    # position biases per window) do not depend on the input size.
    extra = (256 - 196) * model.embed_dim if name.startswith("vit") else 0
    if extra:
        assert model.pos_embed.shape == (1, 1 + 256, model.embed_dim)
    with capsys.disabled():
        print(
            f"\n{name}: {measured / 1e6:.3f} M at 256x256 ({(measured - extra) / 1e6:.3f} M at 224x224), "
            f"published {PUBLISHED[name] / 1e6:.2f} M"
        )
    assert measured - extra == pytest.approx(PUBLISHED[name], rel=0.01)


def paper_config_with_synthetic_data(name: str, tmp_path: Path, image_size: int = 256, batch_size: int = 2) -> Path:
    """configs/<name>.yaml with its (real, not always available) data swapped for synthetic images."""
    config = resolved(name)
    config["data"] = {
        "class_path": "datamodules.SyntheticDataModule",
        "init_args": {
            "kind": "chest",
            "image_size": image_size,
            "num_train": batch_size,
            "num_val": batch_size,
            "num_test": batch_size,
            "num_workers": 0,
        },
    }
    config["global_batch_size"] = batch_size
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


ONE_CPU_STEP = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--checkpoint.monitor=null",
    "--checkpoint.save_top_k=0",
    "--checkpoint.save_last=false",
]


@pytest.mark.parametrize("name", BY_SIZE)
def test_paper_config_trains_one_step_at_256_and_batch_2(name, tmp_path, capsys):
    started = time.time()
    config = paper_config_with_synthetic_data(f"{name}_chexpert", tmp_path)
    cli = main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *ONE_CPU_STEP])
    model = cli.model
    assert cli.trainer.global_step == 1
    assert model.hparams.image_size == 256 and model.hparams.num_classes == 2
    with torch.no_grad():
        logits = model.eval()(torch.zeros(2, 3, 256, 256))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    with capsys.disabled():
        print(
            f"\n{name}: 2 classes at 256x256, {count(model.network) / 1e6:.2f} M parameters, "
            f"one training step at batch 2 in {time.time() - started:.1f} s"
        )


# ---- pretrained weights from local files ------------------------------------------------------
def test_pretrained_file_loads_everything_but_a_head_of_another_size(tmp_path):
    source = build_backbone("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_backbone("resnet18", num_classes=2, pretrained_path=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (2, 512)


def test_pretrained_folder_at_224_fits_a_vit_at_256(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone("vit_s16", num_classes=1000, image_size=224)
    save_file(source.state_dict(), tmp_path / "model.safetensors")  # a Hugging Face snapshot's layout
    model = build_backbone("vit_s16", num_classes=2, image_size=256, pretrained_path=str(tmp_path))
    torch.testing.assert_close(model.cls_token, source.cls_token)
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 257, 384)  # resampled from 14x14 to 16x16 by timm's adapter


def test_pretrained_lightning_checkpoint_and_grey_images(tmp_path):
    module = BaselineClassifier("efficientnet_b0", num_classes=2, image_size=64)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "last.ckpt")
    grey = build_backbone(
        "efficientnet_b0", num_classes=2, image_size=64, in_channels=1, pretrained_path=str(tmp_path / "last.ckpt")
    )
    # RGB filters summed into one channel (timm's adapt_input_conv), everything else as saved
    torch.testing.assert_close(grey.conv_stem.weight, module.network.conv_stem.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey.classifier.weight, module.network.classifier.weight)


def test_missing_or_mismatched_weights_are_refused_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_backbone("resnet18", num_classes=2, pretrained_path=str(missing))
    torch.save(build_backbone("resnet18", num_classes=2).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="resnet18.pth.*EfficientNet-B0"):
        build_backbone("efficientnet_b0", num_classes=2, pretrained_path=str(tmp_path / "resnet18.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_backbone("resnet18", num_classes=2, pretrained_path=str(tmp_path / "empty"))


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18, resnet50, efficientnet_b0"):
        build_backbone("resnet19", num_classes=2)


# ---- MC dropout -------------------------------------------------------------------------------
def test_mc_dropout_averages_stochastic_passes_with_batchnorm_frozen():
    torch.manual_seed(0)
    model = BaselineClassifier("resnet18", num_classes=2, image_size=32, drop_rate=0.5, mc_dropout_passes=8).eval()
    plain = BaselineClassifier("resnet18", num_classes=2, image_size=32)
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints fit with or without dropout
    assert len(dropout_layers(model.network)) == 1 and not dropout_layers(plain.network)
    images = torch.randn(4, 3, 32, 32)
    running_mean = model.network.bn1.running_mean.clone()
    with torch.no_grad():
        first, second = model.class_probabilities(images), model.class_probabilities(images)
    assert not torch.allclose(first, second)  # dropout was active
    torch.testing.assert_close(first.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(model.network.bn1.running_mean, running_mean)  # BatchNorm stayed in eval mode
    assert not any(m.training for m in model.modules())  # and dropout is switched off again
    with torch.no_grad(), dropout_active(model.network):
        passes = [model(images).softmax(dim=1) for _ in range(8)]
    assert all(p.shape == (4, 2) for p in passes)
    model.hparams.mc_dropout_passes = 0
    with torch.no_grad():
        assert torch.equal(model.class_probabilities(images), model.class_probabilities(images))


def test_mc_dropout_without_dropout_is_refused():
    with pytest.raises(ValueError, match="drop_rate"):
        BaselineClassifier("resnet18", num_classes=2, image_size=32, mc_dropout_passes=5)


def test_augmentation_only_in_training():
    model = BaselineClassifier("resnet18", num_classes=2, image_size=32)
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model.augmentation(images), images)
    model.eval()
    assert model.augmentation(images) is images
    assert (
        not BaselineClassifier("resnet18", num_classes=2, image_size=32, augment=False)
        .train()
        .augmentation(images)
        .ne(images)
        .any()
    )


def test_standardize_feeds_each_image_with_zero_mean_and_unit_std():
    model = BaselineClassifier("resnet18", num_classes=2, image_size=32, standardize=True).eval()
    seen = []
    model.network.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(3, 3, 32, 32) * torch.tensor([0.2, 1.0, 1.8]).view(3, 1, 1, 1) - 0.5  # three exposures
    with torch.no_grad():
        model(images)
    by_image = seen[0].flatten(1)
    torch.testing.assert_close(by_image.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(by_image.std(1), torch.ones(3), atol=1e-4, rtol=0)
    expected = (images[1] - images[1].mean()) / images[1].std()
    torch.testing.assert_close(seen[0][1], expected)


def test_test_time_flips_average_the_softmax_of_the_four_flips():
    torch.manual_seed(0)
    model = BaselineClassifier("resnet18", num_classes=3, image_size=32, test_time_flips=True).eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = sum(model.network(view).softmax(dim=1) for view in four_flips(images)) / 4
        torch.testing.assert_close(model.class_probabilities(images), expected)
        plain = model.network(images).softmax(dim=1)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the flips do change the answer of an untrained net


def test_test_time_flips_with_mc_dropout_run_t_passes_per_view():
    model = BaselineClassifier(
        "resnet18", num_classes=2, image_size=32, drop_rate=0.5, mc_dropout_passes=3, test_time_flips=True
    ).eval()
    calls = []
    model.network.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        probabilities = model.class_probabilities(images)
    assert len(calls) == 12
    torch.testing.assert_close(calls[3], images.flip(-1))  # passes 4-6 see the horizontal flip
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))


# ---- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_paper_configs_follow_appendix_b(name, dataset):
    config = resolved(f"{name}_{dataset}")
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["default_root_dir"] == f"runs/{name}_{dataset}" and trainer["precision"] == "bf16-mixed"
    assert model["class_path"] == "lightning_modules.BaselineClassifier" and model["init_args"]["backbone"] == name
    args = model["init_args"]
    transformer = BACKBONES[name].group == "TF"
    assert args["learning_rate"] == (1e-5 if transformer else 1e-4)
    assert args["weight_decay"] == (0.0 if transformer else 1e-3 if dataset == "chexpert" else 1e-5)
    assert args["augment"] is True and args["pretrained_path"] is None
    assert not args.get("test_time_flips", False)  # the paper's single view
    assert data["class_path"] == DATASETS[dataset] and data["init_args"]["root"] is None  # root: required
    assert data["init_args"]["image_size"] == 256 and config["global_batch_size"] == 64


def test_pneumoniamnist_and_demo_configs():
    config = resolved("resnet18_pneumoniamnist")
    assert config["data"]["class_path"] == "datamodules.MedMNISTDataModule"
    assert config["data"]["init_args"]["root"] == "../shared/data/pneumoniamnist"
    assert config["data"]["init_args"]["flag"] == "pneumoniamnist" and config["data"]["init_args"]["size"] == 28
    demo = resolved("baseline_demo")
    assert demo["data"]["class_path"] == "datamodules.SyntheticDataModule" and demo["trainer"]["accelerator"] == "cpu"


@needs_pneumoniamnist
def test_pneumoniamnist_config_trains_and_tests_with_flips_on_the_real_file(tmp_path):
    args = [
        "--config=configs/resnet18_pneumoniamnist.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.num_workers=0",
    ]
    main(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"])
    cli = main(["test", *args, "--ckpt_path=last"])
    assert cli.model.hparams.test_time_flips and cli.model.hparams.image_channels == 3
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["n_images"] == 468 and metrics["model"] == "ResNet-18" and metrics["test_time_flips"] is True


# ---- through the CLI: the same metrics and files as the diffusion classifier -------------------
def test_fit_test_predict_write_the_diffusion_classifiers_files(tmp_path):
    main(["fit", *tiny_baseline_args(tmp_path, "--trainer.max_steps=2")])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    cli = main(["test", *tiny_baseline_args(tmp_path), "--ckpt_path=last"])
    folder = Path(cli.trainer.log_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("accuracy", "f1", "auroc", "ece", "brier", "aurc", "error_detection_auroc"):
        assert isinstance(metrics[key], float), key
    assert list(metrics["accuracy_filtered"]) == [f"{0.05 * i:.2f}" for i in range(11)]
    assert (
        metrics["n_images"] == 7
        and metrics["uncertainty"] == "mc_dropout_entropy"
        and metrics["mc_dropout_passes"] == 3
    )
    assert "n_steps" not in metrics and "mean_forwards" not in metrics  # diffusion-only keys are absent
    assert metrics["accuracy"] == pytest.approx(float(cli.trainer.callback_metrics["test/accuracy"]))
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert list(rows[0]) == [
        "id",
        "label",
        "prediction",
        "predicted_class",
        "prob_no_finding",
        "prob_pleural_effusion",
        "entropy",
        "entropy_normalized",
        "score",
    ]
    assert [int(r["id"]) for r in rows] == TEST_IDS  # the 7 test images, after 24 train + 8 val
    for row in rows:
        assert float(row["score"]) == pytest.approx(float(row["prob_pleural_effusion"]), abs=1e-5)
        assert int(row["prediction"]) == int(float(row["prob_pleural_effusion"]) > 0.5)
        assert row["predicted_class"] == ["no_finding", "pleural_effusion"][int(row["prediction"])]
    assert (folder / "accuracy_filtered.png").is_file() and (folder / "uncertainty_boxes.png").is_file()
    assert (folder / "config.yaml").is_file()  # what results_table reads to name the model and data

    cli = main(["predict", *tiny_baseline_args(tmp_path), "--ckpt_path=last"])
    predicted = list(csv.DictReader((Path(cli.trainer.log_dir) / "predictions.csv").open()))
    assert [int(r["id"]) for r in predicted] == TEST_IDS and list(predicted[0]) == list(rows[0])


def test_data_properties_are_linked_into_the_model(tmp_path):
    cli = main(
        [
            "fit",
            *tiny_baseline_args(tmp_path, "--data.init_args.kind=skin", "--data.init_args.image_size=48"),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
        ]
    )
    model = cli.model
    assert model.hparams.num_classes == 2 and model.class_names == ["benign", "melanoma"]
    assert model.hparams.image_size == 48 and model.hparams.image_channels == 3
