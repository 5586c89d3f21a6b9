"""results_table: Table 1 (CNN / TF / DM groups, accuracy, F1, AUROC and ECE per data set) from
run directories, naming models and data sets from each run's config.yaml."""

import csv
import json

import pytest
import yaml

from cli import main
from decisions.statistics import bootstrap_intervals
from reports.studies import read_run as read_predictions
from tests.helpers.runs import TINY_UNET
from tools.results_table import describe_data, describe_model
from tools.results_table import main as results_table

TINY_RUN = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.max_steps=2",
    "--data.init_args.image_size=16",
    "--data.init_args.num_train=8",
    "--data.init_args.num_val=4",
    "--data.init_args.num_test=6",
    "--global_batch_size=4",
]


def train_and_test(root, config, *extra):
    args = [f"--config=configs/{config}.yaml", f"--trainer.default_root_dir={root}", *TINY_RUN, *extra]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path=last"])


def test_the_table_from_real_baseline_and_diffusion_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    train_and_test(
        runs / "resnet18_skin", "baseline_demo", "--data.init_args.kind=skin", "--model.init_args.mc_dropout_passes=0"
    )
    train_and_test(runs / "unet_chest", "demo", *TINY_UNET, "--model.init_args.val_steps=2",
                   "--model.init_args.classification.num_steps=3")  # fmt: skip
    (runs / "not_tested_yet").mkdir()  # a run without test results is skipped, not an error
    capsys.readouterr()

    markdown = results_table(
        [str(p) for p in sorted(runs.iterdir())]
        + ["--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")]
    )
    assert capsys.readouterr().out == markdown == (tmp_path / "t.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == (
        "| group | model | Synthetic chest accuracy (%) | Synthetic chest F1 | Synthetic chest AUROC"
        " | Synthetic chest ECE"
        " | Synthetic skin accuracy (%) | Synthetic skin F1 | Synthetic skin AUROC | Synthetic skin ECE |"
    )
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| CNN", "ResNet-18"], ["| DM", "UNet"]]
    assert lines[2].split(" | ")[2:6] == ["-"] * 4  # no ResNet-18 run on the chest images
    assert lines[3].endswith("| - | - | - | - |")  # nor a UNet run on the skin images

    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [(r["group"], r["model"]) for r in rows] == [("CNN", "ResNet-18"), ("DM", "UNet")]
    for row, run, dataset in zip(rows, ["resnet18_skin", "unet_chest"], ["Synthetic skin", "Synthetic chest"]):
        (metrics_file,) = (runs / run).rglob("metrics.json")
        metrics = json.loads(metrics_file.read_text())
        assert float(row[f"{dataset} accuracy (%)"]) == pytest.approx(100 * metrics["accuracy"])
        assert float(row[f"{dataset} F1"]) == pytest.approx(metrics["f1"])
        assert float(row[f"{dataset} AUROC"]) == pytest.approx(metrics["auroc"], nan_ok=True)
        assert float(row[f"{dataset} ECE"]) == pytest.approx(metrics["ece"])
        low, high = (
            float(row[f"{dataset} accuracy (%) 95 % CI low"]),
            float(row[f"{dataset} accuracy (%) 95 % CI high"]),
        )
        assert f"{100 * metrics['accuracy']:.1f} [{low:.1f}, {high:.1f}] | {metrics['f1']:.3f}" in markdown
        # the interval is the stratified bootstrap of the run's own test predictions
        tested = read_predictions(metrics_file.parent)
        interval = bootstrap_intervals(tested["labels"], tested["probs"], tested["predictions"])["accuracy"]
        assert (low, high) == pytest.approx((100 * interval["low"], 100 * interval["high"]))
        assert low <= 100 * metrics["accuracy"] <= high
    assert rows[0]["Synthetic chest accuracy (%)"] == rows[1]["Synthetic skin accuracy (%)"] == ""


def write_run(root, model, data, metrics):
    folder = root / "tensorboard" / "version_0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": data}))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def baseline(backbone):
    return {"class_path": "lightning_modules.BaselineClassifier", "init_args": {"backbone": backbone}}


def data(name, **args):
    return {"class_path": f"datamodules.{name}", "init_args": args}


