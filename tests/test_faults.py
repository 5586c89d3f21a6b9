"""Faults meet a clear message: a NaN loss (stop or skip), a checkpoint of another model / task /
input size, an unwritable run folder and a full disk, through the real CLI on a tiny model."""

import copy
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.nn.utils import parameters_to_vector

from cli import main
from datamodules import SyntheticDataModule
from experiment.checkpoint_check import IncompatibleCheckpoint
from experiment.run_folders import RunFolderError
from lightning_modules import DiffusionClassifier
from lightning_modules.callbacks import AtomicCheckpointIO, NonFiniteLoss, NonFiniteLossError
from tests.helpers import ROOT
from tests.helpers.runs import tiny_args

# ---- NaN / inf loss ------------------------------------------------------------------------


class NaNLossAt(DiffusionClassifier):
    """Returns a NaN training loss in the step that starts at global step 2, and records the
    weights and Adam's state after every step."""

    nan_at_step = 2

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at_step else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if not hasattr(self, "after_step"):
            self.after_step = {}
        weights = parameters_to_vector(self.network.parameters()).detach().clone()
        self.after_step[self.global_step] = (weights, copy.deepcopy(self.trainer.optimizers[0].state_dict()["state"]))


NAN_MODEL = "--model.class_path=tests.test_faults.NaNLossAt"


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    # no NonFiniteLoss in the config: the CLI adds one with action "stop"
    args = tiny_args(tmp_path, NAN_MODEL, "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=1")
    with pytest.raises(NonFiniteLossError) as raised:
        main(["fit", *args])
    message = str(raised.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert "training loss is nan at global step 2" in message
    assert f"last good checkpoint is {last}" in message and f"--ckpt_path {last}" in message
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2  # the step before the NaN, and nothing after it
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


def test_nan_loss_skip_leaves_weights_and_optimizer_unchanged_and_counts_it(tmp_path):
    skip = tmp_path / "skip.yaml"
    skip.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_modules.callbacks.NonFiniteLoss\n"
        "      init_args: {action: skip, max_skips: 2}\n"
    )
    cli = main(["fit", *tiny_args(tmp_path, NAN_MODEL, f"--config={skip}", "--trainer.max_steps=4")])
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteLoss)]
    assert [g.action for g in guards] == ["skip"]  # the config's, no default one beside it
    after = cli.model.after_step
    assert cli.trainer.global_step == 4 and sorted(after) == [1, 2, 3, 4]
    (weights_2, adam_2), (weights_3, adam_3), (weights_4, _) = after[2], after[3], after[4]
    assert torch.equal(weights_3, weights_2)  # the NaN step (global step 2 -> 3) changed nothing
    assert adam_3.keys() == adam_2.keys()
    for index in adam_2:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_3[index][name], adam_2[index][name]), (index, name)
    assert torch.isfinite(weights_4).all() and not torch.equal(weights_4, weights_3)  # training went on
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 1.0
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(state == {"skipped_steps": 1} for state in saved["callbacks"].values())


# ---- checkpoints of another model, task or input -------------------------------------------


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    """A 2-class, 16-pixel diffusion-classifier checkpoint (the session's tiny one)."""
    return tiny_checkpoint


class ThreeClassSynthetic(SyntheticDataModule):
    """The synthetic data announcing three classes (the refusal happens before any image is read)."""

    num_classes = property(lambda self: 3)
    class_names = property(lambda self: ["none", "effusion", "other"])


def test_checkpoint_of_another_model_class_is_refused(checkpoint, tmp_path):
    baseline = [
        f"--config={ROOT / 'configs/baseline_demo.yaml'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.image_size=16",
        "--model.init_args.mc_dropout_passes=0",
    ]
    with pytest.raises(IncompatibleCheckpoint) as raised:
        main(["test", *baseline, f"--ckpt_path={checkpoint}"])
    assert str(raised.value).startswith(
        f"checkpoint {checkpoint} holds a lightning_modules.DiffusionClassifier, "
        "this config has model.class_path lightning_modules.baseline_classifier.BaselineClassifier"
    )


