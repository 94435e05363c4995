"""Launchers that start ``devices + inference_workers`` processes per node and route each to its role.

Workers run :meth:`~fabric_weightsync.worker_process.WorkerSpec.run` instead of the user's training code: in script mode
they stop inside ``fabric.launch()`` and exit there; in spawn mode they never call the user's function.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.strategies import ParallelStrategy
from lightning.fabric.strategies.launchers.launcher import _Launcher
from lightning.fabric.strategies.launchers.multiprocessing import (
    _check_bad_cuda_fork,
    _check_missing_main_guard,
    _GlobalStateSnapshot,
    _MultiProcessingLauncher,
)
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd, _hydra_subprocess_cmd
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from typing_extensions import override

from fabric_weightsync.auth import ensure_secret
from fabric_weightsync.worker_process import LATE_REPORT_TIMEOUT_S, WorkerSpec

REPORT_TIMEOUT_S = 10.0
"""Seconds the child watcher tries to tell rank 0 that a worker died: later than that, rank 0's heartbeat monitor
knows anyway, and the watcher must not hold this process's exit for long when rank 0 is gone."""

CRASH_GRACE_S = 5.0
"""Seconds workers get to exit after training failed: they were told to stop, and one may still be printing why it
failed (a schema mismatch is reported on both sides)."""


class TrainingCrash:
    """Whether the training code of this process raised: shutdown then skips the final delivery and launchers
    stop waiting for training children (they may be blocked in a collective with the dead rank)."""

    def __init__(self) -> None:
        self.crashed = False
        self._installed = False

    def install(self) -> None:
        """Also count an exception that reaches the interpreter's top level (script mode: after ``launch()``)."""
        if self._installed:
            return
        self._installed = True
        previous = sys.excepthook

        def hook(*exc_info: Any) -> None:
            self.crashed = True
            previous(*exc_info)

        sys.excepthook = hook


