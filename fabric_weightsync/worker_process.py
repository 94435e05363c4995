"""The body of a worker process: join the run, run ``worker_fn`` with heartbeats, and report how it ended."""

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.environment import ProcessLayout
from fabric_weightsync.protocol import STOP_KEY, TrainingEnded, WorkerKeys, worker_keys
from fabric_weightsync.worker import WorkerContext

HEARTBEAT_INTERVAL = 0.5
"""Seconds between a worker's heartbeats."""

TRAINER_LOST_TIMEOUT = 10.0
"""Seconds of failed store calls after which a worker decides training rank 0 is gone and exits."""

EXIT_TRAINER_LOST = 75
"""Exit code of a worker that lost training rank 0."""

LATE_REPORT_TIMEOUT_S = 2.0
"""Seconds a worker that found training over tries to tell rank 0 it exited."""

LOG_CLOSE_TIMEOUT_S = 5.0
"""Seconds an exiting worker gives training rank 0 to take the metric records it still holds."""


class _Heartbeat(threading.Thread):
    """Beats for the trainer's monitor, and ends this process if training rank 0 is gone for good."""

    def __init__(self, context: WorkerContext) -> None:
        super().__init__(name="fws-heartbeat", daemon=True)
        self.context = context
        self._store = context.control.client()
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop beating and wait out a beat in flight: a daemon thread still inside a store call when the
        interpreter finalizes is unwound through C++ frames, which aborts the process ("terminate called
        without an active exception") after the worker's work is done."""
        self._stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5.0)

    def run(self) -> None:
        failing_since: Optional[float] = None
        keys = worker_keys(self.context.rank)
        while not self._stopped.wait(HEARTBEAT_INTERVAL):
            try:
                _beat(self._store, keys)
                self.context.evicted = self.context.evicted or self._store.check([keys.evicted])
                # A normal end must never read as a lost trainer, even if worker_fn never looked at the flag.
                self.context.training_ended = self.context.training_ended or self._store.check([STOP_KEY])
                failing_since = None
            except Exception:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 2 * HEARTBEAT_INTERVAL:  # one slow call is not a lost trainer
                    self.context.request_local_stop(lost=True)
                if now - failing_since > TRAINER_LOST_TIMEOUT:
                    _say(f"worker {self.context.worker_id}: training rank 0 unreachable for {TRAINER_LOST_TIMEOUT:.0f}s, exiting")
                    os._exit(EXIT_TRAINER_LOST)


def run_worker(worker_fn: Callable[[WorkerContext], object], context: WorkerContext) -> int:
    """Run ``worker_fn`` with heartbeats; report an exception to the trainer (then re-raise it) and the exit.

    Returns the process's exit code: 0, or :data:`EXIT_TRAINER_LOST` when ``worker_fn`` returned because training
    rank 0 became unreachable (a scheduler must not read that as success).
    """
    store, keys = context.control.store, worker_keys(context.rank)
    for stale in (keys.error, keys.exit, keys.evicted):  # a previous process's
        store.delete_key(stale)
    _beat(store, keys)  # once now: the monitor may look before the thread's first beat
    heartbeat = _Heartbeat(context)
    heartbeat.start()
    code = "1"
    try:
        try:
            worker_fn(context)
        except TrainingEnded as ended:
            _say(f"worker {context.worker_id}: {ended}; nothing to do, exiting")
        code = "0"
    except BaseException:
        _report(store, keys.error, traceback.format_exc())
        raise
    finally:
        context.close_logs(LOG_CLOSE_TIMEOUT_S)  # before the exit report: rank 0 takes the last records after it
        heartbeat.stop()
        _report(store, keys.exit, code)
    if context.trainer_lost:
        _say(f"worker {context.worker_id}: training rank 0 became unreachable before training ended")
        return EXIT_TRAINER_LOST
    return 0


def _beat(store: ControlStore, keys: WorkerKeys) -> None:
    """A heartbeat: a fresh timestamp, so a replayed older value reads as no beat at all."""
    store.set(keys.heartbeat, str(time.time_ns()))


def _say(message: str) -> None:
    print(f"[fabric_weightsync] {message}", file=sys.stderr, flush=True)


def _report(store, key: str, value: str) -> None:
    try:
        store.set(key, value.encode())
    except Exception:  # the trainer is gone: nobody to tell
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What a launcher needs to run this node's workers: plain values, picklable for spawned processes.

    Attributes:
        worker_fn: what each worker runs.
        layout: which local ranks are workers.
        backend: the weight groups' backend (``"gloo"`` or ``"nccl"``).
        sync_timeout: seconds for each blocking step of connecting and of a transfer.
        worker_device: the workers' device; ``cuda`` without an index gives worker ``i`` of a node GPU
            ``(devices + i) % device_count``.
    """

    worker_fn: Callable[[WorkerContext], Any]
    layout: ProcessLayout
    backend: str
    sync_timeout: float
    worker_device: Union[str, torch.device] = "cpu"

    def run(self, main_address: str, main_port: int, node_rank: int, local_rank: int) -> int:
        """Body of a worker process: join the control plane, run ``worker_fn``; returns the exit code."""
        layout = self.layout
        worker_id = layout.worker_id(node_rank, local_rank)
        try:
            control = ControlPlane.join(main_address, main_port, self.sync_timeout)
        except TrainingEnded as ended:
            _say(f"worker {worker_id}: {ended}; nothing to do, exiting")
            # Rank 0 may still wait for this worker's exit; it is not worth more than a brief try.
            self.report_exit(main_address, main_port, node_rank, local_rank, 0, timeout=LATE_REPORT_TIMEOUT_S)
            return 0
        # A worker is rank zero of its own process: Lightning loggers it creates write instead of skipping every call.
        rank_zero_only.rank = 0
        try:
            context = WorkerContext(
                worker_id=worker_id,
                num_workers=layout.num_workers,
                global_rank=layout.launch_rank(node_rank, local_rank),
                local_rank=local_rank,
                node_rank=node_rank,
                device=self.device(local_rank - layout.devices),
                control=control,
                backend=self.backend,
                timeout=self.sync_timeout,
                num_training_ranks=layout.devices * layout.num_nodes,
                num_nodes=layout.num_nodes,
            )
            return run_worker(self.worker_fn, context)
        except BaseException:
            _say(f"inference worker {worker_id} failed:\n{traceback.format_exc()}")
            return 1

    def report_exit(
        self, main_address: str, main_port: int, node_rank: int, local_rank: int, code: int, timeout: Optional[float] = None
    ) -> None:
        """Tell rank 0's monitor that a worker process of this node exited with ``code`` (a launcher saw it die, or
        it found training over); ``timeout`` defaults to the sync timeout."""
        rank = self.layout.worker_id(node_rank, local_rank) + 1
        timeout = self.sync_timeout if timeout is None else timeout
        try:
            ControlPlane.join(main_address, main_port, timeout, after_end=True).store.set(worker_keys(rank).exit, str(code).encode())
        except Exception:  # training rank 0 is gone too; nothing to tell
            pass

    def device(self, index: int) -> torch.device:
        """The device of this node's worker ``index``."""
        device = torch.device(self.worker_device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", (self.layout.devices + index) % max(1, torch.cuda.device_count()))
        return device
