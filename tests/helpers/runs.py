"""Tiny runs of the real CLI: the demo shrunk to seconds, in this process or as a user's subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.helpers import ROOT

# The demo's UNet shrunk to seconds on a CPU: two levels, 16 and 32 channels.
TINY_UNET = [
    "--model.network.class_path=networks.ClassConditionalUNet",
    "--model.network.init_args.block_out_channels=[16, 32]",
    "--model.network.init_args.layers_per_block=1",
    "--model.network.init_args.cross_attention_resolution=8",
    "--model.network.init_args.cross_attention_dim=32",
    "--model.network.init_args.attention_heads=2",
    "--model.network.init_args.norm_num_groups=8",
]
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
]
NUM_TEST = 7  # does not divide by 2 processes
TEST_IDS = list(range(24 + 8, 24 + 8 + NUM_TEST))  # synthetic ids follow the 24 train and 8 val images
TINY_SYNTHETIC = [
    "--data.init_args.num_train=24",
    "--data.init_args.num_val=8",
    f"--data.init_args.num_test={NUM_TEST}",
    "--global_batch_size=4",
]
# validate every 3 steps on one batch, or (the default of tiny_args) not at all
WITH_VALIDATION = ["--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"]
WITHOUT_VALIDATION = ["--trainer.limit_val_batches=0"]


def tiny_args(root, *extra, validate: bool = False) -> list[str]:
    """The demo config shrunk to seconds: 16-pixel images, a 2-level UNet, N = 3 steps."""
    return [
        f"--config={ROOT / 'configs/demo.yaml'}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        *(WITH_VALIDATION if validate else WITHOUT_VALIDATION),
        "--data.init_args.image_size=16",
        *TINY_SYNTHETIC,
        "--model.init_args.val_steps=2",
        "--model.init_args.classification.num_steps=3",
        "--model.init_args.explanation.every_n_epochs=0",  # monitoring images: tested in test_explain.py
        *TINY_UNET,
        *extra,
    ]


def tiny_baseline_args(root, *extra) -> list[str]:
    """configs/baseline_demo.yaml shrunk to seconds: a ResNet-18 with MC dropout (T = 3) on 7 test images."""
    return [
        f"--config={ROOT / 'configs/baseline_demo.yaml'}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        *TINY_SYNTHETIC,
        "--model.init_args.mc_dropout_passes=3",
        *extra,
    ]


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on localhost, held open together so none is handed out twice.
    Other engineers' DDP tests run on this machine too: never the default 29500."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def run_cli(*args, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python cli.py ...` as a user runs it, in the repository root; DDP re-launches this command for rank 1."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result