def test_checkpoint_with_another_number_of_classes_is_refused(checkpoint, tmp_path):
    with pytest.raises(IncompatibleCheckpoint) as raised:
        main(
            [
                "test",
                *tiny_args(tmp_path, "--data=tests.test_faults.ThreeClassSynthetic", "--data.init_args.image_size=16"),
                f"--ckpt_path={checkpoint}",
            ]
        )
    assert str(raised.value).startswith(
        f"checkpoint {checkpoint} was trained with num_classes=2, this config has num_classes=3 "
        "(model.init_args.num_classes, linked from the data, data ThreeClassSynthetic)"
    )


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_checkpoint_for_another_input_size_is_refused(checkpoint, tmp_path, subcommand):
    with pytest.raises(IncompatibleCheckpoint) as raised:
        main([subcommand, *tiny_args(tmp_path, "--data.init_args.image_size=32"), f"--ckpt_path={checkpoint}"])
    assert str(raised.value).startswith(
        f"checkpoint {checkpoint} was trained with image_size=16, this config has image_size=32 "
        "(model.init_args.image_size, linked from data.init_args.image_size"
    )


def test_checkpoint_with_other_network_options_is_refused(checkpoint, tmp_path):
    expected = rf"checkpoint {re.escape(str(checkpoint))} does not fit this model: \d+ tensors differ, e\.g\. network\."
    with pytest.raises(IncompatibleCheckpoint, match=expected):
        main(
            [
                "test",
                *tiny_args(tmp_path, "--model.network.init_args.block_out_channels=[8, 16]"),
                f"--ckpt_path={checkpoint}",
            ]
        )


def test_last_is_resolved_like_lightning_before_the_check(checkpoint, tmp_path):
    # `--ckpt_path last` in the checkpoint's own run folder, with a config for 32-pixel images
    with pytest.raises(
        IncompatibleCheckpoint, match=f"checkpoint {re.escape(str(checkpoint))} was trained with image_size=16"
    ):
        main(["test", *tiny_args(checkpoint.parent.parent, "--data.init_args.image_size=32"), "--ckpt_path=last"])


# ---- run folders ---------------------------------------------------------------------------


def test_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where the run folder should go")  # root ignores chmod; mkdir under a file fails
    root = blocker / "run"
    with pytest.raises(RunFolderError, match=f"cannot write to the run folder {re.escape(str(root))}: Not a directory"):
        main(["fit", *tiny_args(root, "--trainer.max_steps=1")])


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))  # 1 MB free
    expected = rf"only 0\.00 GB free on the disk of {re.escape(str(tmp_path))}; this run needs at least 0\.\d\d GB"
    with pytest.raises(RunFolderError, match=expected):
        main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1")])
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    with pytest.raises(RunFolderError, match=r"needs at least 5\.00 GB"):
        main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1"), "--min_free_gb=5"])


def test_the_config_not_the_checkpoint_decides_the_model_options(checkpoint, tmp_path):
    # LightningCLI would overlay the checkpoint's hyperparameters (num_steps=3) for a file path
    cli = main(
        [
            "predict",
            *tiny_args(tmp_path, "--model.init_args.classification.num_steps=5"),
            "--trainer.limit_predict_batches=1",
            f"--ckpt_path={checkpoint}",
        ]
    )
    assert cli.model.classification.num_steps == 5


