"""A study: experiments x seeds (x patient-level folds) as one command and one file, with error bars.

    python -m tools.study studies/pneumonia.yaml                 # run what is not finished, then summarise
    python -m tools.study studies/pneumonia.yaml --summarize     # only the tables and the report
    python -m tools.study studies/pneumonia.yaml --slurm --time 04:00:00 > study.sbatch   # one array task a run

The study file names the experiments (a config and overrides each, under a short name), the seeds, optionally the
number of folds, and the reference model the others are compared with:

    name: pneumonia                  # runs/<name>/<experiment>/seed<k>[/fold<j>]
    reference: resnet18
    also_against: [unet]             # optional: more columns of paired differences, against these experiments
    seeds: [0, 1, 2]
    folds: 5                         # optional: patient-level k-fold (data.init_args.num_folds / fold)
    experiments:
      unet:     {config: configs/unet_pneumoniamnist.yaml, overrides: [--trainer.max_time=00:00:04:00]}
      resnet18: {config: configs/resnet18_pneumoniamnist.yaml}
      unet_l1:  {config: configs/unet_pneumoniamnist.yaml, weights_from: unet,   # a test-time arm: no training
                 overrides: [--model.init_args.classification.error_norm=l1]}

Every run is an ordinary run folder (TensorBoard, `make results` and `tools.classify` work on it): `fit`, then
`validate` (the calibration), then `test` (both with the checkpoint the config keeps: the best on validation where
it monitors a metric, as tools/side_by_side.py), each as `python cli.py ...` with its output in the run's `study.log`.
Before anything runs, every experiment's command line goes through cli.py's own parser (a mistyped option is named
with the nearest valid one) and its data folder must exist. A finished run (its `study_run.json`) is skipped; a
killed one resumes from its `last.ckpt`; a failed one is listed as failed with its log, never left as a hole. The
runs go one after another here, or as a SLURM job array (`--slurm`: one task a run, `--only` picks it; the cluster
does the parallel part). reports/studies.py turns the finished runs into study.csv, study.json, study.md (Table 1
with mean +- sd [95 % CI] and differences against the reference) and report.html (a forest plot of the differences).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cli import main as cli_main
from cli import quiet_library_noise
from experiment.run_folders import RunFolder
from experiment.user_errors import tool_main, user_facing_message, yaml_error_place
from reports.studies import summarize
from tools.side_by_side import kept_checkpoint
from tools.slurm import REPO_ROOT

STUDY_KEYS = ("name", "root", "reference", "also_against", "seeds", "folds", "experiments")
EXPERIMENT_KEYS = ("config", "overrides", "weights_from")
DONE_FILE = "study_run.json"
LOG_FILE = "study.log"
STAGES_FILE = "study_stages.txt"  # the stages a run finished, one a line: a rerun skips them
STAGES = ("fit", "validate", "test")


class StudyError(ValueError):
    """A study file that cannot be run as written; the message names the key or file."""


@dataclass(frozen=True)
class Run:
    experiment: str
    config: str
    overrides: tuple[str, ...]
    seed: int
    fold: int | None
    num_folds: int | None
    folder: Path
    weights_from: Path | None = None  # a test-time arm: the run folder whose kept checkpoint it validates and tests

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[1:] if self.weights_from else STAGES

    @property
    def name(self) -> str:
        return f"{self.experiment}/seed{self.seed}" + (f"/fold{self.fold}" if self.fold is not None else "")

    def options(self) -> list[str]:
        folds = [f"--data.init_args.num_folds={self.num_folds}", f"--data.init_args.fold={self.fold}"]
        return [f"--config={self.config}", *self.overrides, f"--trainer.default_root_dir={self.folder}",
                f"--seed_everything={self.seed}", *(folds if self.fold is not None else [])]  # fmt: skip

    def done(self) -> bool:
        return (self.folder / DONE_FILE).is_file()


@dataclass
class Study:
    name: str
    root: Path
    reference: str
    seeds: list[int]
    folds: int | None
    experiments: dict[str, dict] = field(default_factory=dict)
    also_against: tuple[str, ...] = ()

    def folder(self, experiment: str, seed: int, fold: int | None) -> Path:
        return self.root / self.name / experiment / f"seed{seed}" / ("" if fold is None else f"fold{fold}")

    def runs(self) -> list[Run]:
        folds = list(range(self.folds)) if self.folds else [None]
        return [
            Run(
                name,
                spec["config"],
                tuple(spec.get("overrides") or ()),
                seed,
                fold,
                self.folds,
                self.folder(name, seed, fold),
                self.folder(spec["weights_from"], seed, fold) if spec.get("weights_from") else None,
            )  # fmt: skip
            for name, spec in self.experiments.items()
            for seed in self.seeds
            for fold in folds
        ]


def unknown_keys(found, allowed, where: str) -> None:
    for key in found:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise StudyError(f"{where}: unknown key {key!r}{hint}; the keys are {', '.join(allowed)}")


def read_study_file(path: Path) -> dict:
    """The study file's YAML as a mapping; a syntax error names the file and the line."""
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = f"{yaml_error_place(error)}: " if yaml_error_place(error) else ""
        raise StudyError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise StudyError(f"{path}: a study file is a mapping of {', '.join(STUDY_KEYS)}; got a {type(spec).__name__}")
    return spec