class WeightSyncScriptLauncher(_Launcher):
    """``python train.py`` + ``fabric.launch()``, torchrun, SLURM and ``fabric run``.

    When the cluster does not create the processes (plain ``python train.py``), local rank 0 of each node
    re-runs the script ``devices + inference_workers - 1`` times with ``LOCAL_RANK`` set, like Fabric's own
    script launcher; children get ``PR_SET_PDEATHSIG`` so they cannot outlive it. Under torchrun or SLURM the
    processes already exist and each one just takes its role. Under ``fabric run`` only the training processes
    exist and ``launch()`` is never called: see :meth:`start_cli_workers`.
    """

    def __init__(self, cluster_environment: ClusterEnvironment, worker: WorkerSpec, shutdown_timeout: float, crash: TrainingCrash) -> None:
        self.cluster_environment = cluster_environment
        self.worker = worker
        self.shutdown_timeout = shutdown_timeout
        self.crash = crash
        self.children: dict[int, subprocess.Popen] = {}
        self._watcher: Optional[_ChildWatcher] = None

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return False

    @override
    def launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        env, layout = self.cluster_environment, self.worker.layout
        env.validate_settings(num_devices=layout.processes_per_node, num_nodes=layout.num_nodes)
        if not env.creates_processes_externally:
            self._start_children(range(1, layout.processes_per_node))
        self._run_if_worker()
        _set_num_threads_if_needed(num_processes=layout.processes_per_node)
        return function(*args, **kwargs)

    def start_cli_workers(self) -> None:
        """``fabric run``: the CLI's torchrun started the ``devices`` training processes of each node, and Fabric
        sets them up in ``Fabric(...)`` instead of calling ``launch()``. Local rank 0 of each node starts this
        node's workers by re-running the script; in a worker, this runs ``worker_fn`` and exits the process."""
        layout = self.worker.layout
        if self.cluster_environment.local_rank() == 0 and not self.children:
            self._start_children(range(layout.devices, layout.processes_per_node))
        self._run_if_worker()

    def _run_if_worker(self) -> None:
        env = self.cluster_environment
        if self.worker.layout.is_worker(env.local_rank()):
            sys.exit(self.worker.run(env.main_address, env.main_port, env.node_rank(), env.local_rank()))

    def _start_children(self, local_ranks: range) -> None:
        env, layout = self.cluster_environment, self.worker.layout
        if env.node_rank() == 0:  # rank 0's node: the children inherit the run's secret (other nodes: the job's)
            ensure_secret()
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = "0"
        os.environ["WORLD_SIZE"] = str(layout.devices * layout.num_nodes)
        for local_rank in local_ranks:
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            command, cwd = _child_command(local_rank)
            # Unlike Fabric's launcher, children die with this process: a dead rank 0 ends the run anyway,
            # and orphans would hang in collectives or wait for weights that never come.
            self.children[local_rank] = subprocess.Popen(command, env=child_env, cwd=cwd, preexec_fn=_die_with_parent)
        self._watcher = _ChildWatcher(self.cluster_environment, self.worker, self.children)
        self._watcher.start()
        self.crash.install()

    def join_children(self) -> None:
        """At exit: wait for this node's training children, then give workers ``shutdown_timeout`` to stop; then
        stop the child watcher.

        The children die with this process (``PR_SET_PDEATHSIG``), so it must not exit before them: training
        ranks may still be finishing, and workers still taking the final version from rank 0.
        """
        layout = self.worker.layout
        trainers = [proc for rank, proc in self.children.items() if not layout.is_worker(rank)]
        workers = [proc for rank, proc in self.children.items() if layout.is_worker(rank)]
        if self.crash.crashed:  # training children may be blocked in a collective with this dead rank
            if self._watcher is not None:
                self._watcher.watch_trainers = False  # they are killed here on purpose
            _join_or_kill(trainers, 0.0, wait=lambda proc, t: proc.wait(t))
            _join_or_kill(workers, min(CRASH_GRACE_S, self.shutdown_timeout), wait=lambda proc, t: proc.wait(t))
        else:
            for proc in trainers:
                proc.wait()
            _join_or_kill(workers, self.shutdown_timeout, wait=lambda proc, t: proc.wait(t))
        if self._watcher is not None:
            self._watcher.stop()


class WeightSyncSpawnLauncher(_MultiProcessingLauncher):
    """``fabric.launch(fn)`` with ``start_method`` spawn, fork or forkserver.

    Fabric's launcher starts the training processes and returns rank 0's result; the workers are started
    next to them as separate processes, so a worker that dies is handled by the failure policy instead of
    tearing the whole process group down.
    """

    def __init__(
        self,
        strategy: ParallelStrategy,
        start_method: str,
        worker: WorkerSpec,
        shutdown_timeout: float,
        wrap_training: Callable[[Callable], Callable],
    ) -> None:
        super().__init__(strategy, start_method=start_method)
        self.worker = worker
        self.shutdown_timeout = shutdown_timeout
        self.wrap_training = wrap_training

    @override
    def launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        if self._start_method in ("fork", "forkserver"):
            _check_bad_cuda_fork()
        if self._start_method == "spawn":
            _check_missing_main_guard()
        env = self._strategy.cluster_environment
        if env.node_rank() == 0:  # every process started here inherits the run's secret (other nodes: the job's)
            ensure_secret()
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        context = mp.get_context(self._start_method)
        layout = self.worker.layout
        states = _GlobalStateSnapshot.capture() if self._start_method == "spawn" else None
        where = (env.main_address, env.main_port, env.node_rank())
        workers = [
            context.Process(target=_spawned_worker, args=(self.worker, where, local_rank, states), daemon=False)
            for local_rank in range(layout.devices, layout.processes_per_node)
        ]
        for proc in workers:
            proc.start()
        watcher = _ChildWatcher(env, self.worker, dict(zip(range(layout.devices, layout.processes_per_node), workers)))
        watcher.start()
        return_queue = context.SimpleQueue()
        process_args = [function, args, kwargs, return_queue] + ([states] if states else [])
        grace = min(CRASH_GRACE_S, self.shutdown_timeout)  # training failed: workers have no one left to serve
        try:
            mp.start_processes(self._wrapping_function, args=process_args, nprocs=layout.devices, start_method=self._start_method)
            grace = self.shutdown_timeout
        finally:
            _join_or_kill(workers, grace, wait=lambda proc, t: proc.join(t))
            watcher.stop()
        return return_queue.get()

    @override
    def _wrapping_function(self, process_idx: int, function: Callable, *rest: Any) -> None:
        super()._wrapping_function(process_idx, self.wrap_training(function), *rest)


