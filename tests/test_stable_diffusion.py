"""StableDiffusionClassifier and CombinedDataModule on a tiny random Stable Diffusion built here (CPU, offline).

The tiny model goes through the real loading path: each part saved with `save_pretrained` in the
diffusers layout, then read back by the module with `from_pretrained(..., local_files_only=True)`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

from cli import main
from datamodules import CombinedDataModule, SyntheticDataModule
from datamodules.combined import ID_STRIDE
from diffusion.classify import ClassifierSettings, classify_images
from diffusion.explain import ExplainSettings
from diffusion.sampler import ddim_sample, noise_to
from diffusion.schedule import DiscreteSchedule
from lightning_modules import StableDiffusionClassifier
from networks.stable_diffusion import PAPER_PROMPTS, LatentTransform, MissingWeightsError, PromptDenoiser
from tests.helpers import flip_rate_of
from tools.experiments import load_experiment

PROMPT_WORDS = sorted(
    {word for prompts in PAPER_PROMPTS.values() for prompt in prompts for word in prompt.replace(",", " ").split()}
)
IMAGE_SIZE = 16  # the tiny VAE halves it: 4 x 8 x 8 latents


def write_tiny_tokenizer(folder):
    """A CLIP BPE vocabulary of the prompt words: each word merges letter by letter into one token."""
    from transformers import CLIPTokenizer

    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1, ",</w>": 2}, []
    for word in PROMPT_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(folder)
    return len(vocab)


def build_tiny_stable_diffusion(root, prediction_type="epsilon"):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    # one call per part, compact: expanded one argument per line, the four calls look alike
    # fmt: off
    vocab_size = write_tiny_tokenizer(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=2, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=IMAGE_SIZE).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type).save_pretrained(root / "scheduler")
    # fmt: on
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's waiting
    threads made a 0.1 s forward take 10 s; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def v_weights(weights, tmp_path_factory):
    """The same parts with a v-prediction scheduler config."""
    root = tmp_path_factory.mktemp("tiny-sd-v")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (root / part).symlink_to(weights / part)
    config = json.loads((weights / "scheduler" / "scheduler_config.json").read_text()) | {
        "prediction_type": "v_prediction"
    }
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def chest_model(weights):
    return StableDiffusionClassifier(
        str(weights),
        num_classes=2,
        class_names=["no_finding", "pleural_effusion"],
        image_size=IMAGE_SIZE,
        gradient_checkpointing=False,
    ).eval()


def tiny_data(kind="chest", **options):
    return SyntheticDataModule(
        kind=kind, image_size=IMAGE_SIZE, **{"num_train": 4, "num_val": 2, "num_test": 3, "batch_size": 2} | options
    )


def test_missing_sub_folders_are_named_before_anything_loads(weights, tmp_path):
    partial = tmp_path / "partial"
    for part in ("unet", "text_encoder", "scheduler"):
        shutil.copytree(weights / part, partial / part)
    with pytest.raises(
        MissingWeightsError, match=r"missing sub-folder\(s\) vae/, tokenizer/ \(expected the diffusers layout"
    ):
        StableDiffusionClassifier(str(partial))
    (partial / "vae").mkdir()  # an interrupted download: the folder without its files
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json, tokenizer/"):
        StableDiffusionClassifier(str(partial))
    with pytest.raises(MissingWeightsError, match=r"nowhere \(no such directory\)"):
        StableDiffusionClassifier(str(tmp_path / "nowhere"))


def test_loading_freezes_vae_and_text_encoder_and_reads_the_prediction_type(chest_model, v_weights):
    model = chest_model
    assert model.prediction_type == "epsilon" and model.unet.training is False
    model.train()
    assert model.unet.training and not model.vae.training and not model.text_encoder.training
    assert not any(p.requires_grad for p in [*model.vae.parameters(), *model.text_encoder.parameters()])
    assert all(p.requires_grad for p in model.unet.parameters())
    model.eval()
    assert (
        StableDiffusionClassifier(
            str(v_weights), gradient_checkpointing=False, class_names=["benign", "melanoma"]
        ).prediction_type
        == "v_prediction"
    )


def test_a_class_without_prompt_is_refused_by_name(weights):
    with pytest.raises(ValueError, match=r"no prompt for class\(es\) \['melanoma'\]"):
        StableDiffusionClassifier(str(weights), class_names=["benign", "melanoma"], prompts={"benign": "a mole"})


def test_latents_use_the_vae_scaling_factor_and_grayscale_is_repeated(chest_model):
    images = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    latents = chest_model.encode(images)
    raw = chest_model.vae.encode(images.expand(-1, 3, -1, -1)).latent_dist.mode()
    torch.testing.assert_close(latents, raw * chest_model.vae.config.scaling_factor)
    assert latents.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)


def test_text_embeddings_average_the_prompts_and_are_cached_until_they_change(weights):
    model = StableDiffusionClassifier(
        str(weights),
        class_names=["benign", "melanoma"],
        gradient_checkpointing=False,
        prompts={"benign": ["a benign skin lesion", "a skin lesion"], "melanoma": "melanoma"},
    )
    table = model.text_embeddings()
    assert table.shape == (3, 16, 32)  # two classes and the empty prompt, 16 tokens, width 32
    torch.testing.assert_close(table[0], model.encode_prompts(["a benign skin lesion", "a skin lesion"]).mean(0))
    torch.testing.assert_close(table[2], model.encode_prompts([""])[0])
    assert model.text_embeddings() is table  # cached
    model.class_prompts[1] = ["a malignant skin lesion"]
    assert not torch.equal(model.text_embeddings()[1], table[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_adapter_errors_vanish_for_a_unet_that_knows_the_true_noise(prediction_type, chest_model):
    """Closed form: a fake UNet returning the true eps (or diffusers' velocity) gives zero error in every space."""
    scheduler = chest_model.noise_scheduler
    x = torch.randn(1, 4, 8, 8)  # one image, so every row of the classifier's batch noises this x
    seen = []

    def oracle(z, timesteps, encoder_hidden_states, return_dict):
        seen.append(timesteps)
        alpha_squared = scheduler.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
        eps = ((z.double() - alpha_squared.sqrt() * x.double()) / (1 - alpha_squared).sqrt()).float()
        return (eps if prediction_type == "epsilon" else scheduler.get_velocity(x.expand_as(z), eps, timesteps),)

    schedule = DiscreteSchedule(scheduler.alphas_cumprod)
    denoiser = PromptDenoiser(oracle, torch.zeros(3, 16, 32), schedule, prediction_type)
    for space in ("eps", "x", "v"):
        settings = ClassifierSettings(num_steps=7, error_space=space, seed=3)
        errors = classify_images(denoiser, x, torch.tensor([5]), 2, schedule, settings)["errors"]
        assert errors.shape == (1, 2, 7) and errors.max() < 1e-8, (space, errors.max())
    timesteps = torch.cat(seen)
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() < 1000
    t = torch.tensor([0.0, 0.0005, 0.001, 0.5, 0.9999999])
    assert schedule.timesteps(t).tolist() == [0, 0, 1, 500, 999]  # floor(t * T): uniform over the T timesteps
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(5))


