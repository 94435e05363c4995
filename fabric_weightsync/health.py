"""What training rank 0 knows of its workers: status, heartbeats, exit and error reports, and the failure policy."""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Literal, Optional, Sequence

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
    bytes_sent: int = 0
    """Bytes of weights this process sent to the worker (0 for a worker that reads shared memory or that another
    node's sender serves)."""
    relay_of: Optional[int] = None
    """Set for the relay of a node (a training process that takes the weights for that node's workers), not a worker."""

    @property
    def rank(self) -> int:
        return self.worker_id + 1

    @property
    def name(self) -> str:
        return f"inference worker {self.worker_id}" if self.relay_of is None else f"the relay of node {self.relay_of}"

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
        worker_ids: the workers this process knows the status of.
        on_worker_failure: ``"raise"``: :meth:`raise_if_failed` raises :class:`WorkerFailedError` once per failure;
            ``"continue"``: failures are logged only.
        heartbeat_timeout: a connected worker whose heartbeat is older than this is declared dead.
        open_store: opens a new client of the control store.
        conditions: conditions (sharing one lock) to notify after a change; the first guards the statuses.
        watched: the workers whose heartbeats and exit reports the monitor reads (default: all); the others' statuses
            come from their node's sender through :meth:`mirror`.
        relays: the nodes whose relays this process serves (they send no heartbeats: a relay lives in a training
            process, whose death ends the run anyway).
    """

    def __init__(
        self,
        worker_ids: Sequence[int],
        on_worker_failure: FailurePolicy,
        heartbeat_timeout: float,
        open_store: Callable[[], ControlStore],
        conditions: tuple[threading.Condition, ...],
        watched: Optional[Collection[int]] = None,
        relays: Sequence[int] = (),
    ) -> None:
        if on_worker_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_worker_failure must be one of {FAILURE_POLICIES}, got {on_worker_failure!r}")
        self.workers = [WorkerStatus(i) for i in worker_ids]
        self._by_id = {status.worker_id: status for status in self.workers}
        self.watched = [self._by_id[i] for i in (worker_ids if watched is None else watched)]
        first_relay = max(worker_ids, default=-1) + 1
        self.relays = [WorkerStatus(first_relay + i, relay_of=node) for i, node in enumerate(relays)]
        self._by_id.update((status.worker_id, status) for status in self.relays)
        self.served = self.watched + self.relays
        """Whom this process sends weights to: its own workers and the relays."""
        self.on_worker_failure = on_worker_failure
        self.heartbeat_timeout = heartbeat_timeout
        self._open_store = open_store
        self._conditions = conditions
        self._raised: set[int] = set()
        self.on_failed: Callable[[int], Callable[[], None]] = lambda worker_id: lambda: None
        """Called under the lock with a failed worker's id; what it returns is called once the lock is released."""
        self.on_look: list[Callable[[ControlStore], None]] = []
        """Called by the monitor after each look at the workers, and once more when it stops, with its store."""
        self._monitor: Optional[_Monitor] = None
        self._evictions: Optional[ControlStore] = None
        self._evictions_lock = threading.Lock()

    def status(self, worker_id: int) -> WorkerStatus:
        return self._by_id[worker_id]

    def start_monitor(self) -> None:
        # Evictions go through a client opened now: a new one would retry connecting to a store gone with rank 0.
        self._evictions = self._open_store()
        self._monitor = _Monitor(self, self._open_store())
        self._monitor.start()

    def stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor.last_look()

    def joined(self, status: WorkerStatus) -> None:
        """A worker (re)connected: serve it again from the newest version."""
        with self._conditions[0]:
            status.connected = True
            status.beat = None  # heartbeat silence counts from (re)connect, not from a previous process or start
            if status.alive and status.error is None:
                return
            status.alive, status.error, status.acked_version, status.applied_row = True, None, -1, None
            self._raised.discard(status.worker_id)
        log.warning("fabric_weightsync: %s rejoined", status.name)

    def delivered(self, status: WorkerStatus, version: int) -> None:
        with self._conditions[0]:
            status.acked_version = version
            self._notify()

    def failed(self, worker_id: int, reason: str, error: bool = True, evict: bool = True) -> None:
        """Mark a worker gone (idempotent) and stop serving it; ``error`` ones count for the failure policy;
        ``evict``: tell the worker, which reconnects if it still runs (its node's sender does that for a mirror)."""
        status = self._by_id[worker_id]
        with self._conditions[0]:
            if not status.alive:
                return
            status.alive = False
            status.error = reason if error else None
            stop_serving = self.on_failed(worker_id)
            self._notify()
        log.warning("fabric_weightsync: %s %s: %s", status.name, "failed" if error else "left", reason)
        stop_serving()
        if not evict:
            return
        try:  # a worker that is only slow or was cut off reconnects (full resync) when it sees this
            with self._evictions_lock:
                self._evictions.set(worker_keys(status.rank).evicted, reason.encode())
        except Exception:  # the store is shutting down with the trainer
            pass

    def mirror(self, worker_id: int, delivered: int, alive: bool, error: Optional[str], connected: bool) -> None:
        """Take a worker's status as its node's sender reports it."""
        status = self._by_id[worker_id]
        if alive and not status.alive:
            self.joined(status)
        with self._conditions[0]:
            status.connected, status.acked_version = connected, delivered
            self._notify()
        if not alive and status.alive:
            self.failed(worker_id, error or "worker_fn returned before training ended", error=error is not None, evict=False)

    def raise_if_failed(self) -> None:
        """Raise :class:`WorkerFailedError` for a failure not raised yet (under ``on_worker_failure="raise"``)."""
        if self.on_worker_failure != "raise":
            return
        for status in self.workers + self.relays:
            if status.error is not None and status.worker_id not in self._raised:
                self._raised.add(status.worker_id)
                raise WorkerFailedError(f"{status.name[0].upper()}{status.name[1:]} failed: {status.error}")

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
            try:
                for status in self.health.watched:
                    if status.alive:
                        self._check(status, now)
                self._look()
            except Exception:  # store shutting down with the trainer
                return

    def last_look(self) -> None:
        """Run the look hooks once more (a node sender's final report), if the store still answers."""
        if self.is_alive():  # stuck in a store call past stop(): its client is busy
            return
        try:
            self._look()
        except Exception:  # store shutting down with the trainer
            pass

    def _look(self) -> None:
        for hook in self.health.on_look:
            hook(self._store)

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
