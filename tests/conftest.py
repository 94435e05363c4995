"""Shared machinery of the core suite: free ports, clean launch environments, launch runs and leftover checks.

Every multi-process test here uses real processes on loopback; nothing of torch.distributed or Fabric is mocked.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
REPO_ROOT = TESTS_DIR.parent
TRAIN_SCRIPT = SCRIPTS_DIR / "fws_train.py"

RUN_TAG_ENV = "FWS_TEST_RUN_TAG"
"""Set to a fresh value for each test: every exec'd descendant inherits it, even once orphaned, so it finds
leftovers that a parent/child walk would miss (re-parented to init after their parent died)."""

LAUNCH_TAG_ENV = "FWS_TEST_LAUNCH_TAG"
"""The same, per launch, so a launch's own leftovers are found (and blamed on it) as soon as it ends."""

EXIT_GRACE_S = 5.0

# Variables that would make a launch inherit someone else's world (the suite may itself run under SLURM or torchrun).
_LAUNCH_VARS = re.compile(
    r"^(SLURM_.*|TORCHELASTIC_.*|LOCAL_RANK|RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_.*"
    r"|NODE_RANK|MASTER_ADDR|MASTER_PORT|FABRIC_WEIGHTSYNC_.*|PL_.*|LT_.*|OMP_NUM_THREADS|PYTHONUNBUFFERED"
    r"|FWS_TEST_LAUNCH_TAG)$"
)


def free_port() -> int:
    """A port the OS just handed out; rendezvous servers that we do not create ourselves need a number up front."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not _LAUNCH_VARS.match(key)}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=_pythonpath())
    env.update({key: str(value) for key, value in extra.items()})
    return env


def _pythonpath() -> str:
    # The package is installed editable, but a checkout that is not installed must still import.
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO_ROOT)] + ([existing] if existing else []))


# ---------------------------------------------------------------------- leftover processes
def tagged_processes(tag: str, variable: str = RUN_TAG_ENV) -> list:
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(variable) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


_SESSION_HELPERS = ("from multiprocessing.forkserver import main", "from multiprocessing.resource_tracker import main")


def _live_children(baseline: set) -> list:
    alive = []
    me = os.getpid()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid in baseline or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            # multiprocessing starts these once per pytest process and keeps them on purpose until it exits.
            if proc.ppid() == me and any(h in " ".join(proc.cmdline()) for h in _SESSION_HELPERS):
                continue
            alive.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return alive


def wait_for_leftovers(
    tag: str, baseline: Optional[set] = None, grace: float = EXIT_GRACE_S, variable: str = RUN_TAG_ENV
) -> list[str]:
    """Processes of this run still alive after ``grace`` seconds, described; they are killed so the next test is clean."""
    deadline = time.monotonic() + grace
    while True:
        left = {p.pid: p for p in tagged_processes(tag, variable)}
        if baseline is not None:
            left.update((p.pid, p) for p in _live_children(baseline))
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    described = []
    for proc in left.values():
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:300]}")
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return described


@pytest.fixture(autouse=True)
def no_leftover_processes(monkeypatch):
    """Fails a test that leaves any process behind: new children of pytest, or anything carrying the test's tag."""
    tag = f"test-{uuid.uuid4().hex}"
    monkeypatch.setenv(RUN_TAG_ENV, tag)
    baseline = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = wait_for_leftovers(tag, baseline)
    if left:
        pytest.fail(f"{len(left)} process(es) outlived the test by {EXIT_GRACE_S:.0f}s:\n" + "\n".join(left))


# ---------------------------------------------------------------------- running launches
@dataclass
class Run:
    """A finished launch: exit code, output, and the parsed ``TAG key=value ...`` lines the scripts print."""

    cmd: list
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    wall_s: float
    timed_out: bool = False
    leftovers: list = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def records(self, tag: str) -> list[dict]:
        """Lines ``TAG k=v k=v`` (values are JSON without spaces) printed by any process of the launch."""
        found = []
        for line in self.stdout.splitlines():
            if line.startswith(tag + " "):
                found.append({k: json.loads(v) for k, v in re.findall(r"(\w+)=(\S+)", line[len(tag) + 1 :])})
        return found

    def describe(self) -> str:
        tail = lambda text: "\n".join(text.splitlines()[-80:])  # noqa: E731
        return (
            f"command: {' '.join(map(str, self.cmd))}\nexit code: {self.returncode} after {self.wall_s:.1f}s\n"
            f"--- stdout (tail) ---\n{tail(self.stdout)}\n--- stderr (tail) ---\n{tail(self.stderr)}"
        )


