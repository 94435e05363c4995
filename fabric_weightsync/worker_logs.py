"""Metrics that workers log (``ctx.log``, ``ctx.log_dict``), forwarded to training rank 0's Fabric loggers.

Each worker has one *mailbox* key in the control store. Its :class:`WorkerLogSender` buffers records and, from a
thread of its own, puts the oldest ones (one JSON chunk) in the mailbox whenever it is empty; the worker is its only
writer, and rank 0's :class:`WorkerLogCollector` its only reader, which takes a chunk and deletes the key. Rank 0
queues what it took and writes it to the loggers in the training thread (after each optimizer step, and at the end).

Nothing is dropped silently. Memory is bounded on both ends: rank 0 takes no chunk while its queue is full, and a
worker whose buffer is full drops its *oldest* record to keep the newest, counts it, warns, and reports the count to
rank 0 with its next chunk, where it is warned about again. A worker delivers what it still holds when it exits.
"""

import json
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.protocol import Aborted, poll_until, worker_log_key

log = logging.getLogger(__name__)

WORKER_LOG_CAPACITY = 10_000
"""Records a worker buffers at most; beyond, its oldest are dropped (counted and reported)."""
CHUNK_RECORDS = 500
"""Records in one mailbox chunk at most."""
RANK0_LOG_CAPACITY = 50_000
"""Records training rank 0 holds at most before writing them to its loggers; beyond, it leaves mailboxes full."""
COLLECT_INTERVAL_S = 0.25
"""How often rank 0 looks at the workers' mailboxes."""

