"""Real jobs on a one-node SLURM on localhost: munge, slurmctld and slurmd started for the test
(Debian's slurm-wlm packages, as root; `.ci/run` installs them) run sbatch-ed job scripts rendered by
tools/slurm.py: a 2-task DDP run on CPU, then a run that gets SIGUSR1, is requeued and resumes from
its hpc checkpoint to the straight run's weights. Without the packages or root they skip, saying why."""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import free_ports
from tools.slurm import render_from_argv

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The demo config made tiny: 2 x 8 images a step, no sanity check; `val_steps` 2 noise draws.
TINY_DEMO = (
    "--trainer.num_sanity_val_steps 0 --trainer.log_every_n_steps 1 --trainer.enable_model_summary false "
    "--data.init_args.num_train 256 --data.init_args.num_val 16 --data.init_args.num_test 16 "
    "--global_batch_size=8 --model.init_args.val_steps 2"
)


def why_no_slurm() -> str | None:
    missing = [program for program in SLURM_PROGRAMS if shutil.which(program) is None]
    if missing:
        return (
            f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
            "slurm-client munge (Debian), as .ci/run does"
        )
    if os.geteuid() != 0:
        return "the local SLURM runs slurmd and slurmctld as root (SlurmUser=root): run as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user to run munged as (the Debian munge package creates it)"
    if (os.cpu_count() or 1) < 2:
        return "the 2-task job needs 2 CPUs"
    return None


