"""SLURM job scripts (tools/slurm.py) as rendered: resources mirrored into the trainer, the requeue
signal, run roots, the batch note, the scripts kept in configs/slurm. Real jobs on a one-node SLURM:
tests/test_slurm_cluster.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datamodules.batch_plan import batch_plan
from tests.helpers.configs import resolved
from tools.slurm import REPO_ROOT, main, render_from_argv

SLURM_DIR = REPO_ROOT / "configs" / "slurm"


def render(*argv: str) -> str:
    return render_from_argv(list(argv))[0]


def directives(script: str) -> dict[str, str | bool]:
    found = {}
    for option in re.findall(r"^#SBATCH --(\S+)", script, flags=re.MULTILINE):
        key, _, value = option.partition("=")
        found[key] = value or True
    return found


def cli_words(script: str) -> list[str]:
    """The `python cli.py fit ...` command the job's srun runs, as words."""
    after_srun = script[script.index("\nsrun ") :].split("\n", 2)[2]  # skip srun's own line
    return shlex.split(after_srun.replace("\\\n", " "))


def option_values(words: list[str]) -> dict[str, str]:
    return {word: value for word, value in zip(words, words[1:]) if word.startswith("--")}


# ---- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes, gpus", [(1, 4), (2, 4), (3, 2)])
def test_slurm_tasks_and_nodes_mirror_the_trainer(nodes, gpus):
    script = render("--config", "configs/unet_chexpert.yaml", "--nodes", str(nodes), "--gpus-per-node", str(gpus))
    sbatch, cli = directives(script), option_values(cli_words(script))
    assert sbatch["nodes"] == cli["--trainer.num_nodes"] == str(nodes)
    assert sbatch["ntasks-per-node"] == cli["--trainer.devices"] == str(gpus)
    assert sbatch["gres"] == f"gpu:{gpus}"
    assert cli["--trainer.strategy"] == "ddp" and cli["--trainer.accelerator"] == "gpu"
    assert f"srun --kill-on-bad-exit=1 --cpus-per-task={sbatch['cpus-per-task']}" in script


def test_requeue_signal_log_and_job_name():
    sbatch = directives(render("--config", "configs/unet_chexpert.yaml", "--time", "02:00:00"))
    assert sbatch["signal"] == "SIGUSR1@90"
    assert sbatch["requeue"] is True and sbatch["open-mode"] == "append"
    assert sbatch["time"] == "02:00:00"
    assert sbatch["job-name"] == "unet_chexpert"  # never "bash"/"interactive": Lightning would ignore SLURM
    assert sbatch["output"] == f"{REPO_ROOT}/runs/unet_chexpert/slurm-%j.out"
    assert sbatch["chdir"] == str(REPO_ROOT)


def test_each_experiment_gets_the_run_root_of_its_config(tmp_path):
    script = render("--config", "configs/resnet18_isic.yaml")
    root = f"{REPO_ROOT}/runs/resnet18_isic"
    assert option_values(cli_words(script))["--trainer.default_root_dir"] == root
    assert f"RUN_ROOT={root}\n" in script
    assert 'echo "TensorBoard: tensorboard --logdir ${RUN_ROOT}/tensorboard"' in script

    nameless = tmp_path / "no_root.yaml"  # a config without default_root_dir: runs/<its name>
    nameless.write_text(yaml.safe_dump({"trainer": {"max_steps": 1}}))
    assert f"RUN_ROOT={REPO_ROOT}/runs/no_root\n" in render("--config", str(nameless))
    assert f"RUN_ROOT={tmp_path}/elsewhere\n" in render(
        "--config", str(nameless), "--root-dir", str(tmp_path / "elsewhere")
    )


def test_gres_only_for_gpus_and_cpus_per_task_from_the_data_workers():
    gpu = directives(render("--config", "configs/unet_chexpert.yaml", "--gpus-per-node", "4"))
    cpu = directives(render("--config", "configs/demo.yaml", "--accelerator", "cpu", "--gpus-per-node", "2"))
    assert gpu["gres"] == "gpu:4" and "gres" not in cpu
    assert gpu["cpus-per-task"] == "9"  # unet_chexpert: num_workers 8, plus the training process
    assert cpu["cpus-per-task"] == "1"  # demo: num_workers 0


def test_optional_resources_only_when_asked():
    plain = directives(render("--config", "configs/demo.yaml"))
    assert not {"partition", "account", "mem"} & plain.keys()
    full = directives(
        render(
            "--config",
            "configs/demo.yaml",
            "--partition",
            "gpu",
            "--account",
            "lab",
            "--mem",
            "200G",
            "--cpus-per-task",
            "6",
        )
    )
    assert (full["partition"], full["account"], full["mem"], full["cpus-per-task"]) == ("gpu", "lab", "200G", "6")


