"""Scaling out and speeding up, on CPU through the real CLI.

DDP (gloo, 2 processes): test and predict see every image exactly once. One tiny checkpoint is
trained once; `python cli.py test|predict --trainer.strategy ddp --trainer.devices 2` then runs as
a subprocess on the same checkpoint as a single-process run, on 7 test images (odd, so Lightning's
DistributedSampler pads one rank with a repeated image). The metrics must be equal key by key and
predictions.csv must hold every id once, with equal rows.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cli import main
from diffusion.noise import shared_noise
from lightning_modules import DiffusionClassifier
from tests.helpers.runs import NUM_TEST, TEST_IDS, run_cli, tiny_args

DDP = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2"]
SINGLE = ["--trainer.accelerator=cpu", "--trainer.devices=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Trained under DDP too: the suite's callbacks (NaN check, checkpoint, logger) work there."""
    root = tmp_path_factory.mktemp("ddp_fit")
    run_cli("fit", *tiny_args(root, "--trainer.max_steps=4"), *DDP)
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and saved["logger_version"] == 0 and "rng_states" in saved
    return root / "checkpoints" / "last.ckpt"


def outputs_of(root: Path) -> Path:
    (version,) = (root / "tensorboard").glob("version_*")
    return version


def read_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_test_metrics_under_ddp_equal_single_process_exactly(checkpoint, tmp_path, one_thread):
    main(["test", *tiny_args(tmp_path / "single"), *SINGLE, f"--ckpt_path={checkpoint}"])
    result = run_cli("test", *tiny_args(tmp_path / "ddp"), *DDP, f"--ckpt_path={checkpoint}")
    assert "test under DDP" in result.stdout + result.stderr  # the note on padding, from rank 0
    single, ddp = (json.loads((outputs_of(tmp_path / name) / "metrics.json").read_text()) for name in ("single", "ddp"))
    assert single["n_images"] == ddp["n_images"] == NUM_TEST
    assert set(single) == set(ddp)
    for key in single:
        assert ddp[key] == single[key], key  # exactly: every image once, the same votes
    print(
        f"\nsingle-process and DDP test metrics: accuracy {single['accuracy']}, f1 {single['f1']}, "
        f"auroc {single.get('auroc')}, ece {single.get('ece')}, n_images {single['n_images']}"
    )

    single_rows, ddp_rows = (read_rows(outputs_of(tmp_path / name) / "predictions.csv") for name in ("single", "ddp"))
    assert [int(row["id"]) for row in ddp_rows] == TEST_IDS  # each id once, sorted
    assert ddp_rows == single_rows


@pytest.fixture(scope="module")
def four_class_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("four_classes")
    main(["fit", *tiny_args(root, "--data=tests.helpers.data.FourClassSynthetic", "--trainer.max_steps=2"), *SINGLE])
    return root / "checkpoints" / "last.ckpt"


CONTRACT = ["--model.init_args.classification.num_steps=31", "--model.init_args.classification.check_every=5",
            "--model.init_args.classification.min_steps=5", "--model.init_args.classification.alpha=0.1",
            "--model.init_args.classification.max_forward_batch=16"]  # fmt: skip
PRUNING = ["--data=tests.helpers.data.FourClassSynthetic", "--model.init_args.classification.prune_after=10"]


def exact(row: dict) -> dict:
    """A predictions.csv row without its mean-error columns."""
    return {key: value for key, value in row.items() if not key.startswith("error_")}


# Each case starts a DDP run (~30 s): one (no exit, 2 classes) runs in `make test`, the other five, every
# early-exit mode and pruning, in `make test-all` (make test's 9 minutes; the exits' batch invariance on one process
# stays in make test: tests/test_diffusion_classifier.py).
ENGINE_CASES = [
    pytest.param(early_exit, classes, marks=[pytest.mark.slow] * slow)
    for early_exit, classes, slow in [("none", 2, False), ("exact", 4, True), ("sequential", 4, True),
                                      ("none", 4, True), ("exact", 2, True), ("sequential", 2, True)]
]  # fmt: skip