def run_processes(
    commands: list[list], envs: list[dict], out_dir: Path, timeout: float, settle: Optional[tuple[str, float]] = None
) -> Run:
    """Start the commands (the processes of one launch), wait for all, kill the lot on timeout.

    ``settle=(marker, seconds)``: once ``marker`` appears in the output, the launch has ``seconds`` left to exit,
    so a run that fails and then hangs is caught in seconds rather than at the overall timeout.
    Each command gets its own session so a timeout can kill a launch's whole process tree at once.
    """
    tag = f"run-{uuid.uuid4().hex}"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + timeout
    procs = []
    for index, (cmd, env) in enumerate(zip(commands, envs)):
        logs = (open(out_dir / f"proc{index}.out", "w+"), open(out_dir / f"proc{index}.err", "w+"))
        env = {**env, LAUNCH_TAG_ENV: tag}
        procs.append((subprocess.Popen(cmd, env=env, cwd=str(out_dir), stdout=logs[0], stderr=logs[1], start_new_session=True), logs))
    timed_out = False
    while any(proc.poll() is None for proc, _ in procs):
        now = time.monotonic()
        if settle is not None and _output_contains(out_dir, len(procs), settle[0]):
            deadline, settle = min(deadline, now + settle[1]), None
        if now >= deadline:
            timed_out = True
            break
        time.sleep(0.2)
    if timed_out:
        for proc, _ in procs:
            _kill_session(proc)
        for proc, _ in procs:
            proc.wait(10)
    wall = time.monotonic() - start
    stdout, stderr = [], []
    for proc, logs in procs:
        for handle, sink in zip(logs, (stdout, stderr)):
            handle.seek(0)
            sink.append(handle.read())
            handle.close()
    codes = [proc.returncode for proc, _ in procs]
    # A timeout must read as a failure even if some process of the launch exited 0.
    returncode = -9 if timed_out else next((code for code in codes if code != 0), 0)
    run = Run(commands[0] if len(commands) == 1 else commands, returncode, "".join(stdout), "".join(stderr), out_dir, wall, timed_out)
    if timed_out:
        run.stderr += f"\n[test harness] launch killed after {wall:.0f}s\n"
    run.leftovers = wait_for_leftovers(tag, variable=LAUNCH_TAG_ENV)
    return run


def _output_contains(out_dir: Path, count: int, marker: str) -> bool:
    for index in range(count):
        for suffix in ("out", "err"):
            path = out_dir / f"proc{index}.{suffix}"
            if path.exists() and marker in path.read_text(errors="replace"):
                return True
    return False


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def train_cmd(*args: str) -> list:
    return [sys.executable, str(TRAIN_SCRIPT), *map(str, args)]


@dataclass(frozen=True)
class Launch:
    """How to start ``fws_train.py`` for one launch mode; ``devices``/``workers`` are per node."""

    mode: str
    devices: int = 2
    workers: int = 2
    nodes: int = 1
    steps: Optional[int] = 6
    """``None``: the script's long budget, for runs that must end at a failure."""
    worker_mode: str = "ok"
    strategy: str = "object"
    timeout: float = 100.0
    settle: Optional[tuple[str, float]] = None
    """See :func:`run_processes`."""

    @property
    def procs_per_node(self) -> int:
        return self.devices + self.workers

    def script_args(self, out_dir: Path) -> list:
        launch = self.mode if self.mode in ("spawn", "fork") else "popen"
        args = [
            "--launch", launch, "--strategy", self.strategy, "--devices", self.devices, "--workers", self.workers,
            "--nodes", self.nodes, "--worker-mode", self.worker_mode, "--out", out_dir,
        ]  # fmt: skip
        return args + (["--steps", self.steps] if self.steps is not None else [])

    def run(self, out_dir: Path) -> Run:
        args = self.script_args(out_dir)
        env = clean_env(MASTER_PORT=free_port())
        if self.strategy == "registry":
            env.update(FABRIC_WEIGHTSYNC_WORKER_FN="fws_train:worker", FABRIC_WEIGHTSYNC_INFERENCE_WORKERS=str(self.workers))
        if self.mode in ("popen", "spawn", "fork"):
            return run_processes([train_cmd(*args)], [env], out_dir, self.timeout, self.settle)
        if self.mode == "torchrun":
            port = env["MASTER_PORT"]
            commands = [
                [
                    sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}", f"--node-rank={node}",
                    f"--nproc-per-node={self.procs_per_node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                    "--max-restarts=0", "--monitor-interval=0.2", str(TRAIN_SCRIPT), *map(str, args),
                ]  # fmt: skip
                for node in range(self.nodes)
            ]
            return run_processes(commands, [env] * self.nodes, out_dir, self.timeout, self.settle)
        if self.mode == "slurm":
            total = self.procs_per_node * self.nodes
            envs = []
            for rank in range(total):
                envs.append({
                    **env,
                    "SLURM_NTASKS": str(total), "SLURM_NTASKS_PER_NODE": str(self.procs_per_node),
                    "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % self.procs_per_node),
                    "SLURM_NODEID": str(rank // self.procs_per_node), "SLURM_NNODES": str(self.nodes),
                    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost",
                })  # fmt: skip
            return run_processes([train_cmd(*args)] * total, envs, out_dir, self.timeout, self.settle)
        raise ValueError(f"unknown launch mode {self.mode!r}")


LAUNCHES = {
    "popen": Launch("popen"),
    "spawn": Launch("spawn", workers=1),  # every spawned process re-imports Lightning: one worker is enough here
    "fork": Launch("fork"),
    "torchrun": Launch("torchrun", strategy="registry"),
    "torchrun-2nodes": Launch("torchrun", devices=1, workers=1, nodes=2),
    "slurm": Launch("slurm"),
}
"""The healthy launches shared by test_launch_modes.py and test_training_world.py: each one runs once per session."""


class LaunchCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._runs: dict[str, Run] = {}

    def get(self, name: str) -> Run:
        if name not in self._runs:
            self._runs[name] = LAUNCHES[name].run(self.root / name)
        return self._runs[name]


@pytest.fixture(scope="session")
def launches(tmp_path_factory) -> LaunchCache:
    """Healthy launches run once per session: several test files assert different things about the same run."""
    return LaunchCache(tmp_path_factory.mktemp("launches"))
