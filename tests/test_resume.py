"""`fit --ckpt_path last` continues a stopped run exactly, through the real CLI on CPU.

Two runs of the same tiny experiment on a small CSV image folder (so that the datamodule writes
splits.csv): one trains 2 epochs straight; the other trains 1 epoch, stops, and is resumed with
`--ckpt_path last --trainer.max_epochs 2`. With deterministic settings they must end with the same
global step, the same data order, the same raw and EMA weights, the same Adam state and the same
learning-rate schedule; the resumed run must reuse its split and its TensorBoard version.
"""

import filecmp
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from PIL import Image

from cli import main
from lightning_modules import DiffusionClassifier
from tests.helpers.runs import tiny_args

STEPS_PER_EPOCH = 8  # 32 training images (80 % of 40) in batches of 4


class BatchRecorder(DiffusionClassifier):
    """Records the image ids of every training batch, in order."""

    def training_step(self, batch, batch_idx):
        self.__dict__.setdefault("seen_ids", []).append(batch["id"].tolist())
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """40 small grayscale PNGs in two classes (bright or dark disc), and a config for them."""
    folder = tmp_path_factory.mktemp("resume")
    rows = ["path,label,patient_id"]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:16, :16]
    disc = (y - 8) ** 2 + (x - 8) ** 2 < 25
    for i in range(40):
        label = i % 2
        pixels = rng.integers(0, 60, (16, 16)) + disc * (180 if label else 60)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{'effusion' if label else 'clear'},p{i}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "experiment.yaml").write_text(f"""
trainer:
  deterministic: true
  max_steps: -1
  callbacks:
    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {{decay: 0.9, update_starting_at_step: 0, update_every_n_steps: 1}}
model:
  class_path: tests.test_resume.BatchRecorder
data:
  class_path: datamodules.CSVDataModule
  init_args: {{root: {folder}, csv: labels.csv, image_size: 16, num_workers: 0, cache_dir: null}}
""")
    return folder / "experiment.yaml"


def fit(config: Path, root: Path, epochs: int, *extra: str):
    return main(["fit", *tiny_args(root, f"--config={config}", f"--trainer.max_epochs={epochs}"), *extra])


def versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tensorboard").glob("version_*"))


def assert_same_tensors(a, b, what):
    """Nested dicts/lists of tensors and numbers equal to float tolerance."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)
    else:
        assert a == b, what


def test_resume_from_last_equals_straight_training(experiment, tmp_path):
    straight = fit(experiment, tmp_path / "straight", epochs=2)

    resumed_root = tmp_path / "resumed"
    first = fit(experiment, resumed_root, epochs=1)  # the run "killed" after epoch 1
    assert first.trainer.global_step == STEPS_PER_EPOCH
    split = resumed_root / "splits.csv"
    split_written = split.stat().st_mtime_ns
    assert versions(resumed_root) == ["version_0"]

    resumed = fit(experiment, resumed_root, 2, "--ckpt_path=last")

    # the same steps on the same batches in the same order
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert first.model.seen_ids == straight.model.seen_ids[:STEPS_PER_EPOCH]
    assert resumed.model.seen_ids == straight.model.seen_ids[STEPS_PER_EPOCH:]
    # the same split, reused rather than rewritten; the same TensorBoard version, continued
    assert filecmp.cmp(split, tmp_path / "straight" / "splits.csv", shallow=False)
    assert split.stat().st_mtime_ns == split_written
    assert versions(resumed_root) == ["version_0"]
    assert len(list((resumed_root / "tensorboard/version_0").glob("events.out.tfevents.*"))) == 2  # both runs

    # the same raw weights, EMA weights and EMA count, Adam state and LR schedule
    end_straight, end_resumed = (
        torch.load(root / "checkpoints/last.ckpt", weights_only=False) for root in (tmp_path / "straight", resumed_root)
    )
    assert end_resumed["global_step"] == end_straight["global_step"] == 2 * STEPS_PER_EPOCH
    for key in ("state_dict", "current_model_state", "averaging_state", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(end_resumed[key], end_straight[key], key)
    ema, raw = end_resumed["state_dict"], end_resumed["current_model_state"]
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)  # the EMA is not the raw weights

    # asked for, a new version: here a fit with nothing left to train, which still writes its config
    fit(experiment, resumed_root, 2, "--ckpt_path=last", "--new_log_version=true")
    assert versions(resumed_root) == ["version_0", "version_1"]


class LastCheckpointSteps(Callback):
    """The global step stored in last.ckpt at the start of every epoch after the first."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            self.__dict__.setdefault("steps", []).append(torch.load(path, weights_only=False)["global_step"])


