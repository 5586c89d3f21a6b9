"""StableDiffusionClassifier and CombinedDataModule on a tiny random Stable Diffusion (tests/helpers/
stable_diffusion.py): loading, prompts, classification, training; the configs through the CLI and the
explanations: tests/test_stable_diffusion_runs.py.

The tiny model goes through the real loading path: each part saved with `save_pretrained` in the
diffusers layout, then read back by the module with `from_pretrained(..., local_files_only=True)`.
"""

import json
import shutil

import pytest
import torch
from lightning import Trainer

from datamodules import CombinedDataModule, SyntheticDataModule
from datamodules.combined import ID_STRIDE
from decisions.binding import weights_digest
from diffusion.engine import ClassifierSettings, classify_images
from diffusion.schedule import DiscreteSchedule
from lightning_modules import StableDiffusionClassifier
from lightning_modules.callbacks import ResultsWriter
from networks.stable_diffusion import PAPER_PROMPTS, MissingWeightsError, PromptDenoiser
from tests.helpers.stable_diffusion import IMAGE_SIZE, tiny_data, tiny_test_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models gain nothing from threads


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
    batch = tiny_test_batch()
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
    trainer.callbacks.append(ResultsWriter.for_model(model, None, weights_digest(model), str(tmp_path)))
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