def load_study(path: str | Path) -> Study:
    """The study file, checked before anything runs: keys (with the nearest valid one for a typo), config files,
    the name (a folder under root), distinct seeds, folds, the experiments and their overrides, the reference."""
    path = Path(path)
    spec = read_study_file(path)
    unknown_keys(spec, STUDY_KEYS, str(path))
    for key in ("name", "seeds", "experiments"):
        if not spec.get(key):
            raise StudyError(f"{path}: `{key}` is missing or empty")
    name = spec["name"]
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise StudyError(
            f"{path}: name {name!r} must be a plain folder name (no '/', no '..'): runs go to <root>/<name>"
        )
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise StudyError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise StudyError(f"{path}: seeds {repeated} are listed twice: two runs would share one folder")
    folds = spec.get("folds")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise StudyError(f"{path}: folds must be an integer >= 2 (or left out for the data's own split), got {folds!r}")
    if not isinstance(spec["experiments"], dict):
        raise StudyError(f"{path}: experiments must be a mapping of names to {{config, overrides}}, "
                         f"got a {type(spec['experiments']).__name__}")  # fmt: skip
    for name, experiment in spec["experiments"].items():
        if not isinstance(experiment, dict):
            raise StudyError(f"{path}: experiment {name!r} must be a mapping with `config` (and `overrides`), "
                             f"got {experiment!r}")  # fmt: skip
        unknown_keys(experiment, EXPERIMENT_KEYS, f"{path}: experiment {name!r}")
        config = experiment.get("config")
        if not isinstance(config, str) or not (REPO_ROOT / config).is_file() and not Path(config).is_file():
            raise StudyError(f"{path}: experiment {name!r}: config {config!r} does not exist")
        overrides = experiment.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(option, str) for option in overrides):
            raise StudyError(f"{path}: experiment {name!r}: overrides must be a list of options such as "
                             f"[--trainer.max_steps=100], got {overrides!r}")  # fmt: skip
    check_weights_from(path, spec["experiments"])
    reference = spec.get("reference") or next(iter(spec["experiments"]))
    also_against = spec.get("also_against") or []
    for name in [reference, *also_against]:
        if name not in spec["experiments"]:
            raise StudyError(f"{path}: reference {name!r} is not one of the experiments {list(spec['experiments'])}")
    return Study(spec["name"], Path(spec.get("root", "runs")), reference, list(spec["seeds"]), folds,
                 dict(spec["experiments"]), tuple(also_against))  # fmt: skip


def check_weights_from(path: Path, experiments: dict) -> None:
    """A test-time arm (`weights_from: <experiment>`) takes the weights of an experiment listed before it that
    trains its own (runs go in the file's order)."""
    names, key = list(experiments), "weights_from"
    for position, (name, experiment) in enumerate(experiments.items()):
        source = experiment.get("weights_from")
        if source is None:
            continue
        if source not in names[:position] or experiments[source].get("weights_from"):
            raise StudyError(
                f"{path}: experiment {name!r}: weights_from {source!r} must name an experiment listed before it that "
                f"trains its own weights (one of {[n for n in names[:position] if not experiments[n].get(key)]})"
            )


def check_commands(path: Path, study: Study) -> None:
    """Every experiment's command line, parsed by the real parser (cli.py's) before anything starts: a mistyped
    option is named with the nearest valid one; and its data folder must exist (a study of absent data would start
    every run and fail in every log)."""
    firsts = {}
    for run in study.runs():
        firsts.setdefault(run.experiment, run)
    for run in firsts.values():
        config = parsed_config(path, run)
        root = ((config.get("data") or {}).get("init_args") or {}).get("root")
        if root is not None and not (REPO_ROOT / root).is_dir():
            raise StudyError(f"{path}: experiment {run.experiment!r}: data root {root!r} is not a folder "
                             f"(from {run.config} and its overrides)")  # fmt: skip


def parsed_config(path: Path, run: Run) -> dict:
    """The run's first stage command as cli.py parses it (`--print_config`: nothing is built or run)."""
    printed = io.StringIO()
    try:
        quiet_library_noise()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            cli_main([run.stages[0], *run.options(), "--print_config"], exit_on_error=False)
    except SystemExit as done:
        if done.code not in (0, None):
            raise StudyError(f"{path}: experiment {run.experiment!r}: its command line does not parse") from None
    except Exception as error:  # noqa: BLE001  (a person's mistake in the options: one line)
        message = user_facing_message(error) or f"{type(error).__name__}: {error}"
        raise StudyError(f"{path}: experiment {run.experiment!r}: {message}") from None
    return yaml.safe_load(printed.getvalue()) or {}


