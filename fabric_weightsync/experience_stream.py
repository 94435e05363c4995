"""A training rank's end of the experience path: a bounded stream of batches from its workers.

Each training rank receives from the workers that :class:`~fabric_weightsync.experience.ExperienceRoutes` gives
it (a worker sends to training ranks of its own node: to one when a node has at least as many workers as ranks;
with fewer, a worker feeds several ranks, each batch going to one with room). One receiver thread per worker accepts the
worker's schema, then posts a receive (and grants the worker a credit through the store) only while the stream's
queue has room: **workers block** when the trainer is slower than they are, and memory on this rank stays at
``capacity`` x the batch size. Store keys and group names are those of :mod:`~fabric_weightsync.protocol`.
"""

import logging
import os
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.channels import new_pair_group
from fabric_weightsync.experience import (
    ExperienceBatch,
    ExperienceError,
    ExperienceRoutes,
    ExperienceSchema,
    ExperienceTimeout,
)
from fabric_weightsync.health import FailurePolicy, WorkerFailedError, read_exit_report
from fabric_weightsync.protocol import (
    STOP_KEY,
    experience_epoch_key,
    experience_group_name,
    experience_key,
    poll_until,
    read_epoch,
    worker_keys,
)

log = logging.getLogger(__name__)

_FOREVER = timedelta(days=7)
"""How long a posted receive may wait: a worker may take as long as it likes to produce its next batch."""
EPOCH_POLL_S = 0.02
"""Longest pause between looks for a worker's (next) connection."""
EXIT_CHECK_S = 0.25
"""Seconds between looks at the exit report of a worker that has not connected."""
_RECONNECTED = "reconnected"
"""Why a connection ended when a newer connection of the same worker superseded it: not a failure."""