def _spawned_worker(worker: WorkerSpec, where: tuple[str, int, int], local_rank: int, states: Optional[_GlobalStateSnapshot]) -> None:
    _die_with_parent()
    if states is not None:
        states.restore()
    os.environ["LOCAL_RANK"] = str(local_rank)
    main_address, main_port, node_rank = where
    code = worker.run(main_address, main_port, node_rank, local_rank)
    if code:
        sys.exit(code)


class _ChildWatcher(threading.Thread):
    """Reports this node's dead worker children to rank 0 at once; a dead trainer child ends the run (as Fabric).

    Each report is a few store calls: :meth:`stop` must be called (and waits) before the interpreter finalizes,
    since a daemon thread that returns from a store call while it finalizes aborts the process ("terminate
    called without an active exception").
    """

    def __init__(self, env: ClusterEnvironment, worker: WorkerSpec, children: dict, period: float = 0.2) -> None:
        super().__init__(name="fws-child-watcher", daemon=True)
        self.env = env
        self.worker = worker
        self.children = children
        self.period = period
        self._stopped = threading.Event()
        self._reported: set[int] = set()
        self.watch_trainers = True
        """Whether a trainer child's failure kills the run (not once this process is killing them itself)."""

    def stop(self) -> None:
        """Stop watching after one last look (a child that died since the previous one is still reported, briefly:
        rank 0 may be gone) and wait for the thread, a report in flight included (each has a timeout)."""
        self._stopped.set()
        self.join()

    def run(self) -> None:
        while not self._stopped.wait(self.period):
            self._look(lambda: min(REPORT_TIMEOUT_S, self.worker.sync_timeout))
        deadline = time.monotonic() + LATE_REPORT_TIMEOUT_S  # one budget for the last look, however many died
        self._look(lambda: deadline - time.monotonic())

    def _look(self, report_timeout: Callable[[], float]) -> None:
        for local_rank, proc in self.children.items():
            code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode
            if code is None or code == 0 or local_rank in self._reported:
                continue
            self._reported.add(local_rank)
            if self.worker.layout.is_worker(local_rank):
                timeout = report_timeout()
                if timeout > 0:
                    env = self.env
                    self.worker.report_exit(env.main_address, env.main_port, env.node_rank(), local_rank, code, timeout)
            elif self.watch_trainers and not self._stopped.is_set():
                self._terminate_all()

    def _terminate_all(self) -> None:
        for proc in self.children.values():
            if proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        os.kill(os.getpid(), signal.SIGKILL)


def _join_or_kill(procs: list, timeout: float, wait: Callable[[Any, float], Any]) -> None:
    deadline = time.monotonic() + timeout  # one budget for all of them, not one each
    for proc in procs:
        try:
            wait(proc, max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if (proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode) is None:
            proc.kill()
            wait(proc, 5)


def _child_command(local_rank: int) -> tuple[list, Optional[str]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            command, cwd = _hydra_subprocess_cmd(local_rank=local_rank)
            return list(command), cwd
    except ImportError:
        pass
    return list(_basic_subprocess_cmd()), None


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs it when the launching process dies."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