def test_classification_votes_for_every_image_and_is_reproducible(chest_model):
    model = chest_model
    data = tiny_data()
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    settings = ClassifierSettings(num_steps=5, max_forward_batch=8)
    first, again = model.classify(batch, settings), model.classify(batch, settings)
    assert (first["votes"].sum(dim=1) == 5).all() and first["votes"].shape == (2, 2)
    assert torch.isfinite(first["errors"]).all() and (first["forwards"] == 10).all()
    torch.testing.assert_close(first["errors"], again["errors"])  # same seed, same (eps, t), same errors
    other_seed = model.classify(batch, ClassifierSettings(num_steps=5, max_forward_batch=8, seed=1))
    assert not torch.equal(other_seed["errors"], first["errors"])
    alone = model.classify(
        {key: value[1:] for key, value in batch.items()}, settings
    )  # noise is per image id, not per batch
    torch.testing.assert_close(alone["errors"], first["errors"][1:], rtol=1e-4, atol=1e-6)


class TargetOracle(torch.nn.Module):
    """A UNet stand-in that returns the exact training target of known latents and noise, in closed form."""

    def __init__(self, latents, noise, alphas_cumprod, prediction_type):
        super().__init__()
        self.latents, self.noise, self.alphas_cumprod, self.prediction_type = (
            latents,
            noise,
            alphas_cumprod,
            prediction_type,
        )

    def forward(self, noisy, timesteps, encoder_hidden_states, return_dict):
        alpha_squared = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        z = alpha_squared.sqrt() * self.latents + (1 - alpha_squared).sqrt() * self.noise
        torch.testing.assert_close(noisy, z)  # the recipe's add_noise is z = alpha*x + sigma*eps
        if self.prediction_type == "epsilon":
            return (self.noise,)
        return (
            alpha_squared.sqrt() * self.noise - (1 - alpha_squared).sqrt() * self.latents,
        )  # v = alpha*eps - sigma*x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_follows_the_prediction_type(prediction_type, weights, v_weights):
    model = StableDiffusionClassifier(
        str(weights if prediction_type == "epsilon" else v_weights),
        gradient_checkpointing=False,
        class_names=["benign", "melanoma"],
    )
    latents, noise, timesteps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    model.unet = TargetOracle(latents, noise, model.noise_scheduler.alphas_cumprod, prediction_type)
    loss = model.diffusion_loss(latents, torch.tensor([0, 1, 0]), timesteps, noise, dropout=0.0)
    assert loss < 1e-10
    model.unet.prediction_type = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    assert (
        model.diffusion_loss(latents, torch.tensor([0, 1, 0]), timesteps, noise, dropout=0.0) > 1e-3
    )  # the other target


