"""StableDiffusionClassifier: Stable Diffusion as a zero-shot or fine-tuned classifier (paper sec. 3.4, App. D).

Every class is a text prompt; an image is classified by which prompt lets the UNet denoise its
VAE latent best, with the same engine as the other diffusion models (`diffusion/classify.py`):
shared (eps, t) pairs per (seed, image id, step), all classes in one batched forward, majority
vote, early exit, per-image outputs, metrics.json and predictions.csv. Errors are measured in
latent space.

  fit:       the Hugging Face text-to-image recipe (App. D): VAE and text encoder frozen, DDPM
             timesteps uniform over the checkpoint's num_train_timesteps, eps or v target as its
             scheduler says, plain MSE, AdamW.
  val/test:  `DiscreteSchedule` and `PromptDenoiser` present the discrete-time eps- or
             v-prediction UNet to classify_images as the continuous-time v-denoiser it expects.
  explain:   predict with `explain: true`: the pixel-space models' counterfactuals (explanations.py)
             in latent space: encode (mean latent) -> noise to t0 -> guided DDIM toward each class
             prompt, the empty prompt as the null condition -> VAE decode -> difference maps and
             the flip check by this same classifier (`LatentTransform`, `explain`).

Prompts: one or more per class, keyed by class name. Several prompts of a class are averaged in
text-embedding space, once, into one embedding per class that training and classification both
use (a random choice per item would train on embeddings the classifier never uses). Row C of the
embedding table is the empty prompt, the null condition of classifier-free guidance.

Memory (SD2-base, 256x256 images, 32x32x4 latents): the UNet has ~866 M parameters, trained in fp32
with bf16 autocast: weights 3.5 GB + gradients 3.5 GB + AdamW's two moments 6.9 GB = 13.9 GB,
plus ~1.7 GB of bf16 weight copies made by autocast. The frozen parts hold no gradients or
optimizer states: text encoder ~340 M (1.4 GB) and VAE ~84 M (0.3 GB) in fp32. That is ~17 GB before
activations, which scale with the latent area: at 32x32 a quarter of those of the usual 512x512
fine-tuning, which itself fits a 24 GB GPU at batch 1 with gradient checkpointing. So the recipe's
batch of 4 leaves most of an 80 GB GPU free, with no 8-bit optimizer (checkpoints: ~12 GB each).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import CLIPTextModel, CLIPTokenizer

from .diffusion.classify import ClassifierSettings, classify_images
from .diffusion.explain import ExplainSettings, is_grayscale
from .diffusion.loss import drop_labels
from .diffusion.noise import seed_per_rank, shared_noise
from .diffusion.schedule import broadcast_like
from .diffusion.voting import summarize
from .evaluation import TestOutputs
from .explanations import ExplainsPredictions, ExplanationOutputs, explain_batch

# The file each diffusers sub-folder must hold (an interrupted download leaves empty folders).
WEIGHT_FOLDERS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
# Paper sec. 3.4 quotes "a benign skin lesion" and "a frontal chest xray of a sick patient with
# pleural effusion"; the other two are ours, written in the same style.
PAPER_PROMPTS = {
    "no_finding": ["a frontal chest xray of a healthy patient with no finding"],
    "pleural_effusion": ["a frontal chest xray of a sick patient with pleural effusion"],
    "benign": ["a benign skin lesion"],
    "melanoma": ["a malignant skin lesion, melanoma"],
}
VALIDATION_LOSS_SEED = -1  # as in DiffusionClassifier: a noise stream no classification seed uses
VAE_BATCH = 32  # images per VAE forward when explaining (B x C reconstructions go through the decoder)


class MissingWeightsError(FileNotFoundError):
    """The Stable Diffusion weights directory is missing or incomplete; the message says what is missing."""


def check_weights_dir(weights_dir: str | Path) -> Path:
    root = Path(weights_dir)
    missing = [f"{name}/" if not (root / name).is_dir() else f"{name}/{file}"
               for name, file in WEIGHT_FOLDERS.items() if not (root / name / file).is_file()]
    if missing:
        found = "" if root.is_dir() else " (no such directory)"
        raise MissingWeightsError(
            f"Stable Diffusion weights at {root}{found}: missing sub-folder(s) {', '.join(missing)} (expected the "
            f"diffusers layout unet/ vae/ text_encoder/ tokenizer/ scheduler/; see the README to download them once)")
    return root


class DiscreteSchedule:
    """The checkpoint's DDPM schedule seen in continuous time: t in [0, 1) -> timestep floor(t * T).

    floor makes t ~ U[0, 1) exactly uniform over the T training timesteps, as in fine-tuning, and
    alpha^2 = alphas_cumprod[timestep], sigma^2 = 1 - alpha^2 (variance preserving).
    """

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.double()

    def timesteps(self, t: Tensor) -> Tensor:
        return (t.double() * len(self.alphas_cumprod)).long().clamp(0, len(self.alphas_cumprod) - 1)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_squared = self.alphas_cumprod.to(t.device)[self.timesteps(t)]
        return alpha_squared.sqrt().to(t.dtype), (1 - alpha_squared).sqrt().to(t.dtype)


@dataclass
class PromptDenoiser:
    """classify_images' `denoiser(z, t, labels) -> v_hat` from a text-conditioned UNet.

    labels index `embeddings` (C + 1, L, D); t maps to the UNet's discrete timestep. An eps output
    becomes v through eps = sigma*z + alpha*v, so every error space of classify.py is exact.
    """

    unet: torch.nn.Module
    embeddings: Tensor
    schedule: DiscreteSchedule
    prediction_type: str

    def __call__(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        prediction = self.unet(z, self.schedule.timesteps(t), encoder_hidden_states=self.embeddings[labels],
                               return_dict=False)[0].float()
        if self.prediction_type == "v_prediction":
            return prediction
        alpha, sigma = (broadcast_like(value.float(), z) for value in self.schedule.alpha_sigma(t))
        return (prediction - sigma * z.float()) / alpha


def vae_latents(vae: AutoencoderKL, images: Tensor, sample: bool = False) -> Tensor:
    """Images in [-1, 1] (B, 1 or 3, H, W) -> scaled VAE latents: the latent distribution's mean
    (mode) unless `sample`. Grayscale (1-channel) images are repeated to the VAE's 3 channels."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.sample() if sample else posterior.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass
