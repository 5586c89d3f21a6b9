"""Shared by every test file: where tests run, how `make test` spreads them over the cores, and the
expensive trained models and data trees, built once per session (or per pytest-xdist worker)."""

import contextlib
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.scheduling import group_of, start_order

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core: a second torch thread each would only contend (OpenMP's spinning threads
    # turned a 0.1 s forward into 10 s on this 2-core machine)
    torch.set_num_threads(1)

# session fixtures of the tiny Stable Diffusion, shared by its two test files
pytest_plugins = ["tests.helpers.stable_diffusion"]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """`make test` runs pytest-xdist with --dist loadgroup over both cores: each test file goes to one
    worker whole (its module fixtures are built once), the files in SHARED_WORKER with their partners,
    the longest groups first (tests/helpers/scheduling.py)."""
    group = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        group[item] = group_of(module)
        item.add_marker(pytest.mark.xdist_group(group[item]))
    items.sort(key=lambda item: start_order(group[item]))  # stable: file order within a group


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    """Every test runs where a user runs the CLI: the repository root (configs/ paths are relative to it)."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@contextlib.contextmanager
def single_thread():
    """Torch on one thread, restored afterwards: tiny models and per-image ops gain nothing from a second one (on
    a shared 2-core machine OpenMP's waiting threads made a 0.1 s forward take 10 s), a run in this process then
    matches the DDP ranks, which get one thread each, and its numbers are the same bits on every worker (a sum
    split over two threads is added in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The test on one thread (single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def learned_demo(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run folder, CLI options) of the demo UNet trained 150 steps at batch 32 on the synthetic chest images:
    about 40 s on the CPU, enough to classify them far above chance (tests/test_diffusion_classifier.py)
    and to tell them from other images (tests/test_out_of_distribution.py). Test split: 100 images."""
    from cli import main
    from tests.helpers.runs import QUIET

    root = tmp_path_factory.mktemp("learned_demo")
    args = [
        "--config=configs/demo.yaml", f"--trainer.default_root_dir={root}", *QUIET,
        "--trainer.limit_val_batches=0", "--trainer.max_steps=150", "--global_batch_size=32",
        "--data.init_args.num_test=100", "--model.init_args.warmup_steps=20",
        "--model.init_args.explanation.every_n_epochs=0",
    ]  # fmt: skip
    with single_thread():  # the same weights, bit for bit, whichever worker trains them (test_outputs_unchanged)
        main(["fit", *args])
    return root, args


@pytest.fixture(scope="session")
def calibrated(learned_demo) -> tuple[Path, list[str]]:
    """learned_demo calibrated by `validate` as the README runs it, with the config's limit_val_batches (2, a fit
    setting): on all its 200 validation images all the same (100 fit the time profile of the out-of-distribution
    score, 100 calibrate its p-values: enough for ood_alpha = 0.01)."""
    from cli import main

    root, args = learned_demo
    with single_thread():
        main(["validate", *[arg for arg in args if not arg.startswith("--trainer.limit_val_batches")],
              "--ckpt_path=last"])  # fmt: skip
    return root, args


def trained(tmp_path_factory, name: str, args, steps: int) -> Path:
    """The last checkpoint of `args(root)` trained for `steps` steps in a fresh folder."""
    from cli import main

    root = tmp_path_factory.mktemp(name)
    main(["fit", *args(root, f"--trainer.max_steps={steps}")])
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny demo (tests.helpers.runs.tiny_args: 16 px, a 2-level UNet) after one training step: weights
    of the right shapes, for the tests that need a checkpoint but not a good one. Read it, never write
    into its run folder."""
    from tests.helpers.runs import tiny_args

    return trained(tmp_path_factory, "tiny_run", tiny_args, steps=1)


@pytest.fixture(scope="session")
def tiny_baseline_checkpoint(tmp_path_factory) -> Path:
    """The baseline demo's ResNet-18 shrunk (tests.helpers.runs.tiny_baseline_args) after two steps."""
    from tests.helpers.runs import tiny_baseline_args

    return trained(tmp_path_factory, "tiny_baseline_run", tiny_baseline_args, steps=2)


@pytest.fixture(scope="session")
def calibrated_tiny_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """A copy of the tiny run calibrated by validate on 200 validation images: enough for the refusal at ood_alpha
    0.01 (100 fit the time profile, 100 calibrate). Read it, never write into it."""
    import shutil

    from cli import main
    from tests.helpers.runs import tiny_args

    run = tmp_path_factory.mktemp("calibrated_tiny") / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "checkpoints" / "last.ckpt")
    main(["validate", *tiny_args(run), "--data.init_args.num_val=200", f"--ckpt_path={run / 'checkpoints/last.ckpt'}"])
    return run


@pytest.fixture(scope="session")
def chexpert_root(tmp_path_factory) -> Path:
    """A tiny CheXpert tree (tests.helpers.publishers.make_chexpert), read by several test files."""
    from tests.helpers.publishers import make_chexpert

    root = tmp_path_factory.mktemp("chexpert")
    make_chexpert(root)
    return root


@pytest.fixture(scope="session")
def calibrated_test(calibrated) -> Path:
    """The folder of `test` of the calibrated learned demo on its 100 test images: metrics.json,
    predictions.csv with the decisions, the figures and report.html (read them, write nothing there)."""
    from cli import main

    root, args = calibrated
    with single_thread():
        return Path(main(["test", *args, "--ckpt_path=last"]).trainer.log_dir)