def test_one_fine_tuning_step_changes_the_unet_only(weights, tmp_path):
    model = StableDiffusionClassifier(
        str(weights), class_names=["no_finding", "pleural_effusion"], label_dropout=0.5, image_size=IMAGE_SIZE
    )  # gradient checkpointing on, as in the configs
    assert model.unet.is_gradient_checkpointing
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=tiny_data())
    assert trainer.global_step == 1
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    # every UNet tensor moved (no gradient lost to checkpointing), nothing of the VAE or the text encoder did
    assert changed == {f"unet.{name}" for name, _ in model.unet.named_parameters()}
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-5


def test_validation_loss_and_test_outputs(weights, tmp_path):
    model = StableDiffusionClassifier(
        str(weights),
        class_names=["no_finding", "pleural_effusion"],
        gradient_checkpointing=False,
        val_steps=2,
        classification=ClassifierSettings(num_steps=3, max_forward_batch=8),
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    validation = trainer.validate(model, datamodule=tiny_data(), verbose=False)[0]
    assert {"val/loss", "val/accuracy", "val/f1"} <= set(validation)
    trainer.test(model, datamodule=tiny_data(), verbose=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and metrics["n_steps"] == 3
    assert metrics["prompts"] == [PAPER_PROMPTS["no_finding"], PAPER_PROMPTS["pleural_effusion"]]
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 3


def test_combined_datamodule_concatenates_sources_with_their_own_prompt_sets():
    chest, skin = tiny_data("chest", num_train=4), tiny_data("skin", num_train=6)
    combined = CombinedDataModule([chest, skin], batch_size=5, num_workers=0)
    assert (
        combined.class_names == ["no_finding", "pleural_effusion", "benign", "melanoma"] and combined.num_classes == 4
    )
    assert combined.image_size == IMAGE_SIZE
    combined.setup()
    chest.setup()
    skin.setup()
    for split in ("train", "val", "test"):
        items = list(combined.datasets[split])
        sources = [chest.split(split), skin.split(split)]
        assert len(items) == sum(len(s) for s in sources)
        ids = [int(item["id"]) for item in items]
        assert len(set(ids)) == len(ids)
        for item in items:
            source = item["source"]
            original = sources[source][int(item["id"]) % ID_STRIDE - sources[source].id_offset]
            assert torch.equal(item["image"], original["image"]) and int(item["id"]) // ID_STRIDE == source
            # the combined label names the source's own class, so the model gives the item that class's prompts
            assert combined.class_names[int(item["label"])] == [chest, skin][source].class_names[int(original["label"])]
    batch = next(iter(combined.train_dataloader()))
    assert batch["image"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["path"] == [""] * 5
    with pytest.raises(ValueError, match="appear in several datamodules"):
        CombinedDataModule([tiny_data("chest"), tiny_data("chest")])
    with pytest.raises(ValueError, match="different image sizes"):
        CombinedDataModule([tiny_data("chest"), SyntheticDataModule(kind="skin", image_size=32)])


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
    data = tiny_data()
    data.setup("test")
    batch = next(iter(data.test_dataloader()))  # grey chest images, 3 equal channels
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