def test_last_checkpoint_follows_the_run_when_the_monitored_metric_stops_improving(tmp_path):
    """With `monitor`, Lightning 2.6 rewrites last.ckpt only together with a new best; "epoch" in
    mode min is best at epoch 0 and never again, so only RunCheckpoint keeps last.ckpt current (a
    run killed in epoch 3 must resume from the end of epoch 2, not of epoch 1)."""
    from test_diffusion_classifier import tiny_args as tiny_with_validation

    cli = main(
        [
            "fit",
            *tiny_with_validation(
                tmp_path,
                "--trainer.max_steps=-1",
                "--trainer.max_epochs=3",
                "--trainer.val_check_interval=null",
                "--trainer.check_val_every_n_epoch=1",
                "--checkpoint.monitor=epoch",
                "--checkpoint.mode=min",
                "--checkpoint.save_top_k=1",
                "--trainer.callbacks+=tests.test_resume.LastCheckpointSteps",
            ),
        ]
    )
    steps_per_epoch = 6  # 24 synthetic training images in batches of 4
    assert [p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt")] == [f"epoch=0-step={steps_per_epoch}.ckpt"]
    recorder = next(
        c for c in cli.trainer.callbacks if type(c).__name__ == "LastCheckpointSteps"
    )  # imported as tests.test_resume
    assert recorder.steps == [steps_per_epoch, 2 * steps_per_epoch]


# ---- the requeue signal: saved at a batch end, resumed exactly ---------------------------------


class SignalAt(Callback):
    """Sends this process SIGUSR1 as global step 3 starts: the signal arrives inside a training step,
    as SLURM's does (on the last rank only under DDP: one rank's signal must stop them all)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3 and trainer.global_rank == trainer.world_size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


# 4 training images in batches of 4: every batch end is an epoch end, where a resume is exact
ONE_BATCH_EPOCHS = ["--data.init_args.num_train=4", "--trainer.max_steps=8"]
REQUEUE = [
    "--trainer.callbacks+=lightning_modules.callbacks.SlurmRequeue",
    "--trainer.callbacks+=tests.test_resume.SignalAt",
]


def test_the_requeue_signal_saves_at_the_next_batch_end_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(variable, raising=False)
    main(["fit", *tiny_args(tmp_path / "straight", *ONE_BATCH_EPOCHS)])
    root = tmp_path / "requeued"
    with pytest.warns(UserWarning, match=f"cannot requeue the job: .* The checkpoint {root}/hpc_ckpt_1.ckpt is saved"):
        stopped = main(["fit", *tiny_args(root, *ONE_BATCH_EPOCHS, *REQUEUE)])
    assert stopped.trainer.global_step == 4 and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler undone
    hpc = root / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=False)["global_step"] == 4
    main(["fit", *tiny_args(root, *ONE_BATCH_EPOCHS, f"--ckpt_path={hpc}")])
    straight, resumed = (
        torch.load(run / "checkpoints/last.ckpt", weights_only=False) for run in (tmp_path / "straight", root)
    )
    assert resumed["global_step"] == straight["global_step"] == 8
    assert sorted(path.name for path in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # no stale last + last-v1
    for key in ("state_dict", "current_model_state", "optimizer_states"):
        assert_same_tensors(resumed[key], straight[key], key)


def test_under_slurm_the_cli_switches_lightnings_requeue_off_for_its_own(tmp_path, monkeypatch):
    slurm_job = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unet", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    for variable, value in slurm_job.items():
        monkeypatch.setenv(variable, value)
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.max_steps=1")])
    environment = cli.trainer._accelerator_connector.cluster_environment  # a single device's strategy has none
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    assert [type(c).__name__ for c in cli.trainer.callbacks].count("SlurmRequeue") == 1
