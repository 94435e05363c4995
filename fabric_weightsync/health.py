"""What training rank 0 knows of its workers: status, heartbeats, exit and error reports, and the failure policy."""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.protocol import WorkerKeys, worker_keys

log = logging.getLogger(__name__)

FailurePolicy = Literal["raise", "continue"]
FAILURE_POLICIES = ("raise", "continue")

MONITOR_INTERVAL_S = 0.25
"""How often the monitor looks at every worker's reports and heartbeat."""

STALL_TOLERANCE_S = MONITOR_INTERVAL_S
"""How much later than asked the monitor may look again before the delay counts as a stall of its own process."""


class WorkerFailedError(RuntimeError):
    """An inference worker died, raised or stopped answering."""


@dataclass
class WorkerStatus:
    """What training rank 0 knows about one worker."""

    worker_id: int
    acked_version: int = -1
    """Newest version the worker acknowledged to its link."""
    applied_row: Optional[memoryview] = field(default=None, repr=False)
    """The ``(sequence, version)`` the worker writes itself on applying (shared memory), if it reports that way."""
    alive: bool = True
    error: Optional[str] = None
    connected: bool = False
    beat: Optional[int] = None
    """Newest heartbeat stamp seen, and when it was first seen (on the monitor's clock, see :class:`_Monitor`); reset
    when the worker (re)joins."""
    beat_seen_at: float = 0.0

    @property
    def rank(self) -> int:
        return self.worker_id + 1

    def progress(self) -> str:
        """How far a worker that does not hold the initial weights yet got, for an error that names it."""
        if self.connected:
            return "connecting: its policy is being checked or its initial weights are on the way"
        if self.beat:
            return "running, but it has not called ctx.connect(policy) yet"
        return "no sign of its process yet (not started, still importing, or it cannot reach training rank 0)"

    @property
    def delivered_version(self) -> int:
        """Newest version this worker has applied, as far as rank 0 knows (-1: none since it (re)connected)."""
        row = self.applied_row
        return max(self.acked_version, int(row[1])) if row is not None else self.acked_version


def read_exit_report(store: ControlStore, keys: WorkerKeys) -> Optional[str]:
    """``""`` if the worker finished cleanly, why it failed if it did, ``None`` while it runs."""
    error = store.read(keys.error)
    if error is not None:
        return "it raised:\n" + error.decode(errors="replace")
    code = store.read(keys.exit)
    if code is not None:
        code = code.decode(errors="replace")
        return "" if code == "0" else f"its process exited with code {code}"
    return None