def test_paper_layout_groups_and_order(tmp_path):
    dit = {
        "class_path": "lightning_modules.DiffusionClassifier",
        "init_args": {
            "network": {
                "class_path": "networks.DiT",
                "init_args": {"patch_size": 4, "hidden_size": 768, "depth": 12, "num_heads": 12},
            }
        },
    }
    scores = lambda acc: {"accuracy": acc, "f1": acc - 0.001, "auroc": 0.95, "ece": 0.05}  # noqa: E731
    write_run(tmp_path / "a", dit, data("ISICDataModule", root="x"), scores(0.904))
    write_run(tmp_path / "b", baseline("swin_b"), data("CheXpertDataModule", root="x"), scores(0.861))
    write_run(tmp_path / "c", baseline("resnet50"), data("ISICDataModule", root="x"), scores(0.936))
    write_run(tmp_path / "d", baseline("resnet18"), data("CheXpertDataModule", root="x"), scores(0.909))
    write_run(
        tmp_path / "e", baseline("resnet18"), data("ISICDataModule", root="x"), {**scores(0.944), "auroc": float("nan")}
    )
    markdown = results_table([str(tmp_path / name) for name in "abcde"])
    assert markdown.splitlines() == [
        "| group | model | CheXpert accuracy (%) | CheXpert F1 | CheXpert AUROC | CheXpert ECE"
        " | ISIC accuracy (%) | ISIC F1 | ISIC AUROC | ISIC ECE |",
        "|" + "|".join([" --- "] * 10) + "|",
        "| CNN | ResNet-18 | 90.9 | 0.908 | 0.950 | 0.050 | 94.4 | 0.943 | n/a | 0.050 |",
        "|  | ResNet-50 | - | - | - | - | 93.6 | 0.935 | 0.950 | 0.050 |",
        "| TF | Swin-B | 86.1 | 0.860 | 0.950 | 0.050 | - | - | - | - |",
        "| DM | DiT-B/4 | - | - | - | - | 90.4 | 0.903 | 0.950 | 0.050 |",
    ]


def test_models_and_data_sets_are_named_from_the_config():
    assert describe_model(baseline("vit_s16")) == ("TF", "ViT-S/16")
    assert describe_model(baseline("efficientnet_b4")) == ("CNN", "EfficientNet-B4")
    flips = baseline("resnet18")
    flips["init_args"]["test_time_flips"] = True
    assert describe_model(flips) == ("CNN", "ResNet-18 + test-time flips")
    unet = {
        "class_path": "lightning_modules.DiffusionClassifier",
        "init_args": {"network": {"class_path": "networks.ClassConditionalUNet"}},
    }
    assert describe_model(unet) == ("DM", "UNet")
    assert describe_data(data("MedMNISTDataModule", flag="pneumoniamnist")) == "PneumoniaMNIST"
    assert describe_data(data("SyntheticDataModule", kind="skin")) == "Synthetic skin"
    assert describe_data(data("ISICDataModule")) == "ISIC"


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        results_table([str(tmp_path)])


def test_calibrated_runs_add_referral_and_conformal_columns_and_untrained_runs_are_left_out(tmp_path):
    calibrated = {
        "accuracy": 0.8, "f1": 0.79, "auroc": 0.9, "ece": 0.1,
        "selective": {"test": {"accuracy": 0.95, "coverage": 0.6}},
        "conformal": {"class_conditional": {"test": {"coverage": 0.91, "mean_set_size": 1.25}}},
    }  # fmt: skip
    write_run(tmp_path / "a", baseline("resnet18"), data("CheXpertDataModule", root="x"), calibrated)
    write_run(
        tmp_path / "b", baseline("resnet50"), data("CheXpertDataModule", root="x"), calibrated | {"checkpoint": None}
    )
    lines = results_table([str(tmp_path / "a"), str(tmp_path / "b")]).splitlines()
    assert lines[0].endswith(
        " | CheXpert referral accuracy (%) | CheXpert kept | CheXpert set coverage | CheXpert set size |"
    )
    assert lines[2] == "| CNN | ResNet-18 | 80.0 | 0.790 | 0.900 | 0.100 | 95.0 | 0.60 | 0.910 | 1.25 |"
    assert len(lines) == 3  # the run tested without a checkpoint is not in the table
