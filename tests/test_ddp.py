"""Scaling out and speeding up, on CPU through the real CLI.

DDP (gloo, 2 processes): test and predict see every image exactly once. One tiny checkpoint is
trained once; `python cli.py test|predict --trainer.strategy ddp --trainer.devices 2` then runs as
a subprocess on the same checkpoint as a single-process run, on 7 test images (odd, so Lightning's
DistributedSampler pads one rank with a repeated image). The metrics must be equal key by key and
predictions.csv must hold every id once, with equal rows.

Speed switches: bf16-mixed in the GPU paper configs and nowhere on CPU; CompileNetwork and
ChannelsLast switched on for a tiny CPU run (and off on CPU unless asked).
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cli import main
from lightning_modules.callbacks import ChannelsLast, CompileNetwork
from tests.helpers import EXPERIMENTS, NUM_TEST, TEST_IDS, resolved, run_cli, tiny_args

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


@pytest.fixture
def one_thread():
    """The single-process reference runs in this process (no second start-up of Python, torch and
    Lightning, ~15 s each) with the one thread per process that the DDP ranks get."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    main(["fit", *tiny_args(root, "--data=tests.helpers.FourClassSynthetic", "--trainer.max_steps=2"), *SINGLE])
    return root / "checkpoints" / "last.ckpt"


CONTRACT = ["--model.init_args.classification.num_steps=31", "--model.init_args.classification.check_every=5",
            "--model.init_args.classification.min_steps=5", "--model.init_args.classification.alpha=0.1",
            "--model.init_args.classification.max_forward_batch=16"]  # fmt: skip
PRUNING = ["--data=tests.helpers.FourClassSynthetic", "--model.init_args.classification.prune_after=10"]


def exact(row: dict) -> dict:
    """A predictions.csv row without its mean-error columns."""
    return {key: value for key, value in row.items() if not key.startswith("error_")}


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("early_exit", ["none", "exact", "sequential"])
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


def test_ddp_ranks_draw_different_training_noise(tmp_path):
    run_cli(
        "fit",
        *tiny_args(tmp_path, "--trainer.max_steps=1", "--trainer.callbacks+=tests.test_ddp.TrainingNoiseRecorder"),
        *DDP,
    )
    rank0, rank1 = ((tmp_path / f"noise_rank{r}.txt").read_text() for r in (0, 1))
    assert rank0 != rank1  # seed_everything alone gives both ranks the same t and eps


# ---- speed switches ------------------------------------------------------------------------

CPU_CONFIGS = ["demo", "baseline_demo", "unet_pneumoniamnist", "resnet18_pneumoniamnist"]
BACKBONES = ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b4", "vit_s16", "vit_b16", "swin_b"]
CNNS = {"unet", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_b4"}
GPU_PAPER_CONFIGS = [f"{model}_{data}" for model in ["unet", "dit", *BACKBONES] for data in ("chexpert", "isic")]
COMPILE, CHANNELS_LAST = "lightning_modules.callbacks.CompileNetwork", "lightning_modules.callbacks.ChannelsLast"


def callback_paths(config: dict) -> list[str]:
    return [callback["class_path"] for callback in config["trainer"].get("callbacks") or []]


def test_the_cpu_configs_are_the_ones_on_the_cpu():
    assert [name for name in EXPERIMENTS if resolved(name)["trainer"]["accelerator"] == "cpu"] == sorted(CPU_CONFIGS)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_configs_switch_no_precision_or_speed_option_on(name):
    trainer = resolved(name)["trainer"]
    assert trainer.get("precision") in (None, "32-true", 32, "32")
    assert not {COMPILE, CHANNELS_LAST} & set(callback_paths(resolved(name)))


@pytest.mark.parametrize("name", GPU_PAPER_CONFIGS)
def test_gpu_paper_configs_use_bf16_and_channels_last_for_cnns(name):
    config = resolved(name)
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert (CHANNELS_LAST in callback_paths(config)) == (name.rsplit("_", 1)[0] in CNNS)
    assert COMPILE not in callback_paths(config)  # opt-in (compile time), see the configs' comment


class ConvInputFormat(Callback):
    """Records whether the network's first convolution receives channels-last inputs in training."""

    def on_train_start(self, trainer, pl_module):
        self.channels_last = []
        first_conv = next(m for m in pl_module.network.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(
            lambda module, args: self.channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )


def conv_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_speed_switches_stay_off_on_cpu_unless_asked(tmp_path):
    cli = main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_steps=1",
                f"--trainer.callbacks+={CHANNELS_LAST}",
                f"--trainer.callbacks+={COMPILE}",
            ),
        ]
    )
    assert {ChannelsLast, CompileNetwork} <= {type(c) for c in cli.trainer.callbacks}
    assert getattr(cli.model.network, "_compiled_call_impl", None) is None
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(cli.model))


def test_channels_last_switched_on_for_a_cpu_run(tmp_path, checkpoint):
    cli = main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_steps=2",
                f"--trainer.callbacks+={CHANNELS_LAST}",
                "--trainer.callbacks.on_cpu=true",
                "--trainer.callbacks+=tests.test_ddp.ConvInputFormat",
            ),
        ]
    )
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(cli.model))
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ConvInputFormat")
    assert len(recorder.channels_last) == 2 and all(recorder.channels_last)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    plain = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}


def test_compile_switched_on_for_a_cpu_run(tmp_path, checkpoint):
    # backend "eager": TorchDynamo captures the graphs without code generation (inductor's C++
    # build of even this tiny UNet takes minutes on 2 shared cores; see the slow test below)
    from torch._dynamo.utils import counters

    counters.clear()
    cli = main(
        [
            "fit",
            *tiny_args(
                tmp_path,
                "--trainer.max_steps=2",
                f"--trainer.callbacks+={COMPILE}",
                "--trainer.callbacks.on_cpu=true",
                "--trainer.callbacks.backend=eager",
            ),
        ]
    )
    assert getattr(cli.model.network, "_compiled_call_impl", None) is not None
    assert counters["stats"]["unique_graphs"] >= 1  # compiled lazily, at the first forward
    # compiled in place: the same state_dict keys as an uncompiled run, so checkpoints mix freely
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == torch.load(checkpoint, weights_only=False)["state_dict"].keys()


@pytest.mark.slow
def test_compile_with_inductor_trains_and_matches_eager(tmp_path):
    losses = {}
    for name, extra in [
        ("eager", []),
        ("inductor", [f"--trainer.callbacks+={COMPILE}", "--trainer.callbacks.on_cpu=true"]),
    ]:
        cli = main(
            ["fit", *tiny_args(tmp_path / name, "--trainer.max_steps=2", "--trainer.deterministic=true", *extra)]
        )
        losses[name] = float(cli.trainer.callback_metrics["train/loss"])
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=1e-3)