class Health:
    """The workers' statuses and the failure policy; notifies ``conditions`` whenever a status changes.

    Args:
        num_workers: workers ``0 .. num_workers - 1``.
        on_worker_failure: ``"raise"``: :meth:`raise_if_failed` raises :class:`WorkerFailedError` once per failure;
            ``"continue"``: failures are logged only.
        heartbeat_timeout: a connected worker whose heartbeat is older than this is declared dead.
        open_store: opens a new client of the control store.
        conditions: conditions (sharing one lock) to notify after a change; the first guards the statuses.
    """

    def __init__(
        self,
        num_workers: int,
        on_worker_failure: FailurePolicy,
        heartbeat_timeout: float,
        open_store: Callable[[], ControlStore],
        conditions: tuple[threading.Condition, ...],
    ) -> None:
        if on_worker_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_worker_failure must be one of {FAILURE_POLICIES}, got {on_worker_failure!r}")
        self.workers = [WorkerStatus(i) for i in range(num_workers)]
        self.on_worker_failure = on_worker_failure
        self.heartbeat_timeout = heartbeat_timeout
        self._open_store = open_store
        self._conditions = conditions
        self._raised: set[int] = set()
        self.on_failed: Callable[[int], Callable[[], None]] = lambda worker_id: lambda: None
        """Called under the lock with a failed worker's id; what it returns is called once the lock is released."""
        self._monitor: Optional[_Monitor] = None

    def start_monitor(self) -> None:
        self._monitor = _Monitor(self, self._open_store())
        self._monitor.start()

    def stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()

    def joined(self, status: WorkerStatus) -> None:
        """A worker (re)connected: serve it again from the newest version."""
        with self._conditions[0]:
            status.connected = True
            status.beat = None  # heartbeat silence counts from (re)connect, not from a previous process or start
            if status.alive and status.error is None:
                return
            status.alive, status.error, status.acked_version, status.applied_row = True, None, -1, None
            self._raised.discard(status.worker_id)
        log.warning("fabric_weightsync: inference worker %d rejoined", status.worker_id)

    def delivered(self, status: WorkerStatus, version: int) -> None:
        with self._conditions[0]:
            status.acked_version = version
            self._notify()

    def failed(self, worker_id: int, reason: str, error: bool = True) -> None:
        """Mark a worker gone (idempotent) and stop serving it; ``error`` ones count for the failure policy."""
        status = self.workers[worker_id]
        with self._conditions[0]:
            if not status.alive:
                return
            status.alive = False
            status.error = reason if error else None
            stop_serving = self.on_failed(worker_id)
            self._notify()
        log.warning("fabric_weightsync: inference worker %d %s: %s", worker_id, "failed" if error else "left", reason)
        stop_serving()
        try:  # a worker that is only slow or was cut off reconnects (full resync) when it sees this
            self._open_store().set(worker_keys(status.rank).evicted, reason.encode())
        except Exception:  # the store is shutting down with the trainer
            pass

    def raise_if_failed(self) -> None:
        """Raise :class:`WorkerFailedError` for a failure not raised yet (under ``on_worker_failure="raise"``)."""
        if self.on_worker_failure != "raise":
            return
        for status in self.workers:
            if status.error is not None and status.worker_id not in self._raised:
                self._raised.add(status.worker_id)
                raise WorkerFailedError(f"Inference worker {status.worker_id} failed: {status.error}")

    def report_late_failures(self) -> None:
        """After the workers' exit: fail workers whose error arrived after the monitor stopped."""
        store = self._open_store()
        for status in self.workers:
            report = read_exit_report(store, worker_keys(status.rank)) if status.alive else None
            if report and report.startswith("it raised"):
                self.failed(status.worker_id, report)

    def _notify(self) -> None:
        for condition in self._conditions:
            condition.notify_all()


class _Monitor(threading.Thread):
    """Declares a worker dead when it reports an error, exits, or its heartbeat stops advancing.

    Silence is measured on a clock that stops while the monitor itself could not run (it looked again much later
    than it asked to: its process or host was frozen or starved). A worker's beat thread most likely could not
    run then either, and must get the chance to beat before the stall counts against it.
    """

    def __init__(self, health: Health, store: ControlStore) -> None:
        super().__init__(name="fws-heartbeat-monitor", daemon=True)
        self.health = health
        self._store = store
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)

    def run(self) -> None:
        stalled = 0.0
        last = time.monotonic()
        while not self._stopped.wait(MONITOR_INTERVAL_S):
            now = time.monotonic()
            stalled += max(0.0, now - last - MONITOR_INTERVAL_S - STALL_TOLERANCE_S)
            last = now
            now -= stalled
            for status in self.health.workers:
                if not status.alive:
                    continue
                try:
                    self._check(status, now)
                except Exception:  # store shutting down with the trainer
                    return

    def _check(self, status: WorkerStatus, now: float) -> None:
        keys = worker_keys(status.rank)
        report = read_exit_report(self._store, keys)
        if report == "":
            self.health.failed(status.worker_id, "worker_fn returned before training ended", error=False)
        elif report is not None:
            self.health.failed(status.worker_id, report)
        else:
            # Read before the beat: a worker that connects meanwhile resets its beat, and must not be judged on the
            # silence of its start-up.
            connected = status.connected
            beat = self._store.read(keys.heartbeat)
            stamp = int(beat) if beat is not None and beat.isdigit() else -1
            if status.beat is None or stamp > status.beat:  # silence counts from connect; a replayed stamp is no beat
                status.beat, status.beat_seen_at = stamp, now
                return
            # A worker that connected has been beating since before its connect; one that never connected may
            # still be starting up (imports, building envs), which is not a failure.
            silent = now - status.beat_seen_at
            if connected and silent > self.health.heartbeat_timeout:
                self.health.failed(status.worker_id, f"no heartbeat for {silent:.1f}s (process killed or hung)")
