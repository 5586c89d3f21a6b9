"""The DiffusionClassifier through the real CLI: fit, test, resume, EMA, links from the data."""

import csv
import dataclasses
import functools
import inspect
import json

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from cli import main
from lightning_modules import DiffusionClassifier
from tests.helpers import runs

tiny_args = functools.partial(runs.tiny_args, validate=True)


def test_fit_then_test_writes_checkpoints_logs_and_metrics(tmp_path):
    main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=3")])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "tensorboard").rglob("config.yaml"))

    cli = main(["test", *tiny_args(tmp_path), "--ckpt_path=last"])
    metrics_file = tmp_path / "tensorboard" / f"version_{cli.trainer.logger.version}" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["n_images"] == 7 and metrics["n_steps"] == 3
    rows = list(csv.DictReader((metrics_file.parent / "predictions.csv").open()))
    assert metrics["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in rows) / len(rows))
    logged = cli.trainer.callback_metrics
    assert metrics["accuracy"] == pytest.approx(float(logged["test/accuracy"]))


def test_data_properties_are_linked_into_the_model(tmp_path):
    cli = main(["fit", *tiny_args(tmp_path, "--data.init_args.kind=skin"), "--trainer.max_steps=1"])
    model = cli.model
    assert model.hparams.num_classes == 2 and model.class_names == ["benign", "melanoma"]
    assert model.hparams.image_size == 16 and model.network.sample_size == 8 and model.network.in_channels == 12


def test_resume_from_last_continues_the_global_step(tmp_path):
    main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=2")])
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=5"), "--ckpt_path=last"])
    assert cli.trainer.global_step == 5  # 3 more steps, not 5 from scratch
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 5
    # the learning-rate warm-up continued too: its scheduler counted all 5 steps
    assert resumed["lr_schedulers"][0]["last_epoch"] == 5


class EMARecorder(DiffusionClassifier):
    """Keeps an independent EMA of the weights and what validation_step saw."""

    decay = 0.5

    def on_train_batch_end(self, outputs, batch, batch_idx):
        current = torch.nn.utils.parameters_to_vector(self.network.parameters()).detach().clone()
        previous = getattr(self, "reference_ema", None)
        self.reference_ema = current if previous is None else self.decay * previous + (1 - self.decay) * current
        self.raw_weights = current

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.seen_in_validation = torch.nn.utils.parameters_to_vector(self.network.parameters()).detach().clone()
        return super().validation_step(batch, batch_idx)


def test_validation_and_checkpoint_use_the_ema_weights(tmp_path):
    ema_config = tmp_path / "ema.yaml"
    ema_config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
        "      init_args: {decay: 0.5, update_starting_at_step: 0, update_every_n_steps: 1}\n"
        "model:\n  class_path: tests.test_diffusion_classifier.EMARecorder\n"
    )
    cli = main(["fit", *tiny_args(tmp_path, f"--config={ema_config}", "--trainer.max_steps=3")])
    model = cli.model
    assert any(isinstance(c, EMAWeightAveraging) for c in cli.trainer.callbacks)
    # validation ran at step 3 with the EMA weights, which differ from the raw ones
    torch.testing.assert_close(model.seen_in_validation, model.reference_ema)
    assert not torch.allclose(model.seen_in_validation, model.raw_weights)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema_state = {k[len("network.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    raw_state = {
        k[len("network.") :]: v for k, v in checkpoint["current_model_state"].items() if k.startswith("network.")
    }
    names = [name for name, _ in model.network.named_parameters()]
    to_vector = lambda state: torch.cat([state[name].flatten() for name in names])  # noqa: E731
    torch.testing.assert_close(to_vector(ema_state), model.reference_ema)
    torch.testing.assert_close(to_vector(raw_state), model.raw_weights)


def test_bad_options_are_refused_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="rule"):
        main(["fit", *tiny_args(tmp_path, "--model.init_args.classification.rule=median"), "--trainer.max_steps=1"])


def test_wavelet_switch_off_models_pixels(tmp_path):
    cli = main(["fit", *tiny_args(tmp_path, "--model.init_args.wavelet=false"), "--trainer.max_steps=1"])
    network = cli.model.network
    assert (network.in_channels, network.sample_size) == (3, 16)
    assert cli.model.schedule.image_size == 16


def test_predict_returns_votes_for_every_image(tmp_path):
    main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1")])
    cli = main(["predict", *tiny_args(tmp_path), "--ckpt_path=last", "--return_predictions=true"])
    batches = cli.trainer.predict_loop.predictions
    ids = torch.cat([b["id"] for b in batches])
    votes = torch.cat([b["votes"] for b in batches])
    assert sorted(ids.tolist()) == list(range(32, 39))  # the 7 test images: ids after 24 train + 8 val
    assert (votes.sum(dim=1) == 3).all()  # test_steps votes per image
    predictions = torch.cat([b["prediction"] for b in batches])
    assert torch.equal(predictions, votes.argmax(dim=1))  # 3 votes, 2 classes: no ties


def test_same_images_same_results_at_batch_1_7_32_and_with_exact_early_exit(tmp_path):
    from torch.utils.data import DataLoader

    from diffusion.engine import ClassifierSettings
    from reports.results import concat_outputs

    cli = main(["fit", *tiny_args(tmp_path, "--data.init_args.num_test=40"), "--trainer.max_steps=2"])
    model, data = cli.model.eval(), cli.datamodule
    data.setup("test")
    settings = ClassifierSettings(num_steps=9, max_forward_batch=64)

    def run(batch_size, settings):
        loader = DataLoader(data.test_dataloader().dataset, batch_size=batch_size, shuffle=False)
        return concat_outputs([model.classify(batch, settings) for batch in loader])

    reference = run(32, settings)
    for batch_size in (1, 7):
        other = run(batch_size, settings)
        torch.testing.assert_close(other["errors"], reference["errors"], rtol=1e-4, atol=1e-6)
        assert torch.equal(other["prediction"], reference["prediction"])
        assert torch.equal(other["votes"], reference["votes"])
    exact = run(7, ClassifierSettings(num_steps=9, early_exit="exact", check_every=3, max_forward_batch=64))
    assert torch.equal(exact["prediction"], reference["prediction"])
    assert exact["forwards"].sum() < reference["forwards"].sum()


def test_a_tiny_model_learns_the_synthetic_task(calibrated_test):
    """End to end, on the CPU in about 40 s: the demo UNet trained 150 steps at batch 32 classifies
    100 synthetic test images far above chance. Measured: 0.89 accuracy (AUROC 0.97); the same run
    with the labels never reaching the network (label_dropout 1.0) scores 0.50. A broken loss, schedule,
    label conditioning or vote lands near chance, below the 0.8 asked here. (The run is also calibrated,
    for the refusal tests: that changes no metric checked here.)"""
    metrics = json.loads((calibrated_test / "metrics.json").read_text())
    assert metrics["n_images"] == 100 and metrics["accuracy"] >= 0.8 and metrics["auroc"] >= 0.85


class TrainingRecorder(DiffusionClassifier):
    """Records each training batch as the data gave it, and the model inputs and times its loss was given."""

    def on_train_batch_start(self, batch, batch_idx):
        self.seen = getattr(self, "seen", []) + [{"image": batch["image"].clone()}]

    def diffusion_loss(self, x, labels, t, eps, dropout):
        self.seen[-1] |= {"x": x.detach().clone(), "t": t.detach().clone()}
        return super().diffusion_loss(x, labels, t, eps, dropout)


def test_training_applies_the_augmentation_and_draws_t_from_the_training_band(tmp_path):
    recorder = tmp_path / "recorder.yaml"
    recorder.write_text("model:\n  class_path: tests.test_diffusion_classifier.TrainingRecorder\n")
    options = ["--model.init_args.augmentation.hflip_p=1.0", "--model.init_args.train_t_range=[0.3, 0.4]"]
    cli = main(["fit", *tiny_args(tmp_path, f"--config={recorder}", "--trainer.max_steps=2", *options)])
    seen = cli.model.seen
    assert len(seen) == 2
    for step in seen:  # every image mirrored (p = 1) before the wavelet; every t in the band (share 1)
        torch.testing.assert_close(step["x"], cli.model.encode(step["image"].flip(-1)))
        assert bool(((step["t"] >= 0.3) & (step["t"] <= 0.4)).all())


def test_test_time_views_vote_the_flipped_images_own_pairs_after_the_images(tmp_path):
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1")])
    model = cli.model.eval()
    batch = next(iter(cli.datamodule.test_dataloader()))
    both = dataclasses.replace(model.classification, views=("identity", "hflip"))
    with torch.no_grad():
        together = model.classify(batch, both)
        alone = model.classify(batch, both.view_settings(0))
        # the second view: the mirrored images classified as images of their own, with the second view's seed
        as_images = dataclasses.replace(both.view_settings(1), views=("identity",))
        mirrored = model.classify(batch | {"image": batch["image"].flip(-1)}, as_images)
    torch.testing.assert_close(together["errors"], torch.cat([alone["errors"], mirrored["errors"]], dim=2))
    assert torch.equal(together["forwards"], 2 * alone["forwards"])
    assert torch.equal(together["votes"], alone["votes"] + mirrored["votes"])


def test_the_discriminative_fine_tune_starts_at_its_step_and_reads_the_errors_the_vote_reads(tmp_path):
    assert inspect.signature(DiffusionClassifier).parameters["discriminative_weight"].default == 0  # off: the paper
    on = ["--model.init_args.discriminative_weight=1.0", "--model.init_args.discriminative_after=1",
          "--model.init_args.discriminative_images=4"]  # fmt: skip
    cli = main(["fit", *runs.tiny_args(tmp_path, "--trainer.max_steps=2", *on)])
    assert float(cli.trainer.callback_metrics["train/discriminative_loss"]) > 0
    model = cli.model.eval()
    x = model.encode(next(iter(cli.datamodule.test_dataloader()))["image"][:3])
    torch.manual_seed(5)
    errors = model.class_errors(x)
    torch.manual_seed(5)  # the same (t, eps) drawn again, the errors written out: eps_hat = sigma z + alpha v_hat
    low, high = model.classification.t_range
    t = low + (high - low) * torch.rand(3)
    eps = torch.randn_like(x)
    alpha, sigma = (value.view(-1, 1, 1, 1) for value in model.schedule.alpha_sigma(t))
    z = alpha * x + sigma * eps
    for label in range(2):
        v_hat = model.network(z, t, torch.full((3,), label))
        by_hand = (sigma * z + alpha * v_hat - eps).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(errors[:, label], by_hand, rtol=1e-4, atol=1e-6)