def first_job_id() -> int:
    """A job id whose DDP port under Lightning, 15000 + its last four digits, nothing listens on now."""
    for job_id in random.Random().sample(range(1, 10000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 15000 + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 15001-24999 for the job's DDP rendezvous")


class LocalSlurm:
    """munged, slurmctld and slurmd on localhost, everything (state, spool, logs, pid files, the
    munge key and socket) in `folder`, on free ports: independent of any SLURM on the machine."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.munge = folder / "munge"
        # Jobs inherit this environment (sbatch --export=ALL): srun, and the `scontrol requeue`
        # Lightning runs, find this cluster through SLURM_CONF. SLURM_* of an outer job would confuse them.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    # -- daemons
    def start(self) -> None:
        self.folder.chmod(0o755)  # munged, as user munge, must reach its socket folder
        self.start_munged()
        self.conf.write_text(self.slurm_conf())
        for daemon in ("slurmctld", "slurmd"):
            started = subprocess.run([daemon, "-f", str(self.conf)], env=self.env, capture_output=True, text=True)
            if started.returncode != 0:
                pytest.fail(f"{daemon} did not start: {started.stderr}\n{self.daemon_logs()}")
        self.wait_for(lambda: self.slurm("sinfo", "-h", "-o", "%T", check=False) == "idle", 60, "the node to be idle")

    def start_munged(self) -> None:
        self.munge.mkdir(mode=0o755)
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge, key):
            shutil.chown(path, "munge", "munge")
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.munge}/munge.socket",
                f"--pid-file={self.munge}/munged.pid",
                f"--log-file={self.munge}/munged.log",
                f"--seed-file={self.munge}/munged.seed",
            ],
            user="munge",
            group="munge",
            extra_groups=[],
            check=True,
            capture_output=True,
        )

    def slurm_conf(self) -> str:
        # `slurmd -C` prints this machine as a NodeName line: its real CPUs and RealMemory.
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        name = re.match(r"NodeName=(\S+)", node).group(1)
        controller_port, node_port = free_ports(2)
        return f"""\
ClusterName=pytest
# Lightning's SLURMEnvironment derives the DDP port from the job id (15000 + its last 4 digits): the
# first job id is chosen so that this port is free now (tests beside this one may hold any other).
FirstJobId={first_job_id()}
SlurmctldHost={name}(127.0.0.1)
SlurmUser=root
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=socket={self.munge}/munge.socket,cred_expire=5
StateSaveLocation={self.folder}/state
SlurmdSpoolDir={self.folder}/spool
SlurmctldPidFile={self.folder}/slurmctld.pid
SlurmdPidFile={self.folder}/slurmd.pid
SlurmctldLogFile={self.folder}/slurmctld.log
SlurmdLogFile={self.folder}/slurmd.log
# No cgroups needed: track processes through /proc, bind no tasks to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Look at pending jobs every 2 s (default 60), so the requeued job starts soon after it may.
SchedulerParameters=sched_interval=2
KillWait=5
ReturnToService=2
MinJobAge=600
{node} NodeAddr=127.0.0.1
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        if self.conf.exists():
            self.slurm("scancel", "--user=root", check=False)
            self.wait_for(lambda: not self.slurm("squeue", "-h", check=False), 30, "cancelled jobs to end", fail=False)
        for pid_file in (self.folder / "slurmd.pid", self.folder / "slurmctld.pid", self.munge / "munged.pid"):
            stop_pid_in(pid_file)

    # -- clients
    def slurm(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            pytest.fail(f"{shlex.join(command)} failed: {done.stderr}\n{self.daemon_logs()}")
        return done.stdout.strip()

    def submit(self, script: Path) -> str:
        return self.slurm("sbatch", "--parsable", str(script)).split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.slurm("scontrol", "-o", "show", "job", job_id)))

    def wait_until_finished(self, job_id: str, log: Path, timeout: float) -> dict[str, str]:
        self.wait_for(
            lambda: self.job(job_id)["JobState"] in FINISHED_STATES, timeout, f"job {job_id} to finish", log=log
        )
        return self.job(job_id)

    def wait_for(self, condition, timeout: float, what: str, log: Path | None = None, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        if fail:
            pytest.fail(
                f"timed out after {timeout:.0f} s waiting for {what}\n{read_log(log) if log else ''}"
                f"\n{self.daemon_logs()}"
            )
        return False

    def daemon_logs(self) -> str:
        logs = [self.folder / "slurmctld.log", self.folder / "slurmd.log", self.munge / "munged.log"]
        return "\n".join(f"--- {path.name} (end)\n{path.read_text()[-2000:]}" for path in logs if path.exists())


def stop_pid_in(pid_file: Path) -> None:
    """SIGTERM the daemon named by its pid file, SIGKILL it if it is still there after 10 s."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 2)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def read_log(log: Path) -> str:
    # tqdm redraws with carriage returns; as lines they read like the terminal showed them.
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else f"(no log at {log})"
    return re.sub(r"\n\s*\n", "\n", text)


KEY_LINES = re.compile(
    r"^job \d+ |GLOBAL_RANK|Starting with|training starts|SIGUSR1: saved|requeued SLURM|requeue|"
    r"Restor|TensorBoard:|fit` stopped",
    re.MULTILINE,
)


def print_key_lines(text: str) -> None:
    """What a reader of the job's log looks for (shown by `pytest -rP` and with failures)."""
    print("\n".join(line for line in text.splitlines() if KEY_LINES.search(line)))


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def slurm():
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path: its /tmp/pytest-of-root is private to root, and munged runs as munge.
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="test-slurm-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)


def submit_demo(cluster: LocalSlurm, name: str, extra_args: str) -> tuple[str, Path, Path]:
    """Renders the demo config's job script for 2 CPU tasks on 1 node and sbatches it."""
    root = cluster.folder / "runs" / name
    script = cluster.folder / f"{name}.sbatch"
    script.write_text(
        render_from_argv(
            [
                "--config",
                "configs/demo.yaml",
                "--accelerator",
                "cpu",
                "--gpus-per-node",
                "2",
                "--job-name",
                name,
                "--root-dir",
                str(root),
                "--time",
                "10:00",
                "--python",
                sys.executable,
                "--extra-args",
                f"{TINY_DEMO} {extra_args}",
            ]
        )[0]
    )
    root.mkdir(parents=True)
    job_id = cluster.submit(script)
    return job_id, root, root / f"slurm-{job_id}.out"


# 1-batch epochs: a checkpoint saved at a batch end is then an epoch's end, and the resumed run
# draws the same batches as the straight one (Lightning restarts a half-done epoch's data).
REQUEUE_RUN = (
    "--trainer.max_steps 40 --trainer.limit_train_batches 1 --trainer.limit_val_batches 0 "
    "--trainer.val_check_interval 1.0 --trainer.check_val_every_n_epoch 1 --checkpoint.every_n_train_steps 4"
)


def saved_state(checkpoint: Path) -> dict:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return {"global_step": saved["global_step"], "state_dict": saved["state_dict"],
            "optimizer": saved["optimizer_states"][0]["state"]}  # fmt: skip


def assert_same_state(resumed: dict, straight: dict) -> None:
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name  # bit for bit
    for index, moments in straight["optimizer"].items():
        for key, tensor in moments.items():
            assert torch.equal(resumed["optimizer"][index][key], tensor), (index, key)


@pytest.fixture(scope="module")
def straight_run(slurm) -> tuple[str, Path, str]:
    """The rendered job on 2 DDP ranks, run to its end without a signal: the reference."""
    job_id, root, log = submit_demo(slurm, "two_ranks", REQUEUE_RUN)
    job = slurm.wait_until_finished(job_id, log, timeout=300)
    text = read_log(log)
    print_key_lines(text)
    assert job["JobState"] == "COMPLETED", text
    return job_id, root, text


def test_real_slurm_runs_the_rendered_job_with_two_ddp_ranks(straight_run):
    job_id, root, text = straight_run
    for line in (
        "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2",
        "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2",
        "All distributed processes registered. Starting with 2 processes",
        "training starts at global step 0, epoch 0 (SLURM restart 0, 2 processes)",
        "batch: global 8 = 2 process(es) x 4 images x 1 accumulated micro-batch(es)",
        f"TensorBoard: tensorboard --logdir {root}/tensorboard",
    ):
        assert line in text, text
    assert "requeue" not in text.lower().replace("#sbatch --requeue", ""), text
    assert global_step(root / "checkpoints" / "last.ckpt") == 40
    assert list((root / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


@pytest.mark.slow  # 60 s; make test stays under 9 minutes (make test-all runs it; tests/test_resume.py checks the
# requeue signal in one process in make test)
def test_real_slurm_requeues_on_sigusr1_and_resumes_to_the_straight_runs_weights(slurm, straight_run):
    _, straight_root, _ = straight_run
    started = time.monotonic()
    job_id, root, log = submit_demo(slurm, "requeue", REQUEUE_RUN)
    # Signal once training has made progress: the first periodic checkpoint shows step 4 is done.
    slurm.wait_for(lambda: any((root / "checkpoints").glob("*step=*.ckpt")), 180, "step 4 of the training", log=log)
    # Plain `scancel --signal` signals the job steps (srun's Lightning processes), as
    # `--signal=SIGUSR1@90` does; --batch/--full would signal the batch shell, which USR1 kills.
    slurm.slurm("scancel", "--signal=USR1", job_id)
    hpc_checkpoint = root / "hpc_ckpt_1.ckpt"
    job = slurm.wait_until_finished(job_id, log, timeout=300)
    text = read_log(log)
    print_key_lines(text)
    print(
        f"scontrol: JobState={job['JobState']} Restarts={job['Restarts']}; hpc_ckpt_1.ckpt at global step "
        f"{global_step(hpc_checkpoint) if hpc_checkpoint.exists() else None}; "
        f"last.ckpt at global step {global_step(root / 'checkpoints' / 'last.ckpt')}; "
        f"{time.monotonic() - started:.0f} s from submission to the end"
    )
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text

    assert hpc_checkpoint.exists(), text
    step_at_signal = global_step(hpc_checkpoint)
    assert 4 <= step_at_signal < 40, text
    restart_header = f"job {job_id} (requeue) restart 1 "
    assert restart_header in text, text
    first_run, requeued_run = text.split(restart_header, 1)
    assert f"SIGUSR1: saved {hpc_checkpoint} at global step {step_at_signal}" in first_run, text
    assert f"requeued SLURM job {job_id}" in first_run, text
    assert "training starts at global step 0, epoch 0 (SLURM restart 0, 2 processes)" in first_run, text
    assert f"Restored all states from the checkpoint at {hpc_checkpoint}" in requeued_run, text
    assert f"training starts at global step {step_at_signal}, " in requeued_run, text
    assert "training starts at global step 0," not in requeued_run, text
    assert_same_state(saved_state(root / "checkpoints" / "last.ckpt"),
                      saved_state(straight_root / "checkpoints" / "last.ckpt"))  # fmt: skip


@pytest.mark.slow  # 80 s: two whole runs under SLURM; make test stays under 9 minutes (make test-all runs it)
def test_real_slurm_runs_a_two_run_study_as_a_job_array(slurm):
    """tools/study.py --slurm on the real cluster: one array task a run, each a whole fit, validate and test."""
    from tests.test_study import write_study
    from tools import study as study_tool

    folder = slurm.folder / "study"
    folder.mkdir()
    study_file = write_study(folder)
    script = folder / "study.sbatch"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert study_tool.main([str(study_file), "--slurm", "--cpus", "1", "--time", "10:00"]) == 0
    script.write_text(printed.getvalue())
    slurm.submit(script)
    runs = study_tool.load_study(study_file).runs()
    logs = folder / "runs" / "tiny" / "slurm"
    slurm.wait_for(lambda: all(run.done() for run in runs), 400, "both array tasks", log=logs / "task-0.out")
    assert study_tool.main([str(study_file), "--summarize"]) == 0
    table = (folder / "runs" / "tiny" / "study.md").read_text()
    assert "| unet | 1 |" in table and "| resnet | 1 |" in table and "Runs without results" not in table