class ExperienceStream:
    """A training rank's stream of experience from its workers (see :class:`ExperienceRoutes`).

    Iterate it (``for batch in stream``) or take ``get(n)`` batches at a time; each item is an
    :class:`ExperienceBatch`. Batches of one worker arrive in the order it sent them. One background thread per
    worker receives into a bounded queue and posts its next receive only when the queue has room, so **workers
    block** in ``ctx.send()`` while it is full; memory on this rank is at most ``capacity`` x the batch size.

    With DDP, take the same number of batches on every rank per update (``get(n)``) so every rank runs the same
    number of steps; a worker shared by several ranks sends each batch to one that has room, so they all get
    theirs. Iteration ends when every worker of this rank has finished and all its batches were taken.

    Made by :meth:`WeightSyncStrategy.experience` (``fabric.strategy.experience(capacity=..., max_staleness=...)``).

    Args:
        rank: this training rank.
        routes: which workers send to which training ranks.
        open_store: opens a new client of the control store.
        policy_version: this rank's current policy version (for ``max_staleness``).
        on_worker_failure: ``"raise"``: a failed worker raises :class:`WorkerFailedError` from the next take;
            ``"continue"``: it is logged.
        sync_timeout: seconds for each group operation.
        capacity: batches this rank holds at most, waiting to be taken or arriving; memory for experience stays at
            ``capacity`` x the batch size. Default: two per worker of this rank, so each worker can have one batch
            waiting to be taken while it sends the next; a worker that gets further ahead blocks in ``ctx.send``.
        max_staleness: drop batches collected with a policy more than this many versions older than
            ``policy_version()`` (counted in :attr:`dropped`); ``None`` keeps every batch.
        timeout: default seconds :meth:`get` and ``next()`` wait before raising :class:`ExperienceTimeout`;
            ``None`` waits as long as this rank's workers are alive.
        max_batch_bytes: the largest batch a worker may declare, checked before any buffer is allocated; default:
            the size of the first worker's batches (and at most a quarter of this host's memory).
    """

    def __init__(
        self,
        *,
        rank: int,
        routes: ExperienceRoutes,
        open_store: Callable[[], ControlStore],
        policy_version: Callable[[], int],
        on_worker_failure: FailurePolicy = "raise",
        sync_timeout: float = 60.0,
        capacity: Optional[int] = None,
        max_staleness: Optional[int] = None,
        timeout: Optional[float] = None,
        max_batch_bytes: Optional[int] = None,
    ) -> None:
        self.rank = rank
        self.worker_ids = routes.workers_of(rank)
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self._policy_version = policy_version
        self._on_worker_failure = on_worker_failure
        self.capacity = capacity if capacity is not None else 2 * len(self.worker_ids)
        self.max_staleness = max_staleness
        self.timeout = timeout
        self._batch_limit = None if max_batch_bytes is None else (max_batch_bytes, f"max_batch_bytes={max_batch_bytes}")
        self.received = 0
        """Batches that arrived on this rank (taken, dropped or still queued)."""
        self.dropped = 0
        """Batches dropped for being more than ``max_staleness`` versions old."""
        self._queue: deque[ExperienceBatch] = deque()
        self._free = self.capacity
        self._cond = threading.Condition()
        self._closing = False
        self._ended: dict[int, Optional[str]] = {}
        self._unreported: list[int] = []
        self._receivers = [_WorkerReceiver(self, w, rank, open_store(), sync_timeout) for w in self.worker_ids]
        for receiver in self._receivers:
            receiver.start()

    # ------------------------------------------------------------------ consumer
    def __iter__(self) -> Iterator[ExperienceBatch]:
        return self

    def __next__(self) -> ExperienceBatch:
        batch = self._take(self.timeout)
        if batch is None:
            raise StopIteration
        return batch

    def get(self, n: int, timeout: Optional[float] = None) -> list[ExperienceBatch]:
        """The next ``n`` batches (after staleness drops), waiting for them; ``timeout`` covers all ``n``.

        Raises :class:`ExperienceError` when this rank's workers finish before ``n`` batches came, and
        :class:`ExperienceTimeout` after ``timeout`` seconds (default: the stream's ``timeout``).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        batches: list[ExperienceBatch] = []
        while len(batches) < n:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            batch = self._take(remaining, wanted=(len(batches), n))
            if batch is None:
                raise ExperienceError(
                    f"Training rank {self.rank}: its workers {self.worker_ids} have all finished; got {len(batches)} of"
                    f" the {n} batches asked for"
                )
            batches.append(batch)
        return batches

    @property
    def queued(self) -> int:
        """Batches received and waiting to be taken."""
        with self._cond:
            return len(self._queue)

    @property
    def in_use(self) -> int:
        """Slots taken: batches queued plus receives posted. Never more than ``capacity``."""
        with self._cond:
            return self.capacity - self._free

    def close(self, wait: float = 0.0) -> None:
        """Stop posting receives; workers of this rank then wait in ``send`` until training stops.

        ``wait``: give the receiving threads up to that many seconds in all to finish (those of workers that
        exited end at their next look). The strategy waits at shutdown: a daemon thread still inside a store or gloo
        call when the interpreter finalizes aborts the process ("terminate called without an active exception").
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + wait
        for receiver in self._receivers if wait > 0 else ():
            receiver.join(max(0.0, deadline - time.monotonic()))

    def _take(self, timeout: Optional[float], wanted: Optional[tuple[int, int]] = None) -> Optional[ExperienceBatch]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_failures()
                while self._queue:
                    batch = self._queue.popleft()
                    self._free += 1
                    self._cond.notify_all()
                    if not self._is_stale(batch):
                        return batch
                    self.dropped += 1
                if self._closing or len(self._ended) == len(self.worker_ids):
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    got = "" if wanted is None else f" (got {wanted[0]} of {wanted[1]})"
                    raise ExperienceTimeout(
                        f"Training rank {self.rank}: no experience batch from workers {self.worker_ids} within"
                        f" {timeout:.1f}s{got}"
                    )
                self._cond.wait(remaining)

    def _is_stale(self, batch: ExperienceBatch) -> bool:
        return self.max_staleness is not None and self._policy_version() - batch.version > self.max_staleness

    def _raise_failures(self) -> None:
        while self._unreported:
            worker_id = self._unreported.pop(0)
            message = f"Inference worker {worker_id} failed: {self._ended[worker_id]}"
            if self._on_worker_failure == "raise":
                raise WorkerFailedError(message)
            log.warning("fabric_weightsync: %s; training rank %d keeps its other workers", message, self.rank)

    # ------------------------------------------------------------------ receiver threads
    def _acquire_slot(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._closing or self._free > 0)
            if self._closing:
                return False
            self._free -= 1
            return True

    def _release_slot(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()

    def _deliver(self, batch: ExperienceBatch) -> None:
        with self._cond:
            self.received += 1
            if self._is_stale(batch):  # stale already: free the slot now rather than when it is taken
                self.dropped += 1
                self._free += 1
            else:
                self._queue.append(batch)
            self._cond.notify_all()

    def _worker_ended(self, worker_id: int, error: Optional[str]) -> None:
        with self._cond:
            if worker_id in self._ended:
                return
            self._ended[worker_id] = error
            if error is not None and not self._closing:
                self._unreported.append(worker_id)
            self._cond.notify_all()

    def _admit(self, worker_id: int, nbytes: int) -> Optional[str]:
        """Why a worker's batches of ``nbytes`` are refused, or ``None`` (the first ones set the default limit)."""
        with self._cond:
            limit, setting = self._batch_limit or (_host_memory() // 4, "a quarter of this host's memory")
            if nbytes > limit:
                return (
                    f"worker {worker_id} declares batches of {nbytes} bytes, more than {setting}; pass"
                    " fabric.strategy.experience(max_batch_bytes=...) if that is meant"
                )
            self._batch_limit = self._batch_limit or (nbytes, f"the first worker's batches ({nbytes} bytes)")
            return None

    def _worker_joined(self, worker_id: int) -> None:
        with self._cond:
            self._ended.pop(worker_id, None)

    @property
    def closing(self) -> bool:
        return self._closing


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _WorkerReceiver(threading.Thread):
    """Receives one worker's batches for training rank ``rank``: accept its schema, then one posted receive (and one
    credit) per free slot.

    Serves each connection (epoch) of the worker in turn, so a replacement process under the same worker id is
    received from again.
    """

    def __init__(self, stream: ExperienceStream, worker_id: int, rank: int, store: ControlStore, timeout: float) -> None:
        super().__init__(name=f"fws-experience-{worker_id}", daemon=True)
        self.stream = stream
        self.worker_id = worker_id
        self.rank = rank
        self.store = store
        self.timeout = timeout
        self._keys = worker_keys(worker_id + 1)

    def run(self) -> None:
        served = 0
        try:
            while True:
                epoch = self._next_epoch(served)
                if epoch is None:
                    return
                served = epoch
                try:
                    self._serve(epoch)
                except Exception as err:  # noqa: BLE001 - whatever ended the connection, the stream must learn why
                    reason = self._why_ended(err, epoch)
                    if reason is not _RECONNECTED:  # a reconnecting worker never counts as gone
                        self.stream._worker_ended(self.worker_id, reason)
                finally:
                    for name in ("schema", "accept", "credit"):
                        self.store.delete_key(self._key(epoch, name))
        except Exception:  # the store went away with training rank 0: training is over
            return

    def _epoch(self) -> int:
        return read_epoch(self.store, experience_epoch_key(self.worker_id, self.rank))

    def _key(self, epoch: int, name: str) -> str:
        return experience_key(self.worker_id, self.rank, epoch, name)

    def _next_epoch(self, served: int) -> Optional[int]:
        """Wait for a connection newer than ``served``; report a worker that exits without connecting."""
        next_check = [0.0]

        def connected_or_closing() -> bool:
            if self.stream.closing or self._epoch() > served:
                return True
            if time.monotonic() >= next_check[0]:
                next_check[0] = time.monotonic() + EXIT_CHECK_S
                report = read_exit_report(self.store, self._keys)
                if report is not None:
                    self.stream._worker_ended(self.worker_id, report or None)
            return False

        poll_until(connected_or_closing, None, max_pause=EPOCH_POLL_S)
        return None if self.stream.closing else self._epoch()  # the newest: a process that died unserved is skipped

    def _serve(self, epoch: int) -> None:
        schema = self._accept(epoch)
        if schema is None:
            return
        group = new_pair_group(self.store, experience_group_name(self.worker_id, self.rank, epoch), 1, "gloo", self.timeout)
        credit = self._key(epoch, "credit")
        while self.stream._acquire_slot():
            storage = torch.empty(schema.layout.nbytes, dtype=torch.uint8)
            try:
                work = group.recv([storage], 0, protocol.EXPERIENCE_TAG)
                self.store.set(credit, b"1")
                work.wait(_FOREVER)
            except BaseException:
                self.stream._release_slot()
                raise
            self.stream._deliver(schema.unpack(storage))

    def _accept(self, epoch: int) -> Optional[ExperienceSchema]:
        """Read the schema of connection ``epoch`` and accept it; ``None`` if the stream closed or a newer one came."""
        key = self._key(epoch, "schema")
        # the worker counts the epoch first, then publishes its schema
        gone = lambda: self.stream.closing or self._epoch() > epoch  # noqa: E731
        poll_until(lambda: self.store.check([key]) or gone(), None, max_pause=EPOCH_POLL_S)
        if not self.store.check([key]):
            return None
        try:
            schema = ExperienceSchema.from_json(self.store.get(key))
        except ValueError as err:  # not the worker's writing: wait for its next connection
            log.warning("fabric_weightsync: ignoring store key %r: %s", key, err)
            return None
        accept = self._key(epoch, "accept")
        refused = self.stream._admit(self.worker_id, schema.layout.nbytes)
        if refused is not None:  # before any buffer of that size exists
            self.store.set(accept, refused.encode())
            self.stream._worker_ended(self.worker_id, refused)
            return None
        self.stream._worker_joined(self.worker_id)
        self.store.set(accept, protocol.ACCEPTED)
        return schema

    def _why_ended(self, err: Exception, epoch: int) -> Optional[str]:
        """``None`` for a normal end (worker finished, training stopping), :data:`_RECONNECTED` if a newer
        connection of the worker superseded it, else what went wrong."""
        if self.stream.closing:
            return None
        reason: list[Optional[str]] = []

        def explained() -> bool:
            if self._epoch() > epoch:
                reason.append(_RECONNECTED)
            else:
                report = read_exit_report(self.store, self._keys)
                if report is not None:
                    reason.append(report or None)
                elif self.store.check([STOP_KEY]):
                    reason.append(None)
            return bool(reason)

        try:
            if poll_until(explained, protocol.END_GRACE_S, max_pause=protocol.SLOW_POLL_S):
                return reason[0]
            return f"lost the connection to it: {err}"
        except Exception:  # the store went away with training rank 0: training is over
            return None