Record = tuple[int, dict[str, float]]
"""``(step, {name: value})``: one ``log_dict`` call."""


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics`` as plain floats; ``TypeError`` naming the key of a value that is not one number."""
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"Metric names must be strings, got {name!r}")
        try:
            number = value.item() if hasattr(value, "item") else value  # a one-element tensor or numpy value
            out[name] = float(number)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"Metric {name!r} must be a number (or a one-element tensor), got {value!r}") from err
    return out


def encode_chunk(records: list[Record], dropped: int) -> bytes:
    return json.dumps({"records": records, "dropped": dropped}).encode()


def decode_chunk(raw: bytes) -> tuple[list[Record], int]:
    """What :func:`encode_chunk` wrote; ``ValueError`` for anything else."""
    try:
        chunk = json.loads(raw)
        records = [(int(step), {str(k): float(v) for k, v in metrics.items()}) for step, metrics in chunk["records"]]
        return records, int(chunk["dropped"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"not a chunk of worker log records: {err}") from err


class WorkerLogSender:
    """A worker's end: buffers records and delivers them to its mailbox from a thread of its own.

    :meth:`log` never blocks and never touches the network. Made by ``WorkerContext.log_dict``.

    Args:
        worker_id: the worker whose records these are.
        store: a control-store client of its own.
        capacity: records buffered at most (the oldest are dropped beyond, counted in :attr:`dropped`); default
            :data:`WORKER_LOG_CAPACITY`.
    """

    def __init__(self, worker_id: int, store: ControlStore, capacity: Optional[int] = None) -> None:
        self.worker_id = worker_id
        self.capacity = WORKER_LOG_CAPACITY if capacity is None else capacity
        self.dropped = 0
        """Records dropped because the buffer was full."""
        self.undelivered = 0
        """Records still held when the worker exited and rank 0 did not take them in time."""
        self._store = store
        self._key = worker_log_key(worker_id)
        self._records: deque[Record] = deque()
        self._unreported = 0  # drops not yet told to rank 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fws-log-sender", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = (int(step), scalar_metrics(metrics))
        with self._cond:
            if self._closing:
                raise RuntimeError(f"Worker {self.worker_id} has finished: its log records were already delivered")
            if len(self._records) >= self.capacity:
                self._records.popleft()
                self.dropped += 1
                self._unreported += 1
                if self.dropped == 1:
                    log.warning(
                        "fabric_weightsync: worker %d holds %d unsent log records: dropping the oldest from now on"
                        " (training rank 0 writes them to its loggers after each optimizer step; is it stepping?)",
                        self.worker_id,
                        self.capacity,
                    )
            self._records.append(record)
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Stop the thread, then deliver what is left within ``timeout`` seconds; warn about what could not be."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        deadline = time.monotonic() + timeout
        try:
            while self._pending() and self._deliver(max(0.0, deadline - time.monotonic())):
                pass
        except Exception:  # noqa: BLE001 - the store went away with training rank 0: nobody left to deliver to
            pass
        with self._cond:
            self.undelivered += len(self._records)
            self._records.clear()
        if self.undelivered:
            log.warning(
                "fabric_weightsync: worker %d exits with %d log records that training rank 0 did not take",
                self.worker_id,
                self.undelivered,
            )

    def _pending(self) -> bool:
        with self._cond:
            return bool(self._records or self._unreported)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing or self._records or self._unreported)
                    if self._closing:
                        return  # close() delivers the rest
                self._deliver(None)
        except Aborted:
            return
        except Exception:  # noqa: BLE001 - the store went away with training rank 0; close() counts what is left
            return

    def _deliver(self, timeout: Optional[float]) -> bool:
        """Wait for the mailbox to be empty, then put the oldest records in it; ``False`` if it stayed full."""
        in_thread = threading.current_thread() is self._thread  # close() stops the thread's wait, not its own
        free = lambda: not self._store.check([self._key])  # noqa: E731
        if not poll_until(free, timeout, max_pause=protocol.SLOW_POLL_S, aborted=lambda: in_thread and self._closing):
            return False
        with self._cond:
            records = [self._records.popleft() for _ in range(min(CHUNK_RECORDS, len(self._records)))]
            dropped, self._unreported = self._unreported, 0
        try:
            self._store.set(self._key, encode_chunk(records, dropped))
        except Exception:
            self.undelivered += len(records)
            raise
        return True


class WorkerLogCollector:
    """Training rank 0's end: takes the workers' chunks in a thread, writes them to loggers in the caller's.

    Args:
        open_store: opens a new client of the control store.
        num_workers: inference workers in the run.
        capacity: records held at most between two :meth:`forward` calls; default :data:`RANK0_LOG_CAPACITY`.
        start: take chunks in a thread (otherwise only when :meth:`collect` is called).
    """

    def __init__(
        self, open_store: Callable[[], ControlStore], num_workers: int, capacity: Optional[int] = None, start: bool = True
    ) -> None:
        self.num_workers = num_workers
        self.capacity = RANK0_LOG_CAPACITY if capacity is None else capacity
        self.forwarded = 0
        """Records written to the loggers (or, with no logger, counted and warned about)."""
        self.dropped = 0
        """Records the workers reported dropping."""
        self._store = open_store()
        self._queue: deque[tuple[int, Record]] = deque()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._warned_no_logger = False
        self._thread = threading.Thread(target=self._run, name="fws-worker-logs", daemon=True)
        if start:
            self._thread.start()

    def forward(self, loggers: list) -> int:
        """Write the records taken so far to every logger of ``loggers``, oldest first; returns how many."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        if items and not loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            log.warning("fabric_weightsync: workers log metrics, but Fabric has no loggers (Fabric(loggers=...)) to write them to")
        for _, (step, metrics) in items:
            for logger in loggers:
                logger.log_metrics(metrics, step=step)
        self.forwarded += len(items)
        return len(items)

    def close(self, loggers: list) -> None:
        """At the end of training (workers have exited): take and write everything left, then save the loggers."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            while True:
                self.forward(loggers)
                if not self.collect():
                    break
        except Exception:  # noqa: BLE001 - the store is gone: what the workers still held is lost, and they said so
            pass
        self.forward(loggers)
        for logger in loggers:
            logger.save()

    def collect(self) -> bool:
        """One look at every mailbox with room left for its chunk; returns whether anything was taken."""
        took = False
        for worker_id in range(self.num_workers):
            with self._lock:
                if len(self._queue) >= self.capacity:
                    return took  # the mailboxes stay full: workers buffer, then drop their oldest (and say so)
            key = worker_log_key(worker_id)
            raw = self._store.read(key)  # never blocks: empty, or not signed by this run, reads as None
            if raw is None:
                continue
            self._store.delete_key(key)
            took = True
            try:
                records, dropped = decode_chunk(raw)
            except ValueError as err:  # not the worker's writing
                log.warning("fabric_weightsync: ignoring store key %r: %s", key, err)
                continue
            if dropped:
                self.dropped += dropped
                log.warning(
                    "fabric_weightsync: worker %d dropped %d log records (%d in all) to keep its newest: it logs"
                    " faster than training rank 0 writes them to its loggers, which it does after each optimizer step",
                    worker_id,
                    dropped,
                    self.dropped,
                )
            with self._lock:
                self._queue.extend((worker_id, record) for record in records)
        return took

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                if not self.collect():  # a worker with a backlog refills its mailbox at once: look again
                    self._stopped.wait(COLLECT_INTERVAL_S)
        except Exception:  # noqa: BLE001 - the store went away: training is over
            return