@pytest.mark.parametrize("early_exit, classes", ENGINE_CASES)
def test_every_row_is_the_same_at_batch_1_7_32_and_under_ddp(
    early_exit, classes, checkpoint, four_class_checkpoint, tmp_path, one_thread
):
    """The engine's promise through the CLI: an image's predictions.csv row (votes, fractions,
    entropy, score, forwards, prediction) depends on the image alone: not on the batch it is
    classified in, nor on the number of processes; with early exit and with class pruning. The mean
    errors agree to float rounding (the network's batched kernels may round differently)."""
    weights = checkpoint if classes == 2 else four_class_checkpoint
    options = [*CONTRACT, f"--model.init_args.classification.early_exit={early_exit}", *(PRUNING * (classes == 4))]
    rows = {}
    for batch in (1, 7, 32):
        main(["predict", *tiny_args(tmp_path / f"b{batch}", *options, f"--global_batch_size={batch}"), *SINGLE,
              f"--ckpt_path={weights}"])  # fmt: skip
        rows[batch] = read_rows(outputs_of(tmp_path / f"b{batch}") / "predictions.csv")
    run_cli("predict", *tiny_args(tmp_path / "ddp", *options, "--global_batch_size=4"), *DDP, f"--ckpt_path={weights}")
    rows["ddp"] = read_rows(outputs_of(tmp_path / "ddp") / "predictions.csv")
    assert [int(row["id"]) for row in rows[1]] == TEST_IDS and len(rows[1][0]) > 2 * classes
    for other in (rows[7], rows[32], rows["ddp"]):
        assert [exact(row) for row in other] == [exact(row) for row in rows[1]]
        for row, reference in zip(other, rows[1]):
            for key in row.keys() - exact(row).keys():
                assert float(row[key]) == pytest.approx(float(reference[key]), rel=1e-5), key
    forwards = [int(row["forwards"]) for row in rows[1]]
    if early_exit == "none":
        assert forwards == [classes * 31 if classes == 2 else 4 * 10 + 2 * 21] * len(TEST_IDS)
    else:
        assert min(forwards) < (2 * 31 if classes == 2 else 4 * 10 + 2 * 21)  # some image stopped early


EXPLAIN = [
    "--model.init_args.explain=true",
    "--model.init_args.explanation.sampling_steps=3",
    "--model.init_args.explanation.flip_steps=3",
]


@pytest.mark.slow  # 20-25 s of 2-process DDP; make test stays under 15 minutes (make test-all runs it)
def test_explanations_under_ddp_are_written_once_per_image_and_equal_single_process(checkpoint, tmp_path, one_thread):
    main(["predict", *tiny_args(tmp_path / "single"), *SINGLE, *EXPLAIN, f"--ckpt_path={checkpoint}"])
    run_cli("predict", *tiny_args(tmp_path / "ddp"), *DDP, *EXPLAIN, f"--ckpt_path={checkpoint}")
    for name in ("single", "ddp"):
        folder = outputs_of(tmp_path / name) / "explanations"
        assert sorted(p.name for p in folder.glob("image_*.png")) == sorted(f"image_{i}.png" for i in TEST_IDS)
        ids = [int(i) for path in folder.glob("ids_*.npz") for i in __import__("numpy").load(path)["id"]]
        assert sorted(ids) == TEST_IDS  # the raw tensors of each image once, whichever rank had it
    single, ddp = (json.loads((outputs_of(tmp_path / name) / "explain.json").read_text()) for name in ("single", "ddp"))
    # the same seeded noise per image: the same numbers on any number of processes; counts and flips
    # exactly, pixel distances to float32 rounding (a rank's batches hold other images, and a
    # convolution's summation order depends on the batch)
    assert set(ddp) == set(single)
    for key in ("n_images", "n_counterfactuals", "flip_rate", "factual_kept_rate", "flip_rate_by_target", "settings"):
        assert ddp[key] == single[key], key
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


class TrainingNoiseRecorder(Callback):
    """Writes the first training step's random draw of each rank to <root>/noise_rank<r>.txt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            state = torch.get_rng_state()
            draw = torch.rand(4).tolist()
            torch.set_rng_state(state)  # leave the run's own draws alone
            Path(trainer.default_root_dir, f"noise_rank{trainer.global_rank}.txt").write_text(repr(draw))


@pytest.mark.slow  # 20-25 s of 2-process DDP; make test stays under 15 minutes (make test-all runs it)
def test_ddp_ranks_draw_different_training_noise(tmp_path):
    run_cli(
        "fit",
        *tiny_args(tmp_path, "--trainer.max_steps=1", "--trainer.callbacks+=tests.test_ddp.TrainingNoiseRecorder"),
        *DDP,
    )
    rank0, rank1 = ((tmp_path / f"noise_rank{r}.txt").read_text() for r in (0, 1))
    assert rank0 != rank1  # seed_everything alone gives both ranks the same t and eps


# ---- training under DDP: the global batch, exact validation -----------------------------------


class SameNoiseWhateverTheSplit(DiffusionClassifier):
    """The diffusion classifier with its training noise drawn per (image id, step) instead of from
    each rank's random stream, and no label dropout: a step's gradient then depends on which images
    the global batch holds, not on how they are split over processes or micro-batches."""

    def training_step(self, batch, batch_idx):
        x = self.encode(batch["image"])
        t, eps = shared_noise(batch["id"], range(1), tuple(x.shape[1:]), seed=self.global_step)
        loss = self.diffusion_loss(x, batch["label"], t[:, 0].to(x.dtype), eps[:, 0].to(x.dtype), dropout=0.0)
        self.log("train/loss", loss)
        return loss


class StepRecorder(Callback):
    """Writes each rank's micro-batch sizes and the gradient the optimizer applies at the first step
    (after DDP's all-reduce and the accumulation) to <root>/step_rank<r>.pt."""

    def on_fit_start(self, trainer, pl_module):
        self.sizes, self.gradient = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch["image"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.gradient is None:
            self.gradient = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])

    def on_fit_end(self, trainer, pl_module):
        record = {"sizes": self.sizes, "gradient": self.gradient}
        torch.save(record, Path(trainer.default_root_dir) / f"step_rank{trainer.global_rank}.pt")