class LatentTransform:
    """explain_batch's `transform` for Stable Diffusion: pixels in [-1, 1] <-> scaled VAE latents.

    encode: the classifier's own latents (`vae_latents`, the mean latent: explanations are
        deterministic, and the image the classifier saw is the one explained), in fp32 so the
        DDIM loop does not run in bf16 under autocast.
    decode: latents / scaling factor (+ shift) -> VAE decoder -> pixels, `image_channels` of them.
        The VAE sees and returns 3 channels. A 1-channel input gets the channel mean back; a
        3-channel input flagged in `grayscale` (B,) (all channels equal, e.g. CheXpert as loaded)
        gets the channel mean repeated 3 times, so its reconstructions stay grey like the input,
        and explain.py's "auto" difference mode, which looks at the input, gives it a signed map.
        `grayscale` is per input image; decode's rows are image-major (image b's C class
        reconstructions are rows b*C .. b*C + C - 1, as explain_batch decodes them).
    Both run the VAE `max_batch` images at a time.
    """

    vae: AutoencoderKL
    image_channels: int = 3
    grayscale: Tensor | None = None
    max_batch: int = VAE_BATCH

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return torch.cat([vae_latents(self.vae, chunk) for chunk in images.split(self.max_batch)]).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        pixels = torch.cat([
            self.vae.decode((chunk / self.vae.config.scaling_factor + shift).to(self.vae.dtype), return_dict=False)[0]
            for chunk in latents.split(self.max_batch)]).float()
        grey = pixels.mean(dim=1, keepdim=True)
        if self.image_channels == 1:
            return grey
        if self.grayscale is None:
            return pixels
        if len(pixels) % len(self.grayscale):
            raise ValueError(f"{len(pixels)} latents to decode for {len(self.grayscale)} grayscale flags: "
                             "expected the same number of rows for every image")
        rows = self.grayscale.to(pixels.device).repeat_interleave(len(pixels) // len(self.grayscale))
        return torch.where(rows.view(-1, 1, 1, 1), grey.expand_as(pixels), pixels)


class StableDiffusionClassifier(ExplainsPredictions, L.LightningModule):
    """Stable Diffusion (diffusers layout on local disk) fine-tuned on class prompts and used as a classifier.

    Args:
        weights_dir: folder holding unet/ vae/ text_encoder/ tokenizer/ scheduler/ (e.g. stable-diffusion-2-base
            saved once with `save_pretrained`); read with local_files_only, never downloaded.
        finetuned_checkpoint: a Lightning checkpoint of a fine-tuning run (configs/sd_finetune.yaml) whose UNet
            replaces weights_dir's (its VAE and text encoder were frozen, so they are weights_dir's); unlike
            `--ckpt_path` it takes only the weights, so a 4-class CheXpert + ISIC model can classify one data set.
        prompts: class name -> prompt or list of prompts (averaged in embedding space); default PAPER_PROMPTS.
        num_classes, class_names, image_size, image_channels: linked from the datamodule by cli.py.
        learning_rate, weight_decay: AdamW (Hugging Face text-to-image recipe: 1e-5 and 1e-2).
        label_dropout: probability of training on the empty prompt instead (classifier-free guidance).
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~25% slower).
        classification: how test and predict classify; see ClassifierSettings.
        val_steps: (eps, t) pairs per image when classifying during validation; 0 logs val/loss only.
        save_errors: also save every image's C x N error matrix (errors.pt).
        explain: `predict` also explains every image (as DiffusionClassifier does): factual and
            counterfactual reconstructions toward every class prompt, difference maps, PNGs, .npz and
            explain.json (lightning_modules/explanations.py).
        explanation: how (ExplainSettings). With this model t0 is the fraction of the checkpoint's
            T DDPM timesteps the latent is noised to (t0 = 0.5: timestep 500 of 1000, diffusers'
            img2img strength 0.5); guidance_scale is w of (1 + w) * cond - w * uncond (paper eq. 5),
            the unconditional prediction being the empty prompt's, so w = 7.5 is diffusers'
            guidance_scale 8.5. The fit-time monitoring options (every_n_epochs, ...) are not used.
    """

    def __init__(self, weights_dir: str, finetuned_checkpoint: str | None = None,
                 prompts: dict[str, str | list[str]] | None = None, num_classes: int = 2,
                 class_names: list[str] | None = None, image_size: int = 256, image_channels: int = 3,
                 learning_rate: float = 1e-5, weight_decay: float = 1e-2, label_dropout: float = 0.1,
                 gradient_checkpointing: bool = True, classification: ClassifierSettings = ClassifierSettings(),
                 val_steps: int = 0, save_errors: bool = False, explain: bool = False,
                 explanation: ExplainSettings = ExplainSettings()):
        super().__init__()
        root = check_weights_dir(weights_dir)  # before any heavy work
        if finetuned_checkpoint and not Path(finetuned_checkpoint).is_file():
            raise FileNotFoundError(f"finetuned_checkpoint {finetuned_checkpoint} not found: run configs/sd_finetune.yaml "
                                    "first, or set it to null with weights_dir pointing at a fine-tuned model")
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class_names {self.class_names} for num_classes={num_classes}")
        self.class_prompts = class_prompts(self.class_names, PAPER_PROMPTS if prompts is None else prompts)
        # paths stay out of the checkpoint: `--ckpt_path` would otherwise put back the training machine's ones
        self.save_hyperparameters(ignore=["weights_dir", "finetuned_checkpoint"])
        load = lambda cls, name: cls.from_pretrained(root / name, local_files_only=True)  # noqa: E731
        # DDPMScheduler whatever sampler the checkpoint names (SD2: PNDM): its training noise schedule is what counts
        self.noise_scheduler = load(DDPMScheduler, "scheduler")
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{root / 'scheduler'}: prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        self.tokenizer = load(CLIPTokenizer, "tokenizer")
        self.text_encoder = load(CLIPTextModel, "text_encoder").requires_grad_(False).eval()
        self.vae = load(AutoencoderKL, "vae").requires_grad_(False).eval()
        self.unet = load(UNet2DConditionModel, "unet")
        if finetuned_checkpoint:
            self.unet.load_state_dict(unet_weights(finetuned_checkpoint))
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = DiscreteSchedule(self.noise_scheduler.alphas_cumprod)
        self.register_buffer("embeddings", None, persistent=False)  # cache of text_embeddings(), moves with the model
        self._embedded_prompts = None
        self.classification = classification
        self.val_classification = dataclasses.replace(classification, num_steps=max(val_steps, 1), early_exit="none")
        self.val_metrics = MetricCollection(
            {"accuracy": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes, average="macro")})
        self.test_outputs = TestOutputs(self.class_names)
        self.explanation = explanation
        self.explanation_outputs = ExplanationOutputs(self.class_names, explanation)
        if explanation.every_n_epochs > 0:
            rank_zero_warn("explanation.every_n_epochs: StableDiffusionClassifier logs no explanations during fit "
                           "(predict with explain: true explains); the option is ignored")

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # the frozen parts stay in eval mode whatever Lightning sets
        self.text_encoder.eval()
        return self

    # ---- conditioning and latents ---------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self) -> Tensor:
        """(C + 1, L, D) prompt embeddings, computed once in fp32 and again only if the prompts change."""
        if self.embeddings is None or self._embedded_prompts != self.class_prompts:
            with torch.autocast(self.device.type, enabled=False):
                self.embeddings = torch.stack([self.encode_prompts(p).mean(dim=0) for p in [*self.class_prompts, [""]]])
            self._embedded_prompts = [list(p) for p in self.class_prompts]
        return self.embeddings

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(tokens)[0]

    @torch.no_grad()
    def encode_images(self, images: Tensor, sample: bool = False) -> Tensor:
        """Images in [-1, 1] (B, 1 or 3, H, W) -> scaled VAE latents; the mean latent unless `sample`
        (training draws, as the recipe does; classification and explanations stay deterministic)."""
        return vae_latents(self.vae, images, sample)

    # ---- training -------------------------------------------------------------------------
    def diffusion_loss(self, latents: Tensor, labels: Tensor, timesteps: Tensor, noise: Tensor, dropout: float) -> Tensor:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        condition = self.text_embeddings()[drop_labels(labels, self.hparams.num_classes, dropout)]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=condition, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float())

    def on_train_start(self) -> None:
        seed_per_rank(self.trainer.world_size, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents = self.encode_images(batch["image"], sample=True)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        loss = self.diffusion_loss(latents, batch["label"], timesteps, torch.randn_like(latents), self.hparams.label_dropout)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        latents = self.encode_images(batch["image"])
        t, noise = shared_noise(batch["id"], range(1), tuple(latents.shape[1:]), VALIDATION_LOSS_SEED)
        loss = self.diffusion_loss(latents, batch["label"], self.schedule.timesteps(t[:, 0]).to(self.device),
                                   noise[:, 0].to(latents), dropout=0.0)
        self.log("val/loss", loss, batch_size=len(latents), sync_dist=True)
        if self.hparams.val_steps > 0:
            self.val_metrics.update(self.classify(batch, self.val_classification, latents)["prediction"], batch["label"])

    def on_validation_epoch_end(self) -> None:
        if self.hparams.val_steps > 0:
            self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
            self.val_metrics.reset()

    # ---- classification -------------------------------------------------------------------
    def classify(self, batch: dict, settings: ClassifierSettings, latents: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image outputs for a batch (see voting.summarize), plus forwards, errors, id, label."""
        latents = self.encode_images(batch["image"]) if latents is None else latents
        denoiser = PromptDenoiser(self.unet, self.text_embeddings(), self.schedule, self.prediction_type)
        run = classify_images(denoiser, latents, batch["id"], self.hparams.num_classes, self.schedule, settings)
        outputs = summarize(run["errors"], settings.rule) | {"forwards": run["forwards"], "errors": run["errors"]}
        return outputs | {key: batch[key] for key in ("id", "label", "path") if key in batch}

    def classify_batch(self, batch: dict) -> dict[str, Tensor]:
        """Test and predict's per-image outputs (errors only with save_errors)."""
        outputs = self.classify(batch, self.classification)
        if not self.hparams.save_errors:
            outputs.pop("errors")
        return outputs

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        outputs = self.classify_batch(batch)
        self.explain_predictions(batch, outputs["prediction"])
        return outputs

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_outputs.add(self.classify_batch(batch))

    def on_test_epoch_end(self) -> None:
        metrics = self.test_outputs.finish(self.trainer, self.classification, info={"prompts": self.class_prompts})
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        scalars |= {f"accuracy_filtered/{fraction}": v for fraction, v in metrics["accuracy_filtered"].items()}
        self.log_dict({f"test/{k}": v for k, v in scalars.items()})

    # ---- explanation ----------------------------------------------------------------------
    def explain(self, batch: dict, predictions: Tensor, settings: ExplainSettings) -> dict[str, Tensor]:
        """Factual and counterfactual reconstructions of a batch, difference maps, faithfulness numbers.

        explain_batch in latent space: `PromptDenoiser` and `DiscreteSchedule` as denoiser and
        schedule, the empty prompt (row C of the embeddings) as the null label of guidance, and
        the flip check classifies the decoded counterfactuals (pixels) with `classify`, N = flip_steps.
        """
        if settings.factual == "label" and "label" not in batch:
            raise ValueError("explanation.factual='label' needs labelled data; use factual: predicted")
        factual = batch["label"] if settings.factual == "label" else predictions
        images = batch["image"]
        transform = LatentTransform(self.vae, images.shape[1], is_grayscale(images))
        denoiser = PromptDenoiser(self.unet, self.text_embeddings(), self.schedule, self.prediction_type)
        classify_pixels = None  # flip_steps = 0: no flip check
        if settings.flip_steps > 0:
            flip_settings = dataclasses.replace(self.classification, num_steps=settings.flip_steps)

            def classify_pixels(pixels: Tensor, ids: Tensor) -> Tensor:
                return self.classify({"image": pixels, "id": ids}, flip_settings)["prediction"]

        return explain_batch(denoiser, transform, self.schedule, images, batch["id"], factual, self.hparams.num_classes,
                             self.hparams.num_classes, settings, classify_pixels, self.classification.max_forward_batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the (fine-tuned) model in the diffusers layout, usable as another run's weights_dir."""
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "scheduler": self.noise_scheduler}
        for name, part in parts.items():
            part.save_pretrained(Path(directory) / name)


def class_prompts(class_names: list[str], prompts: dict[str, str | list[str]]) -> list[list[str]]:
    """The prompt list of each class, in class order; a missing or empty one is an error naming the class."""
    missing = [name for name in class_names if not prompts.get(name)]
    if missing:
        raise ValueError(f"no prompt for class(es) {missing}; model.init_args.prompts has {sorted(prompts)}")
    return [[prompts[name]] if isinstance(prompts[name], str) else list(prompts[name]) for name in class_names]


def unet_weights(checkpoint: str | Path) -> dict[str, Tensor]:
    """The UNet's state_dict inside a StableDiffusionClassifier checkpoint (its EMA weights if trained with EMA)."""
    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    weights = {name.removeprefix("unet."): value for name, value in state.items() if name.startswith("unet.")}
    if not weights:
        raise ValueError(f"{checkpoint} holds no UNet weights (no 'unet.' keys): not a StableDiffusionClassifier checkpoint")
    return weights
