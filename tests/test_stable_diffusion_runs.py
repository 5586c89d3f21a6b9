"""The Stable Diffusion configs through the real CLI on the tiny random Stable Diffusion (fine-tuning on
combined data, classification configs, refusals), and its counterfactual explanations."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli import main
from datamodules import CombinedDataModule
from diffusion.explain import ExplainSettings
from diffusion.sampler import ddim_sample, noise_to
from diffusion.schedule import DiscreteSchedule
from lightning_modules import StableDiffusionClassifier
from networks.stable_diffusion import PAPER_PROMPTS, LatentTransform, PromptDenoiser
from tests.helpers.models import flip_rate_of
from tests.helpers.stable_diffusion import IMAGE_SIZE, tiny_test_batch
from tools.experiments import load_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models gain nothing from threads


@pytest.fixture
def in_repo_root(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def synthetic_overrides(kind):
    return [
        "--data=datamodules.SyntheticDataModule",
        f"--data.init_args.kind={kind}",
        f"--data.init_args.image_size={IMAGE_SIZE}",
        "--data.init_args.num_train=4",
        "--data.init_args.num_val=2",
        "--data.init_args.num_test=3",
        "--global_batch_size=2",
        "--data.init_args.num_workers=0",
    ]


CLI_QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.gradient_checkpointing=false",
]


def synthetic_source(kind):
    return (
        f"{{class_path: datamodules.SyntheticDataModule, init_args: {{kind: {kind}, image_size: {IMAGE_SIZE}, "
        "num_train: 2, num_val: 2, num_test: 2, num_workers: 0}}"
    )


@pytest.mark.parametrize(
    "config,kind",
    [("sd_zeroshot_chexpert", "chest"), ("sd_zeroshot_isic", "skin"), ("sd_chexpert", "chest"), ("sd_isic", "skin")],
)
def test_classification_configs_parse_and_build_the_model(config, kind, weights, tmp_path, in_repo_root):
    cli = load_experiment(
        f"configs/{config}.yaml",
        overrides=[
            f"--model.init_args.weights_dir={weights}",
            f"--trainer.default_root_dir={tmp_path}",
            *CLI_QUIET,
            *synthetic_overrides(kind),
            "--model.init_args.finetuned_checkpoint=null",
        ],
    )
    model = cli.model
    assert isinstance(model, StableDiffusionClassifier) and model.prediction_type == "epsilon"
    expected = ["no_finding", "pleural_effusion"] if kind == "chest" else ["benign", "melanoma"]
    assert model.class_names == expected and model.class_prompts == [PAPER_PROMPTS[name] for name in expected]
    assert model.classification.num_steps == 501 and model.classification.rule == "majority"
    if config in ("sd_chexpert", "sd_isic"):  # paper Fig. 4: t0 0.5 (CheXpert) / 0.3 (ISIC), w 7.5, 256 DDIM steps
        assert model.hparams.explain is False
        explanation = model.explanation
        assert (explanation.t0, explanation.guidance_scale, explanation.sampling_steps) == (
            0.5 if kind == "chest" else 0.3,
            7.5,
            256,
        )
    assert cli.trainer.precision == "32-true"  # overridden here; the configs ask for bf16-mixed


def test_finetune_config_trains_on_combined_data_and_a_test_config_classifies_with_its_checkpoint(
    weights, tmp_path, in_repo_root
):
    sources = f"--data.init_args.datamodules=[{synthetic_source('chest')}, {synthetic_source('skin')}]"
    fit = main(
        [
            "fit",
            "--config=configs/sd_finetune.yaml",
            f"--model.init_args.weights_dir={weights}",
            sources,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--global_batch_size=2",
            "--data.init_args.num_workers=0",
            "--model.init_args.classification.num_steps=3",
            *CLI_QUIET,
        ]
    )
    assert fit.trainer.global_step == 1 and isinstance(fit.datamodule, CombinedDataModule)
    assert fit.model.class_names == ["no_finding", "pleural_effusion", "benign", "melanoma"]
    assert fit.model.hparams.learning_rate == 1e-5 and fit.trainer.max_steps == 1
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    tuned_unet = {k: v.clone() for k, v in fit.model.unet.state_dict().items()}

    test = main(
        [
            "test",
            "--config=configs/sd_chexpert.yaml",
            f"--model.init_args.weights_dir={weights}",
            f"--model.init_args.finetuned_checkpoint={checkpoint}",
            "--model.init_args.classification.num_steps=3",
            f"--trainer.default_root_dir={tmp_path / 'test'}",
            *CLI_QUIET,
            *synthetic_overrides("chest"),
        ]
    )
    model = test.model
    assert model.class_names == ["no_finding", "pleural_effusion"]
    assert model.class_prompts == [PAPER_PROMPTS["no_finding"], PAPER_PROMPTS["pleural_effusion"]]
    assert all(torch.equal(v, tuned_unet[k]) for k, v in model.unet.state_dict().items())
    metrics = json.loads(next((tmp_path / "test").rglob("metrics.json")).read_text())
    assert metrics["n_images"] == 3 and metrics["n_steps"] == 3
    with pytest.raises(FileNotFoundError, match="run configs/sd_finetune.yaml first"):
        StableDiffusionClassifier(str(weights), finetuned_checkpoint=str(tmp_path / "nothing.ckpt"))


def test_configs_without_weights_dir_are_refused(tmp_path, capsys, in_repo_root):
    for config in ("sd_finetune", "sd_zeroshot_chexpert", "sd_zeroshot_isic", "sd_chexpert", "sd_isic"):
        with pytest.raises(SystemExit):
            main(["test", f"--config=configs/{config}.yaml", *CLI_QUIET, *synthetic_overrides("chest")])
        assert "weights_dir" in capsys.readouterr().err
    with pytest.raises((ValueError, FileNotFoundError), match=r"Stable Diffusion weights at .*nowhere"):
        main(
            [
                "test",
                "--config=configs/sd_zeroshot_chexpert.yaml",
                f"--model.init_args.weights_dir={tmp_path / 'nowhere'}",
                *CLI_QUIET,
                *synthetic_overrides("chest"),
            ]
        )


# ---- counterfactual explanations (predict with explain: true) ------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_in_discrete_time_returns_the_clean_latent_of_an_oracle_unet(prediction_type, chest_model):
    """The sampler's alpha, sigma (DiscreteSchedule at continuous t) and the UNet's timestep agree at
    every step, the last one (t = t0 / steps -> timestep 1 or 2, then t = 0 -> timestep 0) included:
    a UNet that knows the clean latent x is sampled back to x exactly, whatever the steps."""
    scheduler = chest_model.noise_scheduler
    x = torch.randn(2, 4, 8, 8)

    def oracle(z, timesteps, encoder_hidden_states, return_dict):
        clean = x.repeat(len(z) // len(x), 1, 1, 1)  # guidance: conditional and unconditional rows of the same z
        alpha_squared = scheduler.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
        eps = ((z.double() - alpha_squared.sqrt() * clean.double()) / (1 - alpha_squared).sqrt()).float()
        return (eps if prediction_type == "epsilon" else scheduler.get_velocity(clean, eps, timesteps),)

    schedule = DiscreteSchedule(scheduler.alphas_cumprod)
    denoiser = PromptDenoiser(oracle, torch.zeros(3, 16, 32), schedule, prediction_type)
    for t0, steps in ((0.5, 7), (0.3, 256), (0.01, 30)):  # 256 steps over 300 timesteps; 30 over 10 (repeats)
        z = noise_to(x, torch.randn_like(x), t0, schedule)
        sample = ddim_sample(denoiser, z, torch.tensor([0, 1]), schedule, t0, steps, guidance_scale=7.5, null_label=2)
        torch.testing.assert_close(sample, x, atol=1e-4, rtol=1e-4)


def test_latent_transform_matches_the_classifier_latents_and_keeps_grey_images_grey(chest_model):
    vae = chest_model.vae
    colour, grey = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1, (torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1)
    images = torch.cat([colour[:1], grey[:1].expand(-1, 3, -1, -1), colour[1:]])
    transform = LatentTransform(vae, 3, torch.tensor([False, True, False]), max_batch=2)
    latents = transform.encode(images)
    torch.testing.assert_close(latents, chest_model.encode(images))  # the mean latent, scaled, as classified
    raw = vae.decode(latents.repeat_interleave(2, dim=0) / vae.config.scaling_factor).sample  # 2 rows per image
    pixels = transform.decode(latents.repeat_interleave(2, dim=0))
    torch.testing.assert_close(pixels[[0, 1, 4, 5]], raw[[0, 1, 4, 5]])  # colour: the decoder's 3 channels
    torch.testing.assert_close(pixels[2:4], raw[2:4].mean(1, keepdim=True).expand(-1, 3, -1, -1))  # grey stays grey
    one_channel = LatentTransform(vae, 1)
    assert one_channel.decode(one_channel.encode(grey)).shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_explanations_at_t0_zero_are_the_vae_round_trip_and_the_seed_fixes_them(chest_model):
    model = chest_model
    batch = tiny_test_batch()  # grey chest images, 3 equal channels
    images, predictions = batch["image"], torch.tensor([1, 0])
    record = model.explain(batch, predictions, ExplainSettings(t0=0.0, flip_steps=2))
    # the tiny VAE is no identity: compare with decode(encode(x)), grey (channel mean) like the input
    round_trip = model.vae.decode(model.encode(images) / model.vae.config.scaling_factor).sample
    expected = round_trip.mean(1, keepdim=True).expand(-1, 3, -1, -1).clamp(-1, 1)
    torch.testing.assert_close(record["reconstructions"], expected.unsqueeze(1).expand(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert record["maps"].abs().max() == 0 and record["signed"].all()  # grey inputs: signed maps
    assert record["flip"].shape == (2, 2) and torch.equal(record["factual"], predictions)

    settings = ExplainSettings(t0=0.5, sampling_steps=3, flip_steps=0)
    first, again = (model.explain(batch, predictions, settings)["reconstructions"] for _ in range(2))
    other_seed = model.explain(batch, predictions, ExplainSettings(t0=0.5, sampling_steps=3, flip_steps=0, seed=1))
    assert torch.equal(first, again) and not torch.allclose(first, other_seed["reconstructions"])
    assert "flip" not in other_seed  # flip_steps = 0: no flip check
    assert not torch.allclose(first[:, 0], first[:, 1])  # the class prompt changes the reconstruction
    assert (first[:, :, :1] == first).all()  # still grey


def test_predict_with_explain_writes_pngs_npz_and_explain_json(weights, tmp_path, in_repo_root):
    cli = main(
        [
            "predict",
            "--config=configs/sd_isic.yaml",
            f"--model.init_args.weights_dir={weights}",
            "--model.init_args.finetuned_checkpoint=null",
            "--model.init_args.classification.num_steps=2",
            "--model.init_args.explain=true",
            "--model.init_args.explanation.sampling_steps=2",
            "--model.init_args.explanation.flip_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            *CLI_QUIET,
            *synthetic_overrides("skin"),
        ]
    )
    run = tmp_path / "tensorboard" / f"version_{cli.trainer.logger.version}"
    folder = run / "explanations"
    assert sorted(p.name for p in folder.glob("image_*.png")) == ["image_6.png", "image_7.png", "image_8.png"]
    assert (folder / "summary.png").is_file()
    arrays = [np.load(path) for path in sorted(folder.glob("ids_*.npz"))]
    assert sorted(int(i) for a in arrays for i in a["id"]) == [6, 7, 8]
    assert {
        "id",
        "factual",
        "images",
        "reconstructions",
        "maps",
        "signed",
        "l1",
        "l2",
        "inside",
        "outside",
        "flip",
        "flip_prediction",
        "label",
    } <= set(arrays[0].files)
    assert arrays[0]["reconstructions"].shape[1:] == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert arrays[0]["maps"].shape[1:] == (2, IMAGE_SIZE, IMAGE_SIZE) and not arrays[0]["signed"].any()  # colour
    numbers = json.loads((run / "explain.json").read_text())
    assert {
        "n_images",
        "n_counterfactuals",
        "flip_rate",
        "factual_kept_rate",
        "flip_rate_by_target",
        "concentration_ratio",
        "l1_input_factual",
        "l2_input_counterfactual",
        "settings",
    } <= set(numbers)
    arrays = [np.load(path) for path in (run / "explanations").glob("ids_*.npz")]
    assert numbers["n_images"] == 3 and numbers["n_counterfactuals"] == 3
    assert numbers["flip_rate"] == pytest.approx(flip_rate_of(arrays))
    assert numbers["settings"]["t0"] == 0.3 and numbers["settings"]["sampling_steps"] == 2  # sd_isic.yaml's t0
    assert (run / "predictions.csv").read_text().count("\n") == 1 + 3  # predictions are still written


def test_new_images_are_classified_and_explained_without_a_checkpoint_of_ours(weights, tmp_path):
    """Zero-shot Stable Diffusion is a complete classifier from its weights folder: predict on a folder
    of new images (datamodules.ImagesDataModule) needs no --ckpt_path, and explains them too."""
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(folder / f"scan_{i}.png")
    cli = main([
        "predict", "--config=configs/sd_zeroshot_chexpert.yaml", f"--model.init_args.weights_dir={weights}",
        "--data=datamodules.ImagesDataModule", f"--data.init_args.source={folder}",
        f"--data.init_args.image_size={IMAGE_SIZE}",
        "--data.init_args.class_names=[no_finding, pleural_effusion]", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--global_batch_size=2", "--model.init_args.classification.num_steps=3", "--model.init_args.explain=true",
        "--model.init_args.explanation.sampling_steps=2", "--model.init_args.explanation.flip_steps=0", *CLI_QUIET,
    ])  # fmt: skip
    rows = (Path(cli.trainer.log_dir) / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("id,path,prediction,predicted_class")
    assert json.loads((Path(cli.trainer.log_dir) / "explain.json").read_text())["n_images"] == 3
