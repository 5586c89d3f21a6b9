"""The private Lightning APIs of experiment/checkpoint_internals.py still exist and still mean
what the suite relies on. A Lightning upgrade that changes one fails here, by name."""

import inspect

import lightning
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from experiment import checkpoint_internals as internals


def test_the_installed_lightning_is_the_minor_release_they_were_checked_against():
    checked = internals.CHECKED_AGAINST.rsplit(".", 1)[0]
    assert lightning.__version__.startswith(checked + "."), (
        f"lightning {lightning.__version__}: re-check experiment/checkpoint_internals.py against it "
        f"(written for {internals.CHECKED_AGAINST}), then update CHECKED_AGAINST"
    )


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("_should_save_on_train_epoch_end", ["self", "trainer"]),
        ("_should_skip_saving_checkpoint", ["self", "trainer"]),
        ("_save_last_checkpoint", ["self", "trainer", "monitor_candidates"]),
        ("_monitor_candidates", ["self", "trainer"]),
    ],
)
def test_model_checkpoint_methods(name, parameters):
    method = getattr(ModelCheckpoint, name, None)
    assert callable(method), f"ModelCheckpoint.{name} is gone"
    assert list(inspect.signature(method).parameters) == parameters


def trained_trainer(tmp_path) -> tuple[Trainer, ModelCheckpoint]:
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        limit_val_batches=0,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    return trainer, callback


def test_model_checkpoint_state_and_saving_last(tmp_path):
    trainer, callback = trained_trainer(tmp_path)
    assert internals.last_saved_step(callback) == trainer.global_step == 2
    assert internals.saves_on_train_epoch_end(callback, trainer) is True  # no validation: checkpoints at epoch end
    assert internals.may_save_now(callback, trainer) is False  # not fitting any more
    (tmp_path / "last.ckpt").unlink()
    internals.save_last(callback, trainer)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_checkpoint_path_resolution_is_lightnings(tmp_path):
    trainer, _ = trained_trainer(tmp_path)
    assert internals.resolve_checkpoint_path(trainer, "test", None) is None  # nothing to load
    assert internals.resolve_checkpoint_path(trainer, "test", "last") == str(tmp_path / "last.ckpt")
    assert internals.resolve_checkpoint_path(trainer, "validate", str(tmp_path / "x.ckpt")) == str(tmp_path / "x.ckpt")


def test_lightning_cli_hooks_the_mixin_overrides():
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None)), "LightningCLI._parse_ckpt_path is gone"
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI), "LightningCLI no longer calls _parse_ckpt_path"
    assert list(inspect.signature(LightningCLI._get).parameters) == ["self", "config", "key", "default"]
