"""Render a SLURM job script for an experiment config: DDP over nodes x devices, auto-requeue.

    python -m tools.slurm --config configs/unet_chexpert.yaml --nodes 2 \\
        --gpus-per-node 4 --time 24:00:00 > job.sbatch && sbatch job.sbatch
    make slurm-job CONFIG=configs/unet_chexpert.yaml NODES=2 GPUS=4 > job.sbatch

The script fills configs/slurm/job.sbatch.template. What it keeps in step, and why:
- `--ntasks-per-node` = `--trainer.devices` and `--nodes` = `--trainer.num_nodes`: Lightning's
  SLURMEnvironment takes ranks from srun's tasks and refuses a mismatch.
- `--signal=SIGUSR1@90` + `--requeue`: the suite's SlurmRequeue callback (Lightning's own handler
  is off) saves `hpc_ckpt_<n>.ckpt` in `default_root_dir` at the next batch end and requeues the
  job; the requeued job resumes from it because the script passes no `--ckpt_path` (an explicit
  one takes precedence over the hpc checkpoint, see `_CheckpointConnector._parse_ckpt_path`).
- Each experiment gets its own run root (its config's `trainer.default_root_dir`, else
  `runs/<config name>`), passed explicitly so the hpc checkpoints, the TensorBoard logs and the
  SLURM log (`--open-mode=append`: both runs of a requeued job in one file) all land there.
- `--job-name` is the experiment's name: Lightning ignores SLURM in jobs named "bash" or
  "interactive".
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from datamodules.batch_plan import BatchConfigError, batch_plan
from experiment.user_errors import tool_main
from lightning_modules.callbacks import REQUEUE_SECONDS, REQUEUE_SIGNAL
from tools.experiments import resolved_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "configs" / "slurm" / "job.sbatch.template"
REQUEUE_CALLBACK = "lightning_modules.callbacks.SlurmRequeue"
NAMES_LIGHTNING_IGNORES = ("bash", "interactive")
# Options the script sets itself; a second value in --extra-args would break DDP or the resume.
RESERVED_CLI_OPTIONS = {
    "--ckpt_path": "an explicit checkpoint wins over the hpc checkpoint, so a requeued job would restart from it",
    "--trainer.devices": "it must equal --ntasks-per-node; use --gpus-per-node",
    "--trainer.num_nodes": "it must equal --nodes; use --nodes",
    "--trainer.default_root_dir": "the hpc checkpoints and logs live there; use --root-dir",
}


@dataclass(frozen=True)
class Resources:
    nodes: int
    devices_per_node: int
    accelerator: str  # "gpu" or "cpu"
    time: str
    cpus_per_task: int
    partition: str | None = None
    mem: str | None = None
    account: str | None = None
    signal: str = REQUEUE_SIGNAL
    signal_seconds: int = REQUEUE_SECONDS


@dataclass(frozen=True)
class Experiment:
    name: str
    config: str  # as the job passes it to cli.py
    run_root: str  # as the job sees it: absolute, or relative to the repository root
    workdir: str | None  # the job's working directory, None: wherever sbatch is called
    config_values: dict  # the config as the CLI resolves it


def read_config(path: Path) -> dict:
    """The experiment config as the CLI resolves it (its includes, data and network files)."""
    return resolved_config(path)


def configured_run_root(config: dict, name: str) -> str:
    return (config.get("trainer") or {}).get("default_root_dir") or f"runs/{name}"


def configured_data_workers(config: dict) -> int:
    return int(((config.get("data") or {}).get("init_args") or {}).get("num_workers") or 0)


def sbatch_directives(experiment: Experiment, resources: Resources) -> list[str]:
    options = [
        ("job-name", experiment.name),
        ("nodes", resources.nodes),
        ("ntasks-per-node", resources.devices_per_node),
        ("gres", f"gpu:{resources.devices_per_node}" if resources.accelerator == "gpu" else None),
        ("cpus-per-task", resources.cpus_per_task),
        ("mem", resources.mem),
        ("time", resources.time),
        ("partition", resources.partition),
        ("account", resources.account),
        ("signal", f"{resources.signal}@{resources.signal_seconds}"),
        ("requeue", True),
        ("open-mode", "append"),
        ("output", f"{experiment.run_root}/slurm-%j.out"),
        ("chdir", experiment.workdir),
    ]
    lines = []
    for option, value in options:
        if value is True:
            lines.append(f"#SBATCH --{option}")
        elif value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    return lines


def train_command(experiment: Experiment, resources: Resources, extra_args: list[str], python: str) -> str:
    """`cli.py fit` with the SLURM resources mirrored into the trainer, one option per line."""
    options = [
        ("--config", experiment.config),
        ("--trainer.default_root_dir", experiment.run_root),
        ("--trainer.accelerator", resources.accelerator),
        ("--trainer.devices", str(resources.devices_per_node)),
        ("--trainer.num_nodes", str(resources.nodes)),
        ("--trainer.strategy", "ddp"),
        (f"--trainer.callbacks+={REQUEUE_CALLBACK}",),
        ("--trainer.callbacks.signal", resources.signal),
    ]
    lines = [shlex.join([python, "cli.py", "fit"])] + [shlex.join(option) for option in options]
    if extra_args:
        lines.append(shlex.join(extra_args))
    return " \\\n        ".join(lines)


def render(
    experiment: Experiment,
    resources: Resources,
    extra_args: list[str] = (),
    python: str = "python",
    render_command: str = "",
) -> str:
    check_extra_args(extra_args)
    processes = resources.nodes * resources.devices_per_node
    unit = "GPUs" if resources.accelerator == "gpu" else "CPU processes"
    fields = {
        "title": f"{experiment.name}: {resources.nodes} node(s) x {resources.devices_per_node} {unit}, "
        f"DDP over {processes} processes",
        "render_command": render_command or "python -m tools.slurm ...",
        "submit_hint": submit_hint(experiment),
        "sbatch_directives": "\n".join(sbatch_directives(experiment, resources)),
        "run_root": shlex.quote(experiment.run_root),
        "cpus_per_task": str(resources.cpus_per_task),
        "train_command": train_command(experiment, resources, list(extra_args), python),
        "batch_note": batch_note(experiment.config_values, processes),
        "signal": resources.signal,
        "signal_seconds": str(resources.signal_seconds),
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def batch_note(config: dict, processes: int) -> str:
    """The global batch and its split, as the CLI's batch plan will make it on `processes` processes."""
    global_batch = config.get("global_batch_size")
    if global_batch is None:
        return "the config gives no global_batch_size: data.init_args.batch_size images per process and step"
    accumulation = int((config.get("trainer") or {}).get("accumulate_grad_batches") or 1)
    split = f"{processes} processes" + (f" x {accumulation} accumulated micro-batches" if accumulation > 1 else "")
    try:
        plan = batch_plan(global_batch, None, processes, accumulation)
    except BatchConfigError:
        return f"global_batch_size {global_batch} over {split} = (does not divide: refused)"
    unit = "process and micro-batch" if accumulation > 1 else "process and step"
    return f"global_batch_size {global_batch} over {split} = {plan.per_process} images per {unit}"