def test_extra_args_reach_the_cli_and_may_not_override_the_resume():
    script = render(
        "--config", "configs/demo.yaml", "--extra-args", "--trainer.max_steps 7 --data.init_args.root='/a b'"
    )
    words = cli_words(script)
    assert words[-3:] == ["--trainer.max_steps", "7", "--data.init_args.root=/a b"]
    # No --ckpt_path: it would take precedence over the hpc checkpoint after a requeue.
    assert not any(word.startswith("--ckpt_path") for word in words)
    for reserved in ("--ckpt_path last", "--ckpt_path=last", "--trainer.devices 8", "--trainer.num_nodes=2"):
        with pytest.raises(ValueError, match=reserved.split()[0].split("=")[0]):
            render("--config", "configs/demo.yaml", "--extra-args", reserved)
    with pytest.raises(ValueError, match="Lightning ignores SLURM"):
        render("--config", "configs/demo.yaml", "--job-name", "interactive")


@pytest.mark.parametrize("script_path", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda path: path.name)
def test_job_scripts_in_the_repository_are_up_to_date(script_path):
    text = script_path.read_text()
    command = re.search(r"^#   python -m tools\.slurm (.*)$", text, flags=re.MULTILINE).group(1)
    assert render(*shlex.split(command)) == text, f"re-render {script_path.name}: python -m tools.slurm {command}"
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0


def test_committed_scripts_cover_one_and_two_nodes_of_four_gpus():
    shapes = {
        (d["nodes"], d["ntasks-per-node"], d["gres"])
        for d in map(directives, map(Path.read_text, SLURM_DIR.glob("*.sbatch")))
    }
    assert {("1", "4", "gpu:4"), ("2", "4", "gpu:4")} <= shapes


def test_main_prints_the_script_and_creates_the_run_root(tmp_path, capsys):
    main(["--config", "configs/demo.yaml", "--root-dir", str(tmp_path / "run"), "--accelerator", "cpu"])
    assert capsys.readouterr().out.startswith("#!/bin/bash\n")
    assert (tmp_path / "run").is_dir()  # SLURM opens --output there and does not create folders


@pytest.mark.slow  # 27 s: make test-all; test_slurm_cluster runs a rendered job for real
def test_make_target_and_cli_accept_the_rendered_job(tmp_path):
    config = resolved("baseline_demo")  # no callbacks of its own
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    made = subprocess.run(
        ["make", "-s", "slurm-job", f"CONFIG={tmp_path / 'exp.yaml'}", "NODES=1", "GPUS=2", f"PYTHON={sys.executable}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert directives(made.stdout)["ntasks-per-node"] == "2"
    # The CLI parses every option the job passes (the callback appended to an absent list too).
    words = cli_words(made.stdout)
    printed = subprocess.run(
        [sys.executable, *words[1:], "--trainer.accelerator", "cpu", "--print_config"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    trainer = yaml.safe_load(printed.stdout)["trainer"]
    assert (str(trainer["devices"]), trainer["num_nodes"], trainer["strategy"]) == ("2", 1, "ddp")
    assert [(c["class_path"], c["init_args"]) for c in trainer["callbacks"]] == [
        ("lightning_modules.callbacks.SlurmRequeue", {"signal": "SIGUSR1"})
    ]


def test_the_requeue_signal_is_configurable_and_reaches_the_callback():
    script = render("--config", "configs/demo.yaml", "--signal", "SIGTERM", "--signal-seconds", "300")
    words = cli_words(script)
    assert directives(script)["signal"] == "SIGTERM@300"
    assert "--trainer.callbacks+=lightning_modules.callbacks.SlurmRequeue" in words
    assert option_values(words)["--trainer.callbacks.signal"] == "SIGTERM"
    assert "SLURM sends SIGTERM to every task 300 s before the time limit" in script


def test_the_job_script_states_the_global_batch_and_its_split():
    paper = render("--config", "configs/unet_chexpert.yaml", "--nodes", "2", "--gpus-per-node", "4")
    assert "global_batch_size 128 over 8 processes = 16 images per process and step" in paper
    odd = render("--config", "configs/unet_chexpert.yaml", "--nodes", "1", "--gpus-per-node", "3")
    assert "global_batch_size 128 over 3 processes = (does not divide: refused)" in odd


def test_the_batch_note_counts_accumulated_micro_batches_as_the_cli_does(tmp_path):
    config = tmp_path / "accumulating.yaml"
    config.write_text(f"config: {REPO_ROOT / 'configs/unet_chexpert.yaml'}\ntrainer.accumulate_grad_batches: 2\n")
    script = render("--config", str(config), "--nodes", "2", "--gpus-per-node", "4")
    # the CLI's own batch plan: 128 / (8 processes x 2 micro-batches)
    expected = batch_plan(128, None, 8, 2).per_process
    assert f"over 8 processes x 2 accumulated micro-batches = {expected} images per process and micro-batch" in script
    assert expected == 8
