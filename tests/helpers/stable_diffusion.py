"""A tiny random Stable Diffusion built here (CPU, offline) in the diffusers layout, the fixtures that
build it once per test session (registered by tests/conftest.py), and tiny synthetic data for it."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules import SyntheticDataModule
from lightning_modules import StableDiffusionClassifier
from networks.stable_diffusion import PAPER_PROMPTS

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


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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


def tiny_test_batch(kind: str = "chest") -> dict:
    """The first test batch of tiny_data(kind): 2 images (grey chest images come as 3 equal channels)."""
    data = tiny_data(kind)
    data.setup("test")
    return next(iter(data.test_dataloader()))