def submit_hint(experiment: Experiment) -> str:
    if experiment.workdir is None:
        return (
            f"Submit from the repository root (SLURM does not create the log's folder): "
            f"mkdir -p {shlex.quote(experiment.run_root)} && sbatch <this file>"
        )
    return "Submit from anywhere: sbatch <this file> (the job runs in the repository, --chdir)"


def check_extra_args(extra_args) -> None:
    for word in extra_args:
        option = word.split("=", 1)[0]
        if option in RESERVED_CLI_OPTIONS:
            raise ValueError(f"--extra-args must not set {option}: {RESERVED_CLI_OPTIONS[option]}")


def experiment_from_args(args: argparse.Namespace, config: dict) -> Experiment:
    config_path = Path(args.config).resolve()
    name = args.job_name or config_path.stem
    if name in NAMES_LIGHTNING_IGNORES:
        raise ValueError(f"job name {name!r}: Lightning ignores SLURM in jobs named {NAMES_LIGHTNING_IGNORES}")
    run_root = Path(args.root_dir or configured_run_root(config, name))
    in_repo = config_path.is_relative_to(REPO_ROOT)
    if args.portable:
        if run_root.is_absolute() or not in_repo:
            raise ValueError("--portable needs a config inside the repository and a relative run root")
        return Experiment(name, str(config_path.relative_to(REPO_ROOT)), str(run_root), None, config)
    config_arg = config_path.relative_to(REPO_ROOT) if in_repo else config_path
    # A relative run root means: under the repository, wherever this renderer was called from.
    absolute_root = run_root if run_root.is_absolute() else REPO_ROOT / run_root
    return Experiment(name, str(config_arg), str(absolute_root), str(REPO_ROOT), config)


