import os
from pathlib import Path

import pytest

from tests.helpers import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    """Every test runs where a user runs the CLI: the repository root (configs/ paths are relative to it)."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def learned_demo(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run folder, CLI options) of the demo UNet trained 150 steps at batch 32 on the synthetic chest images:
    about 40 s on the CPU, enough to classify them far above chance (tests/test_diffusion_classifier.py)
    and to tell them from other images (tests/test_out_of_distribution.py). Test split: 100 images."""
    from cli import main
    from tests.helpers import QUIET

    root = tmp_path_factory.mktemp("learned_demo")
    args = [
        "--config=configs/demo.yaml", f"--trainer.default_root_dir={root}", *QUIET,
        "--trainer.limit_val_batches=0", "--trainer.max_steps=150", "--global_batch_size=32",
        "--data.init_args.num_test=100", "--model.init_args.warmup_steps=20",
        "--model.init_args.explanation.every_n_epochs=0",
    ]  # fmt: skip
    main(["fit", *args])
    return root, args


@pytest.fixture(scope="session")
def calibrated(learned_demo) -> tuple[Path, list[str]]:
    """learned_demo calibrated by `validate` on all its 200 validation images (100 fit the time profile of
    the out-of-distribution score, 100 calibrate its p-values: enough for ood_alpha = 0.01)."""
    from cli import main

    root, args = learned_demo
    main(["validate", *args, "--ckpt_path=last", "--trainer.limit_val_batches=1.0"])
    return root, args
