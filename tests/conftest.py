"""Shared machinery of the core suite: free ports, clean launch environments, waiting on conditions, a store the
test hosts, processes started and watched while they run, launch runs and leftover checks.

Every multi-process test here uses real processes on loopback; nothing of torch.distributed or Fabric is mocked.
"""

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest
import torch.distributed as dist
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncStrategy

TESTS_DIR = Path(__file__).resolve().parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
REPO_ROOT = TESTS_DIR.parent
TRAIN_SCRIPT = SCRIPTS_DIR / "fws_train.py"
FABRIC_CLI = Path(sys.executable).with_name("fabric")
"""Lightning's ``fabric`` command, installed next to this interpreter."""

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


def slurm_envs(env: dict, tasks_per_node: int, nodes: int = 1) -> list[dict]:
    """The environment ``srun`` gives each task of a job on ``nodes`` nodes (all of them this host), by rank."""
    total = tasks_per_node * nodes
    return [
        {
            **env,
            "SLURM_NTASKS": str(total), "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % tasks_per_node), "SLURM_NODEID": str(rank // tasks_per_node),
            "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost",
        }  # fmt: skip
        for rank in range(total)
    ]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    Tests wait on the condition they need like this, never on a fixed sleep: a loaded machine makes the wait
    longer, not the test wrong."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting until {what}"
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


# ---------------------------------------------------------------------- a store the test hosts
STORE_TIMEOUT_S = 30.0


@pytest.fixture
def control_store():
    """A TCPStore server this test hosts on 127.0.0.1 (an OS-chosen port), as training rank 0 hosts the control
    store: transports, control planes and peer processes connect to ``control_store.port``."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    yield server


@pytest.fixture
def store_client(control_store):
    """``store_client(timeout)`` opens a new client of :func:`control_store` whose calls give up after
    ``timeout`` seconds (the library gives each of its blocking users a client of its own)."""

    def client(timeout: float = 10.0) -> dist.TCPStore:
        return dist.TCPStore(
            "127.0.0.1", control_store.port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout)
        )

    return client


# ---------------------------------------------------------------------- a Fabric launch from this process
@pytest.fixture
def launch_fabric(monkeypatch):
    """``launch_fabric(train_fn, worker_fn, *, devices=1, workers=1, callbacks=(), start_method="fork", **strategy_kwargs)``
    runs one Fabric launch from the test process, with a rendezvous port of its own, and returns training rank 0's
    result (an exception of the training code is raised here)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")

    def launch(train_fn, worker_fn, *, devices=1, workers=1, callbacks=(), start_method="fork", **strategy_kwargs):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        # Forked children inherit this process's garbage: a store or group a child collects aborts it.
        gc.collect()
        strategy_kwargs.setdefault("shutdown_timeout", 30)
        strategy = WeightSyncStrategy(worker_fn, inference_workers=workers, start_method=start_method, **strategy_kwargs)
        fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks))
        return fabric.launch(train_fn)

    return launch


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


def _session_helper(proc: psutil.Process) -> bool:
    """multiprocessing starts these once per pytest process (a spawn launch from a test starts the resource tracker)
    and keeps them on purpose until it exits."""
    try:
        return proc.ppid() == os.getpid() and any(h in " ".join(proc.cmdline()) for h in _SESSION_HELPERS)
    except psutil.Error:  # gone meanwhile
        return False


def _live_children(baseline: set) -> list:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid in baseline or proc.status() == psutil.STATUS_ZOMBIE or _session_helper(proc):
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
        left = {p.pid: p for p in tagged_processes(tag, variable) if not _session_helper(p)}
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