def run_one(run: Run, python: str = sys.executable) -> bool:
    """fit, validate, test, each skipped when an earlier attempt finished it; fit resumes from last.ckpt where a
    killed attempt left one. A test-time arm (weights_from) only validates and tests its source run's kept checkpoint
    with its own options. True when every stage succeeded."""
    run.folder.mkdir(parents=True, exist_ok=True)
    if run.weights_from and not (run.weights_from / DONE_FILE).is_file():
        with (run.folder / LOG_FILE).open("a") as log:
            log.write(f"\nthe run it takes its weights from, {run.weights_from}, is not finished\n")
        return False
    finished = run.folder / STAGES_FILE
    done = set(finished.read_text().split()) if finished.is_file() else set()
    with (run.folder / LOG_FILE).open("a") as log:
        for stage in (stage for stage in run.stages if stage not in done):
            if run.weights_from:
                weights = [f"--ckpt_path={kept_checkpoint(run.weights_from)}"]
            elif stage == "fit":  # resumed where a killed attempt left a last.ckpt
                weights = ["--ckpt_path=last"] if RunFolder(run.folder).last_checkpoint.is_file() else []
            else:  # the checkpoint the config keeps: the best on validation where it monitors a metric
                weights = [f"--ckpt_path={kept_checkpoint(run.folder)}"]
            command = [python, "cli.py", stage, *run.options(), *weights]
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            if subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                return False
            with finished.open("a") as stages:
                stages.write(f"{stage}\n")
    (run.folder / DONE_FILE).write_text(json.dumps({"run": run.name, "options": run.options()}, indent=2) + "\n")
    return True


def run_study(study: Study, only: int | None = None) -> list[str]:
    """Runs what is not finished (all, or the run with index `only`); returns the names of the runs that failed."""
    runs = study.runs()
    if only is not None and not 0 <= only < len(runs):
        raise StudyError(f"--only {only}: the study has runs 0 to {len(runs) - 1}")
    failed = []
    for index, run in enumerate(runs):
        if (only is not None and index != only) or run.done():
            print(f"[{index + 1}/{len(runs)}] {run.name}: " + ("finished, skipped" if run.done() else "not this task"))
            continue
        print(f"[{index + 1}/{len(runs)}] {run.name}: running (log: {run.folder / LOG_FILE})", flush=True)
        if not run_one(run):
            failed.append(run.name)
            print(f"[{index + 1}/{len(runs)}] {run.name}: FAILED, see {run.folder / LOG_FILE}", flush=True)
    return failed


def slurm_array(study_file: Path, study: Study, time: str, partition: str | None, cpus: int, gpus: int) -> str:
    """A job array, one task a run, each `python -m tools.study FILE --only $SLURM_ARRAY_TASK_ID`; a run killed at
    its time limit is requeued and resumes from its last.ckpt. Summarise afterwards with --summarize."""
    count = len(study.runs())
    logs = (study.root / study.name / "slurm").resolve()
    logs.mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs: it must exist
    lines = ["#!/bin/bash", f"# study {study.name}: {count} runs, one array task each (tools/study.py)",
             f"#SBATCH --job-name=study-{study.name}", f"#SBATCH --array=0-{count - 1}", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --time={time}", "#SBATCH --requeue",
             "#SBATCH --open-mode=append", f"#SBATCH --output={logs}/task-%a.out"]  # fmt: skip
    lines += [f"#SBATCH --gres=gpu:{gpus}"] * bool(gpus) + [f"#SBATCH --partition={partition}"] * bool(partition)
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}",
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1",
              f"{shlex.quote(sys.executable)} -m tools.study {shlex.quote(str(study_file))} "
              "--only ${SLURM_ARRAY_TASK_ID} --no-summary",
              f"# when every task is done: python -m tools.study {study_file} --summarize"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study file (YAML)")
    parser.add_argument("--only", type=int, default=None, help="run only the run with this index (SLURM array task)")
    parser.add_argument("--summarize", action="store_true", help="run nothing: write the tables and the report")
    parser.add_argument("--no-summary", action="store_true", help="run, but leave the summary to a later call")
    parser.add_argument("--slurm", action="store_true", help="print a SLURM job-array script instead of running")
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit of one run (default 04:00:00)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--cpus", type=int, default=4, help="SLURM CPUs per run (default 4)")
    parser.add_argument("--gpus", type=int, default=0, help="SLURM GPUs per run (default 0)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        if not args.summarize:
            check_commands(args.study, study)
        if args.slurm:
            print(slurm_array(args.study, study, args.time, args.partition, args.cpus, args.gpus), end="")
            return 0
        failed = [] if args.summarize else run_study(study, args.only)
        if not args.no_summary and not any(run.done() for run in study.runs()):
            logs = ", ".join(str(run.folder / LOG_FILE) for run in study.runs() if (run.folder / LOG_FILE).is_file())
            raise StudyError(f"no run of study {study.name} has finished, so no study page was written"
                             + (f"; see {logs}" if logs else ": run it without --summarize first"))  # fmt: skip
        if not args.no_summary:
            summarize(study)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    tool_main(main, "python -m tools.study ...")