# 8 training images: one optimizer step is one epoch, so the split over ranks cannot change which
# images a step sees (only their order, which a mean does not see).
ONE_BATCH_EPOCHS = ["--model.class_path=tests.test_ddp.SameNoiseWhateverTheSplit", "--data.init_args.num_train=8",
                    "--global_batch_size=8"]  # fmt: skip


@pytest.mark.parametrize("accumulate", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_one_optimizer_step_sees_the_global_batch_on_any_number_of_processes(accumulate, tmp_path, one_thread):
    steps = ["--trainer.max_steps=1", "--trainer.callbacks+=tests.test_ddp.StepRecorder"]
    main(["fit", *tiny_args(tmp_path / "single", *ONE_BATCH_EPOCHS, *steps), *SINGLE])
    result = run_cli("fit", *tiny_args(tmp_path / "ddp", *ONE_BATCH_EPOCHS, *steps,
                                       f"--trainer.accumulate_grad_batches={accumulate}"), *DDP)  # fmt: skip
    per_device = 8 // (2 * accumulate)
    assert f"batch: global 8 = 2 process(es) x {per_device} images x {accumulate} accumulated" in result.stdout
    single = torch.load(tmp_path / "single" / "step_rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"step_rank{rank}.pt") for rank in (0, 1)]
    assert single["sizes"] == [8]
    assert [rank["sizes"] for rank in ranks] == [[per_device] * accumulate] * 2
    assert torch.equal(ranks[0]["gradient"], ranks[1]["gradient"])  # DDP's all-reduce
    # the mean gradient over all 8 images, as one process with the whole batch computes it
    torch.testing.assert_close(ranks[0]["gradient"], single["gradient"], rtol=1e-4, atol=1e-7)
    assert single["gradient"].norm() > 0


def logged_values(root: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(outputs_of(root)))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_validation_during_ddp_fit_counts_each_image_once_and_picks_the_same_best_checkpoint(tmp_path, one_thread):
    """9 validation images: DistributedSampler pads them to 10 on 2 ranks, repeating one. Counted
    twice, the repeat would make val/accuracy k/10 instead of k/9 and could move the best checkpoint."""
    options = [*ONE_BATCH_EPOCHS, "--data.init_args.num_val=9", "--trainer.max_steps=12",
               "--trainer.limit_val_batches=1.0", "--trainer.val_check_interval=1.0",
               "--trainer.check_val_every_n_epoch=2", "--checkpoint.monitor=val/accuracy", "--checkpoint.mode=max",
               "--checkpoint.filename=best-{step}", "--model.init_args.learning_rate=3e-3"]  # fmt: skip
    main(["fit", *tiny_args(tmp_path / "single", *options), *SINGLE])
    run_cli("fit", *tiny_args(tmp_path / "ddp", *options), *DDP)
    single, ddp = (logged_values(tmp_path / name, "val/accuracy") for name in ("single", "ddp"))
    print(f"\nval/accuracy by step, single process: {single}; DDP: {ddp}")
    assert len(single) == 6 and [step for step, _ in single] == [step for step, _ in ddp]
    assert all(round(value * 9) == pytest.approx(value * 9, abs=1e-4) for _, value in single)  # k / 9
    assert ddp == single
    best = {}
    for name in ("single", "ddp"):
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
        (checkpoint_state,) = (value for key, value in state.items() if key.startswith("RunCheckpoint"))
        best[name] = (Path(checkpoint_state["best_model_path"]).name, float(checkpoint_state["best_model_score"]))
    assert best["ddp"] == best["single"]
    assert best["single"][1] == max(value for _, value in single)