# ---------------------------------------------------------------------- started processes, watched as they run
class Proc:
    """One process of a :class:`Processes`: its stdout lines as they come (copied to ``NAME.out``), its stderr in
    ``NAME.err``, and when it exited (``time.time()``)."""

    def __init__(self, name: str, popen: subprocess.Popen, group: "Processes") -> None:
        self.name = name
        self.popen = popen
        self.lines: list[str] = []
        self.exit_time: Optional[float] = None
        self._group = group
        self._threads = [threading.Thread(target=self._read, daemon=True), threading.Thread(target=self._wait, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode

    @property
    def stdout(self) -> str:
        with self._group.cond:
            return "".join(line + "\n" for line in self.lines)

    def stderr(self) -> str:
        path = self._group.out_dir / f"{self.name}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def _read(self) -> None:
        with open(self._group.out_dir / f"{self.name}.out", "w") as copy:  # for a post-mortem of a failed run
            for raw in self.popen.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                copy.write(line + "\n")
                copy.flush()
                self._group._line(self, line)

    def _wait(self) -> None:
        self.popen.wait()
        with self._group.cond:
            self.exit_time = time.time()
            self._group.cond.notify_all()


class Processes:
    """The processes of a launch (or of launches run together): started, watched while they run, killed as one.

    Each starts in a session of its own, so :meth:`kill` takes its whole tree, with ``LAUNCH_TAG_ENV`` set to
    this group's tag, so :meth:`leftovers` finds all it spawned, even processes orphaned and re-parented to init.
    Subclasses see each stdout line as it comes in :meth:`on_line` (called holding :attr:`cond`, which is
    notified at each line and each exit).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tag = f"run-{uuid.uuid4().hex}"
        self.procs: list[Proc] = []
        self.cond = threading.Condition()

    def start(self, name: str, cmd: list, env: dict, cwd: Optional[str] = None) -> Proc:
        with open(self.out_dir / f"{name}.err", "wb") as stderr:
            popen = subprocess.Popen(
                cmd, env={**env, LAUNCH_TAG_ENV: self.tag}, cwd=cwd or str(self.out_dir), stdout=subprocess.PIPE,
                stderr=stderr, start_new_session=True,
            )  # fmt: skip
        proc = Proc(name, popen, self)
        with self.cond:
            self.procs.append(proc)
        return proc

    def on_line(self, proc: Proc, line: str) -> None:
        pass

    def _line(self, proc: Proc, line: str) -> None:
        with self.cond:
            proc.lines.append(line)
            self.on_line(proc, line)
            self.cond.notify_all()

    def running(self) -> bool:
        with self.cond:
            return any(proc.exit_time is None for proc in self.procs)

    def watch(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (called holding :attr:`cond`); ``False`` once ``timeout`` passed, or
        every process exited, without it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    return predicate()
                self.cond.wait(min(left, 0.2))
        return True

    def wait(self, timeout: float, settle: Optional[tuple[str, float]] = None) -> bool:
        """Wait until every process exited; ``False`` if some still run after ``timeout`` (they are left running).

        ``settle=(marker, seconds)``: once ``marker`` appears in any output, they have ``seconds`` left to exit.
        """
        deadline = time.monotonic() + timeout
        next_look = 0.0
        with self.cond:
            while self.running():
                now = time.monotonic()
                if settle is not None and now >= next_look:
                    next_look = now + 0.2
                    if self._said(settle[0]):
                        deadline, settle = min(deadline, now + settle[1]), None
                if now >= deadline:
                    return False
                self.cond.wait(min(deadline - now, 0.2))
        return True

    def _said(self, marker: str) -> bool:
        return any(marker in line for proc in self.procs for line in proc.lines) or any(
            marker in proc.stderr() for proc in self.procs
        )

    def kill(self) -> None:
        """SIGKILL every process's session, and anything else carrying this group's tag."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in tagged_processes(self.tag, LAUNCH_TAG_ENV):
            try:
                proc.kill()
            except psutil.Error:
                pass

    def leftovers(self, grace: float = EXIT_GRACE_S) -> list[str]:
        """Processes of this group still alive after ``grace`` seconds, described; they are killed."""
        return wait_for_leftovers(self.tag, grace=grace, variable=LAUNCH_TAG_ENV)

    def join_readers(self, timeout: float = 5.0) -> None:
        """Let the readers take the last output; one that a surviving descendant keeps open is given up on."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            for thread in proc._threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.kill()
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.join_readers()

    def describe(self) -> str:
        parts = []
        for proc in self.procs:
            stderr = "\n".join(l for l in proc.stderr().splitlines() if not l.startswith(("frame #", "[W", "[E")))
            with self.cond:
                stdout = "\n".join(proc.lines[-40:])
            parts.append(
                f"=== {proc.name} pid {proc.pid} exit {proc.returncode}\n--- stdout (tail)\n{stdout}"
                f"\n--- stderr (tail)\n" + "\n".join(stderr.splitlines()[-40:])
            )
        return "\n".join(parts)


def sigkill(pid: int) -> float:
    """SIGKILL one process (a worker or a trainer, mid-run); returns when, as ``time.time()``."""
    os.kill(pid, signal.SIGKILL)
    return time.time()


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
    """
    group = Processes(out_dir)
    start = time.monotonic()
    for index, (cmd, env) in enumerate(zip(commands, envs)):
        group.start(f"proc{index}", cmd, env)
    timed_out = not group.wait(timeout, settle)
    if timed_out:
        group.kill()
        for proc in group.procs:
            proc.popen.wait(10)
    wall = time.monotonic() - start
    leftovers = group.leftovers()
    group.join_readers()
    codes = [proc.returncode for proc in group.procs]
    # A timeout must read as a failure even if some process of the launch exited 0.
    returncode = -9 if timed_out else next((code for code in codes if code != 0), 0)
    stdout = "".join(proc.stdout for proc in group.procs)
    stderr = "".join(proc.stderr() for proc in group.procs)
    run = Run(commands[0] if len(commands) == 1 else commands, returncode, stdout, stderr, out_dir, wall, timed_out)
    if timed_out:
        run.stderr += f"\n[test harness] launch killed after {wall:.0f}s\n"
    run.leftovers = leftovers
    return run


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
    extra: tuple = ()
    """More arguments of the script (``--transport``, ``--verify-replicas``, ...)."""

    @property
    def procs_per_node(self) -> int:
        return self.devices + self.workers

    def script_args(self, out_dir: Path) -> list:
        launch = self.mode if self.mode in ("spawn", "fork", "cli") else "popen"
        args = [
            "--launch", launch, "--strategy", self.strategy, "--devices", self.devices, "--workers", self.workers,
            "--nodes", self.nodes, "--worker-mode", self.worker_mode, "--out", out_dir,
        ]  # fmt: skip
        return args + (["--steps", self.steps] if self.steps is not None else []) + list(self.extra)

    def run(self, out_dir: Path) -> Run:
        args = self.script_args(out_dir)
        env = clean_env(MASTER_PORT=free_port())
        if self.strategy == "registry":
            env.update(FABRIC_WEIGHTSYNC_WORKER_FN="fws_train:worker", FABRIC_WEIGHTSYNC_INFERENCE_WORKERS=str(self.workers))
        if self.mode in ("popen", "spawn", "fork"):
            # Several nodes: one `python train.py` per node with its NODE_RANK, as Fabric runs without a cluster manager.
            envs = [{**env, "NODE_RANK": str(node)} for node in range(self.nodes)] if self.nodes > 1 else [env]
            return run_processes([train_cmd(*args)] * len(envs), envs, out_dir, self.timeout, self.settle)
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
        if self.mode == "cli":
            # `fabric run`, or the package's copy of it that knows the name "ddp_weightsync"; the script's own
            # arguments go after `--`, since some share the CLI's option names.
            cli = [sys.executable, "-m", "fabric_weightsync.cli"] if self.strategy == "registry" else [str(FABRIC_CLI)]
            commands = [
                [
                    *cli, "run", f"--devices={self.devices}", "--accelerator=cpu", f"--num-nodes={self.nodes}",
                    f"--node-rank={node}", "--main-address=127.0.0.1", f"--main-port={env['MASTER_PORT']}",
                    *(["--strategy=ddp_weightsync"] if self.strategy == "registry" else []),
                    str(TRAIN_SCRIPT), "--", *map(str, args),
                ]  # fmt: skip
                for node in range(self.nodes)
            ]
            return run_processes(commands, [env] * self.nodes, out_dir, self.timeout, self.settle)
        if self.mode == "slurm":
            envs = slurm_envs(env, self.procs_per_node, self.nodes)
            return run_processes([train_cmd(*args)] * len(envs), envs, out_dir, self.timeout, self.settle)
        raise ValueError(f"unknown launch mode {self.mode!r}")


LAUNCHES = {
    "popen": Launch("popen"),
    "spawn": Launch("spawn", workers=1),  # every spawned process re-imports Lightning: one worker is enough here
    "fork": Launch("fork"),
    "torchrun": Launch("torchrun", strategy="registry"),
    # Each node's sender serves its own workers over gloo (counted bytes) and checks its replica at every version.
    "torchrun-2nodes": Launch("torchrun", devices=2, workers=2, nodes=2, extra=("--transport", "gloo", "--verify-replicas", "1")),
    "slurm": Launch("slurm"),
    "cli": Launch("cli", workers=1),
    "cli-registry": Launch("cli", devices=1, workers=1, strategy="registry"),
    "cli-2nodes": Launch("cli", devices=1, workers=1, nodes=2),
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
