"""Every shipped config resolves to its recorded values, and (paper-size ones) trains one step at batch 1
on the CPU.

The experiment files state only what differs from configs/base/*.yaml, configs/data/*.yaml,
configs/networks/*.yaml and the code's defaults. tests/data/resolved_configs/ holds `fit --print_config`
of every experiment, written out in full: moving a setting between those files, or trimming a base file
to what differs from the defaults, must not change a value. Options added later are new keys, checked
by their own tests.

The paper configs read CheXpert / ISIC from a required `data.init_args.root`; the one-step test
swaps in the synthetic chest / skin set at 256x256 so it runs anywhere (the real datamodules have
their own tests in test_datamodules.py)."""

import time

import pytest
import yaml

from cli import main
from tests.helpers import ROOT
from tests.helpers.configs import RESOLVED, resolved
from tests.helpers.data import needs_pneumoniamnist
from tests.helpers.models import dit_parameter_count

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PAPER_CONFIGS = ["unet_chexpert", "dit_chexpert", "unet_isic", "dit_isic"]


def flat(config: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for nested dicts; lists (callbacks, sources) stay values."""
    out = {}
    for key, value in config.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def restricted(value, like):
    """`value` with only the dict keys `like` has, in lists too (options added since are new keys)."""
    if isinstance(value, dict) and isinstance(like, dict):
        return {key: restricted(value.get(key), item) for key, item in like.items()}
    if isinstance(value, list) and isinstance(like, list) and len(value) == len(like):
        return [restricted(item, other) for item, other in zip(value, like)]
    return value


def test_the_paper_configs_are_all_there():
    assert {c.stem for c in CONFIGS} >= {"demo", *PAPER_CONFIGS}
    assert {c.stem for c in CONFIGS} == {f.stem for f in RESOLVED.glob("*.yaml")}


@pytest.mark.parametrize("config", [c.stem for c in CONFIGS])
def test_every_experiment_resolves_to_its_recorded_values(config):
    recorded = flat(yaml.safe_load((RESOLVED / f"{config}.yaml").read_text()))
    now = flat(resolved(config))
    missing = sorted(set(recorded) - set(now))
    assert not missing, f"options gone from {config}: {missing}"
    assert {key: restricted(now[key], recorded[key]) for key in recorded} == recorded


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_size_model_trains_one_step_at_batch_1(config, tmp_path, capsys):
    started = time.time()
    cli = main(
        [
            "fit",
            f"--config=configs/{config}.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",  # bf16 is for GPUs; on CPU it is only slower
            "--trainer.max_steps=1",
            "--data=datamodules.SyntheticDataModule",  # class switched on the command line
            f"--data.init_args.kind={'chest' if 'chexpert' in config else 'skin'}",
            "--data.init_args.image_size=256",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--checkpoint.save_last=false",
            "--checkpoint.save_top_k=0",
            "--checkpoint.every_n_train_steps=0",
            "--global_batch_size=1",
            "--data.init_args.num_train=2",
            "--data.init_args.num_workers=0",
        ]
    )
    model = cli.model
    assert cli.trainer.global_step == 1
    assert model.hparams.image_size == 256
    assert (model.network.in_channels, model.network.sample_size) == (12, 128)
    parameters = sum(p.numel() for p in model.network.parameters())
    with capsys.disabled():
        print(
            f"\n{config}: {type(model.network).__name__} {parameters / 1e6:.1f} M parameters, "
            f"one step at batch 1 in {time.time() - started:.0f} s"
        )
    assert parameters == independent_parameter_count(config)


def independent_parameter_count(config: str) -> int:
    """The paper network's size counted without the suite's network classes: DiT-B/4 layer by layer
    (tests/helpers.py), the B.3 UNet as diffusers' own UNet2DConditionModel with cross-attention at
    16x16 and 8x8 (the two lowest of 128, 64, 32, 16, 8) plus the class-embedding table (2 classes + null)."""
    if "dit" in config:
        return dit_parameter_count(2, 12, patch=4, hidden=768, depth=12)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=12, out_channels=12, block_out_channels=(128, 128, 256, 512, 1024),
        layers_per_block=2, down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",) * 3, cross_attention_dim=512,
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    return sum(p.numel() for p in unet.parameters()) + 3 * 512


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_use_the_real_datamodules(config):
    values = resolved(config)
    data = values["data"]
    expected = "datamodules.CheXpertDataModule" if "chexpert" in config else "datamodules.ISICDataModule"
    assert data["class_path"] == expected and data["init_args"]["root"] is None
    assert (data["init_args"]["image_size"], data["init_args"]["num_workers"], values["global_batch_size"]) == (
        256,
        8,
        128,
    )


@pytest.mark.parametrize("config", ["unet_chexpert", "dit_isic"])  # one per data section
def test_paper_configs_refuse_a_missing_or_wrong_root(config, tmp_path, capsys):
    with pytest.raises(SystemExit):  # jsonargparse: 'Parser key "data": ... required: root'
        main(["fit", f"--config=configs/{config}.yaml", "--trainer.accelerator=cpu"])
    assert "required: root" in capsys.readouterr().err
    # jsonargparse re-raises the datamodule's DataError inside a ValueError listing it
    with pytest.raises(ValueError, match=r"data\.init_args\.root: '.*nowhere' is not a directory"):
        main(
            [
                "fit",
                f"--config=configs/{config}.yaml",
                "--trainer.accelerator=cpu",
                f"--data.init_args.root={tmp_path / 'nowhere'}",
            ]
        )


@needs_pneumoniamnist
def test_pneumoniamnist_config_trains_on_the_real_file(tmp_path):
    cli = main(
        [
            "fit",
            "--config=configs/unet_pneumoniamnist.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--global_batch_size=8",
        ]
    )
    assert cli.trainer.global_step == 1
    assert (cli.model.hparams.image_size, cli.model.hparams.class_names) == (32, ["normal", "pneumonia"])
    assert (cli.model.network.in_channels, cli.model.network.sample_size) == (12, 16)


# ---- the recipe study's defaults and the paper's recipe one config away (issue 38) ---------------------------
PAPER_RECIPE = "configs/base/paper_recipe.yaml"


@pytest.mark.parametrize("config", ["demo", "unet_pneumoniamnist", "unet_chexpert", "dit_isic"])
def test_the_papers_recipe_is_one_config_away(config):
    """configs/base/paper_recipe.yaml after any diffusion config gives back the paper's recipe for every lever of the
    recipe study: no augmentation, t uniform on [0, 1] in training and in the vote, one view, L2 on every band."""
    from dataclasses import asdict

    from datamodules.augmentation import DiffusionAugmentation
    from diffusion.engine import ClassifierSettings
    from tools.experiments import resolved_config

    back = resolved_config(ROOT / "configs" / f"{config}.yaml", f"--config={ROOT / PAPER_RECIPE}")["model"]["init_args"]
    assert back["augmentation"] == asdict(DiffusionAugmentation())
    assert back["train_t_range"] == [0.0, 1.0] and back["train_t_share"] == 1.0
    paper = ClassifierSettings()
    classification = back["classification"]
    assert classification["t_range"] == list(paper.t_range) and classification["views"] == list(paper.views)
    assert classification["error_norm"] == paper.error_norm and classification["band_weights"] is None