def resources_from_args(args: argparse.Namespace, config: dict) -> Resources:
    cpus = args.cpus_per_task
    if cpus is None:  # the data workers plus the training process itself
        cpus = configured_data_workers(config) + 1
    return Resources(
        args.nodes, args.devices, args.accelerator, args.time, cpus, args.partition, args.mem, args.account,
        args.signal, args.signal_seconds,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.slurm",
        description="Print a SLURM job script that trains an experiment config with DDP over "
        "nodes x devices (one srun task per device), with SIGUSR1 auto-requeue and "
        "resume from Lightning's hpc checkpoint. Creates the run root, where SLURM "
        "writes the job's log.",
        epilog="example: python -m tools.slurm --config configs/unet_chexpert.yaml "
        "--nodes 2 --gpus-per-node 4 --time 24:00:00 > job.sbatch && sbatch job.sbatch",
    )
    parser.add_argument("--config", required=True, help="experiment config (YAML), as for `cli.py fit --config`")
    parser.add_argument(
        "--nodes", type=positive, default=1, metavar="N", help="nodes (= --trainer.num_nodes); default 1"
    )
    parser.add_argument(
        "--gpus-per-node",
        "--devices-per-node",
        dest="devices",
        type=positive,
        default=4,
        metavar="N",
        help="devices per node = srun tasks per node (= --trainer.devices); with "
        "--accelerator cpu the number of CPU processes per node; default 4",
    )
    parser.add_argument(
        "--accelerator",
        choices=("gpu", "cpu"),
        default="gpu",
        help="gpu requests --gres=gpu:N; cpu requests no GPU (tests, debugging); default gpu",
    )
    parser.add_argument("--time", default="24:00:00", help="time limit (SLURM format); default 24:00:00")
    parser.add_argument("--partition", help="SLURM partition; default: the cluster's default")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument(
        "--cpus-per-task",
        type=positive,
        metavar="N",
        help="CPUs per task; default: the config's data.init_args.num_workers + 1",
    )
    parser.add_argument("--mem", help="memory per node (SLURM format, e.g. 200G); default: the cluster's default")
    parser.add_argument("--signal", default=REQUEUE_SIGNAL, help="the signal SLURM sends before the time limit, "
                        f"which saves and requeues (#SBATCH --signal; default {REQUEUE_SIGNAL})")  # fmt: skip
    parser.add_argument("--signal-seconds", type=positive, default=REQUEUE_SECONDS, metavar="S",
                        help=f"seconds before the time limit it is sent (default {REQUEUE_SECONDS})")  # fmt: skip
    parser.add_argument("--job-name", help="default: the config's file name without .yaml")
    parser.add_argument(
        "--root-dir",
        metavar="DIR",
        help="run root for checkpoints, hpc checkpoints, TensorBoard and the "
        "SLURM log; default: the config's trainer.default_root_dir, "
        "else runs/<job name>",
    )
    parser.add_argument(
        "--extra-args",
        default="",
        metavar='"ARGS"',
        help='more `cli.py fit` options, one string: "--data.init_args.root=/data/CheXpert"',
    )
    parser.add_argument("--python", default="python", help="interpreter the job runs; default python (from PATH)")
    parser.add_argument(
        "--portable",
        action="store_true",
        help="relative paths and no --chdir: for scripts kept in the repository, "
        "submitted from its root (mkdir -p the run root first)",
    )
    return parser


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    # argparse takes a value that starts with "--" for an option: `--extra-args "--data..."`
    # fails unless written `--extra-args=--data...`. Glue the pair so that both forms work.
    glued = []
    for word in argv:
        if glued and glued[-1] == "--extra-args":
            glued[-1] = f"--extra-args={word}"
        else:
            glued.append(word)
    return build_parser().parse_args(glued)


def render_from_argv(argv: list[str]) -> tuple[str, Experiment]:
    args = parse_args(argv)
    config = read_config(Path(args.config).resolve())  # once: resolving a config builds a parser
    experiment = experiment_from_args(args, config)
    script = render(
        experiment,
        resources_from_args(args, config),
        shlex.split(args.extra_args),
        args.python,
        render_command="python -m tools.slurm " + shlex.join(argv),
    )
    return script, experiment


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        script, experiment = render_from_argv(argv)
    except ValueError as error:
        build_parser().error(str(error))
    if experiment.workdir is not None:  # then the run root is absolute
        # SLURM does not create the folder of --output; a job without it fails with no log at all.
        Path(experiment.run_root).mkdir(parents=True, exist_ok=True)
    sys.stdout.write(script)


if __name__ == "__main__":
    tool_main(main, "python -m tools.slurm ...")