def test_free_space_rule_counts_frozen_parameters_once_per_checkpoint(repo_root, monkeypatch):
    from tools.experiments import load_experiment

    monkeypatch.chdir(repo_root)
    cli = load_experiment("configs/baseline_demo.yaml")
    monkeypatch.setattr(cli, "subcommand_option", lambda key: None)  # no --min_free_gb given
    parameters = list(cli.model.parameters())
    nbytes = lambda group: sum(p.numel() * p.element_size() for p in group)  # noqa: E731
    assert cli.min_free_bytes() == 8 * nbytes(parameters)
    for p in parameters[: len(parameters) // 2]:  # e.g. Stable Diffusion's frozen VAE and text encoder
        p.requires_grad_(False)
    frozen, trained = parameters[: len(parameters) // 2], parameters[len(parameters) // 2 :]
    assert cli.min_free_bytes() == 8 * nbytes(trained) + 2 * nbytes(frozen)


# ---- a checkpoint write killed in the middle ----------------------------------------------------

CHECKPOINT_VALUES = 2_000_000  # 8 MB: a write takes long enough to be killed inside it
# Lightning's own writer stages a checkpoint in the system temp folder and moves it into place. On
# a cluster that folder is node-local and the run folder on a shared file system: the move is then
# a copy into last.ckpt. /dev/shm plays the node-local disk here.
NODE_LOCAL_TEMP = Path("/dev/shm")


def keep_saving(path: str, atomic: bool, ready, temp_folder: str | None = None) -> None:
    """Child process: writes last.ckpt again and again, version 1, 2, ... (each tensor filled with its version)."""
    torch.set_num_threads(1)  # a forked child: no OpenMP pool of the parent's
    tempfile.tempdir = temp_folder
    writer = AtomicCheckpointIO() if atomic else TorchCheckpointIO()
    version = 0
    while True:
        version += 1
        values = torch.from_numpy(np.full(CHECKPOINT_VALUES, version, dtype=np.float32))
        writer.save_checkpoint({"version": version, "weights": values}, path)
        if version == 1:
            ready.set()


def kill_a_writer(path: Path, atomic: bool, delay: float, temp_folder: Path | None = None) -> str:
    """Starts a writer, SIGKILLs it `delay` s after its first checkpoint, and reads what is left:
    'intact' (a whole checkpoint of one version; 'intact, killed mid-write' when the writer's
    temporary file shows the kill landed inside a write) or 'broken'."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    writer = context.Process(target=keep_saving, args=(str(path), atomic, ready, temp_folder and str(temp_folder)))
    writer.start()
    assert ready.wait(60), "the writer never finished its first checkpoint"
    time.sleep(delay)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # a truncated zip: whatever torch.load says about it
        return "broken"
    intact = saved["weights"].shape == (CHECKPOINT_VALUES,) and bool((saved["weights"] == saved["version"]).all())
    mid_write = any(path.parent.glob(f".{path.name}.*.{writer.pid}.partial"))
    return ("intact, killed mid-write" if mid_write else "intact") if intact else "broken"


def test_a_checkpoint_write_killed_at_a_random_moment_leaves_a_loadable_last_ckpt(tmp_path):
    """SIGKILL at a random moment of a writer that saves over and over, until 20 kills (and at
    least 3 of them inside a write: most of a save is serialising, before the file is opened)."""
    delays = iter(np.random.default_rng(0).uniform(0.0, 0.3, size=200))
    outcomes = []
    while len(outcomes) < 20 or outcomes.count("intact, killed mid-write") < 3:
        outcomes.append(kill_a_writer(tmp_path / "last.ckpt", atomic=True, delay=next(delays)))
    print(f"\n{len(outcomes)} kills, {outcomes.count('intact, killed mid-write')} inside a write")
    assert set(outcomes) <= {"intact", "intact, killed mid-write"}
    # the killed writers' temporary files are removed by the next save, not left to fill the disk
    AtomicCheckpointIO().save_checkpoint({"version": 0}, tmp_path / "last.ckpt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.skipif(
    not NODE_LOCAL_TEMP.is_dir() or NODE_LOCAL_TEMP.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev,
    reason="needs /dev/shm on another file system than the test's run folder (the cluster case)",
)
def test_the_kill_test_catches_lightnings_writer_across_file_systems(tmp_path):
    """The control: Lightning's own writer, staging in a node-local temp folder, killed the same
    way, leaves a broken last.ckpt (within 100 tries)."""
    staging = Path(tempfile.mkdtemp(dir=NODE_LOCAL_TEMP))
    delays = np.random.default_rng(1).uniform(0.0, 0.3, size=100)
    try:
        outcomes = []
        for delay in delays:
            outcomes.append(kill_a_writer(tmp_path / "last.ckpt", atomic=False, delay=delay, temp_folder=staging))
            if outcomes[-1] == "broken":
                break
    finally:
        shutil.rmtree(staging)
    print(f"\nLightning's writer: last.ckpt broken after {len(outcomes)} kills")
    assert outcomes[-1] == "broken", outcomes


def test_every_cli_trainer_writes_checkpoints_atomically(tmp_path):
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1")])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


# ---- resuming across a change of weight averaging ----------------------------------------------

NO_CALLBACKS = "--trainer.callbacks=[]"  # the demo config lists EMAWeightAveraging; this removes it


@pytest.mark.parametrize("trained_with_ema", [True, False])
def test_resume_across_a_change_of_ema_is_refused_naming_checkpoint_and_option(trained_with_ema, tmp_path):
    with_ema, without = [], [NO_CALLBACKS]
    trained, resumed = (with_ema, without) if trained_with_ema else (without, with_ema)
    main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=2", *trained)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(IncompatibleCheckpoint) as raised:
        main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=4", *resumed, "--ckpt_path=last")])
    message = str(raised.value)
    assert message.startswith(f"checkpoint {last} ") and "trainer.callbacks" in message
    assert ("lists no EMAWeightAveraging" if trained_with_ema else "lists EMAWeightAveraging") in message
    # with the callbacks it was trained with, it resumes
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=4", *trained, "--ckpt_path=last")])
    assert cli.trainer.global_step == 4
