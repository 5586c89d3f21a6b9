"""Every shipped config parses, prints, and (paper-size ones) trains one step at batch 1 on CPU.

The paper configs read CheXpert / ISIC from a required `data.init_args.root`; the one-step test
swaps in the synthetic chest / skin set at 256x256 so it runs anywhere (the real datamodules have
their own tests in test_datamodules.py)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import main
from tests.shared_data import needs_pneumoniamnist

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
PAPER_CONFIGS = ["unet_chexpert", "dit_chexpert", "unet_isic", "dit_isic"]


@pytest.fixture(autouse=True)
def run_from_repo_root(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_the_paper_configs_are_all_there():
    assert {c.stem for c in CONFIGS} >= {"demo", *PAPER_CONFIGS}


@pytest.mark.parametrize("config", PAPER_CONFIGS + ["demo", "unet_pneumoniamnist"])
def test_print_config_prints_a_full_config(config, repo_root):
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", f"--config=configs/{config}.yaml", "--print_config"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for section in ("trainer:", "model:", "data:", "checkpoint:", "class_path: lightning_modules.DiffusionClassifier"):
        assert section in result.stdout


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_size_model_trains_one_step_at_batch_1(config, tmp_path, capsys):
    started = time.time()
    cli = main([
        "fit",
        f"--config=configs/{config}.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",  # bf16 is for GPUs; on CPU it is only slower
        "--trainer.max_steps=1",
        f"--data=datamodules.SyntheticDataModule",  # class switched on the command line
        f"--data.init_args.kind={'chest' if 'chexpert' in config else 'skin'}",
        "--data.init_args.image_size=256",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_last=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.every_n_train_steps=0",
        "--data.init_args.batch_size=1",
        "--data.init_args.num_train=2",
        "--data.init_args.num_workers=0",
    ])
    model = cli.model
    assert cli.trainer.global_step == 1
    assert model.hparams.image_size == 256
    assert (model.network.in_channels, model.network.sample_size) == (12, 128)
    parameters = sum(p.numel() for p in model.network.parameters())
    with capsys.disabled():
        print(f"\n{config}: {type(model.network).__name__} {parameters / 1e6:.1f} M parameters, "
              f"one step at batch 1 in {time.time() - started:.0f} s")
    # sizes of the paper's architectures: UNet of B.3 ~386 M (measured in DESIGN.md), DiT-B/4 ~130 M
    expected = 385.8e6 if "unet" in config else 129.8e6
    assert parameters == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_use_the_real_datamodules(config, repo_root):
    import yaml

    data = yaml.safe_load((repo_root / f"configs/{config}.yaml").read_text())["data"]
    expected = "datamodules.CheXpertDataModule" if "chexpert" in config else "datamodules.ISICDataModule"
    assert data["class_path"] == expected and "root" not in data["init_args"]
    assert {k: data["init_args"][k] for k in ("image_size", "batch_size", "num_workers")} == {
        "image_size": 256, "batch_size": 128, "num_workers": 8}


@pytest.mark.parametrize("config", ["unet_chexpert", "dit_isic"])  # one per data section
def test_paper_configs_refuse_a_missing_or_wrong_root(config, tmp_path, capsys):
    with pytest.raises(SystemExit):  # jsonargparse: 'Parser key "data": ... required: root'
        main(["fit", f"--config=configs/{config}.yaml", "--trainer.accelerator=cpu"])
    assert "required: root" in capsys.readouterr().err
    # jsonargparse re-raises the datamodule's DataError inside a ValueError listing it
    with pytest.raises(ValueError, match=r"data\.init_args\.root: '.*nowhere' is not a directory"):
        main(["fit", f"--config=configs/{config}.yaml", "--trainer.accelerator=cpu",
              f"--data.init_args.root={tmp_path / 'nowhere'}"])


@needs_pneumoniamnist
def test_pneumoniamnist_config_trains_on_the_real_file(tmp_path):
    cli = main([
        "fit", "--config=configs/unet_pneumoniamnist.yaml", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=8",
    ])
    assert cli.trainer.global_step == 1
    assert (cli.model.hparams.image_size, cli.model.hparams.class_names) == (32, ["normal", "pneumonia"])
    assert (cli.model.network.in_channels, cli.model.network.sample_size) == (12, 16)
