"""The experience path: batches of experience from inference workers back to the training ranks.

Worker ``i`` sends to training rank ``i % num_training_ranks`` over a standalone two-rank gloo group of its own
(the worker is rank 0, the training rank rank 1), built on the control store as ``fws/exp/{i}/{epoch}``:

- one message per batch: both ends lay a batch out the same way, a consolidated ``TensorDict`` holding the
  batch's leaves under their sorted keys plus the policy version and the worker id, and the batch travels as
  that buffer's single storage. Nothing is pickled: the first batch's schema (keys, shapes, dtypes, batch
  size) goes through the store as JSON and both ends build their buffers from it.
- bounded, with back-pressure: the training rank receives into a queue of ``capacity`` batches and posts a
  receive for a worker only when it has a free slot, then grants that worker a *credit* through the store. A
  worker without a credit waits in :meth:`ExperienceSender.send`: **workers block** when the trainer is
  slower than they are, and memory stays bounded by ``capacity`` x the batch size on the training rank (plus
  one staging buffer per worker).
- a worker waiting in ``send`` keeps taking weight updates and watches for the end of training, so it never
  stalls the trainer's final weight delivery and it returns (``False``) once training stops.
- a batch whose layout differs from that worker's first batch is rejected in ``send`` before anything moves.

Store keys for worker ``i`` (under ``fws/expctl/{i}/``): ``epoch`` counts the worker's connections (a
replacement process under the same id is a new epoch, with fresh keys and a fresh group); per epoch ``e``,
``{e}/schema`` (JSON, set by the worker), ``{e}/accept`` (the training rank built its buffers and joins the
group) and ``{e}/credit`` (a receive is posted: send one batch).
"""

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase, is_leaf_nontensor, is_non_tensor

from fabric_weightsync.control import STOP_KEY, error_key, exit_key
from fabric_weightsync.scheme import WorkerFailedError
from fabric_weightsync.channels import new_pair_group
from fabric_weightsync.weights import SchemaMismatchError

if TYPE_CHECKING:
    from fabric_weightsync.strategy import WeightSyncStrategy
    from fabric_weightsync.worker import WorkerContext

log = logging.getLogger(__name__)

DATA_KEY = "data"
VERSION_KEY = "version"
WORKER_KEY = "worker_id"

_TAG = 0
_FOREVER = timedelta(days=7)
"""How long a posted receive may wait: a worker may take as long as it likes to produce its next batch."""
_STOP_CHECK_INTERVAL = 0.05
"""Seconds between checks of the stop flag (and weight polls) while a worker waits for the training rank."""
_END_GRACE = 5.0
"""Seconds to wait for a peer's exit report, or for the stop flag, after its connection dropped."""
_RECONNECTED = "reconnected"
"""Why a connection ended when a newer connection of the same worker superseded it: not a failure."""

Path = tuple[str, ...]


class ExperienceError(RuntimeError):
    """The experience path failed: no workers for this rank, a worker lost, or a transfer that did not complete."""


class ExperienceTimeout(ExperienceError):
    """A wait on the experience path ran out of time."""


class ExperienceSchemaError(ExperienceError, SchemaMismatchError):
    """A batch's keys, shapes or dtypes differ from the first batch that worker sent."""


@dataclass
class ExperienceBatch:
    """One batch of experience as a training rank receives it.

    Attributes:
        data: the ``TensorDict`` the worker sent (on CPU; its leaves share one buffer, owned by this batch).
        worker_id: the worker that collected it.
        version: the policy version it was collected with (the trainer's optimizer-step count).
    """

    data: TensorDict
    worker_id: int
    version: int


# ---------------------------------------------------------------------------------------------------- schema
def _display(path: Path) -> str:
    return repr(path[0]) if len(path) == 1 else repr(path)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class ExperienceSchema:
    """Batch size, and key path, shape and dtype of every leaf in sorted key order: the layout of a message."""

    batch_size: tuple[int, ...]
    entries: tuple[tuple[Path, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, batch: TensorDictBase) -> "ExperienceSchema":
        """The schema of ``batch``; raises ``TypeError`` for leaves that are not tensors (they would need pickle)."""
        entries = []
        # Non-tensor leaves are listed too (by default they are skipped), so they fail loudly instead of vanishing.
        for key, value in batch.items(include_nested=True, leaves_only=True, is_leaf=is_leaf_nontensor):
            path = (key,) if isinstance(key, str) else tuple(key)
            if is_non_tensor(value) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Experience leaf {_display(path)} is a {type(value).__name__}, not a tensor: only tensors can be"
                    " sent (encode strings or objects as tensors)"
                )
            entries.append((path, tuple(value.shape), str(value.dtype).removeprefix("torch.")))
        return cls(tuple(batch.batch_size), tuple(sorted(entries)))

    @property
    def paths(self) -> list[Path]:
        return [path for path, _, _ in self.entries]

    def to_json(self) -> str:
        return json.dumps(
            {"batch_size": list(self.batch_size), "entries": [[list(p), list(s), d] for p, s, d in self.entries]}
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "ExperienceSchema":
        raw = json.loads(text)
        return cls(
            tuple(raw["batch_size"]), tuple((tuple(p), tuple(s), d) for p, s, d in raw["entries"])
        )

    def mismatch(self, other: "ExperienceSchema") -> Optional[str]:
        """What differs in ``other`` (a later batch) from this (the first batch), naming each key; ``None`` if equal."""
        if self == other:
            return None
        mine = {path: (shape, dtype) for path, shape, dtype in self.entries}
        theirs = {path: (shape, dtype) for path, shape, dtype in other.entries}
        problems = []
        if self.batch_size != other.batch_size:
            problems.append(f"batch_size: first batch {list(self.batch_size)}, this batch {list(other.batch_size)}")
        for path in sorted(mine.keys() - theirs.keys()):
            shape, dtype = mine[path]
            problems.append(f"key {_display(path)} is missing (first batch: shape {list(shape)}, {dtype})")
        for path in sorted(theirs.keys() - mine.keys()):
            shape, dtype = theirs[path]
            problems.append(f"key {_display(path)} is new (shape {list(shape)}, {dtype}); the first batch did not have it")
        for path in sorted(mine.keys() & theirs.keys()):
            if mine[path] != theirs[path]:
                (s1, d1), (s2, d2) = mine[path], theirs[path]
                problems.append(
                    f"key {_display(path)}: first batch has shape {list(s1)}, {d1} but this batch has shape {list(s2)}, {d2}"
                )
        return "; ".join(problems)

    def make_wire(self) -> TensorDict:
        """A consolidated ``{data: <leaves in sorted order>, version, worker_id}``: the same bytes layout on both ends."""
        data = TensorDict({}, batch_size=self.batch_size)
        for path, shape, dtype in self.entries:
            data.set(path, torch.zeros(shape, dtype=_dtype(dtype)))
        wire = TensorDict(
            {
                DATA_KEY: data,
                VERSION_KEY: torch.zeros((), dtype=torch.int64),
                WORKER_KEY: torch.zeros((), dtype=torch.int64),
            },
            batch_size=[],
        )
        return wire.consolidate(metadata=True)


def _storage(wire: TensorDictBase) -> torch.Tensor:
    return wire._consolidated["storage"]


class _Layout:
    """Byte offsets of every leaf in a wire buffer, so a fresh storage can be viewed as a batch without copies."""

    def __init__(self, schema: ExperienceSchema) -> None:
        self.schema = schema
        wire = schema.make_wire()
        storage = _storage(wire)
        base = storage.data_ptr()
        self.nbytes = storage.numel()

        def at(tensor: torch.Tensor) -> tuple[int, int]:
            return tensor.data_ptr() - base, tensor.numel() * tensor.element_size()

        self.leaves = [(path, at(wire[DATA_KEY].get(path)), shape, _dtype(dtype)) for path, shape, dtype in schema.entries]
        self.version_at = at(wire[VERSION_KEY])
        self.worker_at = at(wire[WORKER_KEY])

    def unpack(self, storage: torch.Tensor) -> ExperienceBatch:
        nested: dict[str, Any] = {}
        for path, (offset, nbytes), shape, dtype in self.leaves:
            node = nested
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = storage[offset : offset + nbytes].view(dtype).view(shape)
        data = TensorDict(nested, batch_size=self.schema.batch_size)
        version = int(storage[self.version_at[0] : sum(self.version_at)].view(torch.int64)[0])
        worker = int(storage[self.worker_at[0] : sum(self.worker_at)].view(torch.int64)[0])
        return ExperienceBatch(data=data, worker_id=worker, version=version)


def _epoch_key(worker_id: int) -> str:
    """Counts the worker's connections: a replacement process under the same id gets fresh keys and a fresh group."""
    return f"fws/expctl/{worker_id}/epoch"


def _key(worker_id: int, epoch: int, name: str) -> str:
    return f"fws/expctl/{worker_id}/{epoch}/{name}"


def _group_name(worker_id: int, epoch: int) -> str:
    return f"fws/exp/{worker_id}/{epoch}"


# ---------------------------------------------------------------------------------------------------- worker side
class ExperienceSender:
    """A worker's end of the experience path (made by :meth:`WorkerContext.send`, which is what to call).

    The first :meth:`send` publishes the batch's schema, waits for the training rank to accept it and joins the
    pair group; every later batch must have the same keys, shapes and dtypes.
    """

    def __init__(self, ctx: "WorkerContext") -> None:
        self.ctx = ctx
        self.target_rank = ctx.worker_id % ctx.num_training_ranks
        self._store = ctx.control.client()  # its own client: this one polls while the worker waits
        self._schema: Optional[ExperienceSchema] = None
        self._wire: Optional[TensorDict] = None
        self._leaves: list[torch.Tensor] = []
        self._group: Optional[dist.ProcessGroup] = None
        self._epoch = 0
        self._failed: Optional[str] = None
        self._over = False
        self.sent = 0

    def send(self, batch: TensorDictBase, *, version: int, timeout: float) -> bool:
        """Send ``batch`` (collected with policy ``version``) as one message; block while the trainer has no room.

        Returns ``True`` once the batch has been handed to the training rank, ``False`` when training stopped
        first (the batch is then dropped: end the worker loop). While waiting it applies weight updates to the
        connected policy. Raises :class:`ExperienceSchemaError` (nothing sent) when the batch's layout differs
        from this worker's first batch, and :class:`ExperienceTimeout` after ``timeout`` seconds without room.
        """
        if not isinstance(batch, TensorDictBase):
            raise TypeError(f"ctx.send() takes a TensorDict, got {type(batch).__name__}")
        if self._failed is not None:
            raise ExperienceError(f"Worker {self.ctx.worker_id}: the experience path failed earlier: {self._failed}")
        if self._over:
            return False
        schema = ExperienceSchema.of(batch)
        if self._schema is not None and schema != self._schema:
            raise ExperienceSchemaError(
                f"Worker {self.ctx.worker_id}: this experience batch differs from the first one it sent (the training"
                f" rank's buffers are laid out from that one): {self._schema.mismatch(schema)}"
            )
        deadline = time.monotonic() + timeout
        if self._group is None and not self._connect(schema, deadline, timeout):
            return False
        self._stage(batch, version)
        waiting_for = "to make room for a batch (its queue stays full: the trainer consumes slower than the workers produce)"
        if not self._wait_for(_key(self.ctx.worker_id, self._epoch, "credit"), deadline, timeout, waiting_for, take=True):
            return False
        try:
            self._group.send([_storage(self._wire)], 1, _TAG).wait(timedelta(seconds=max(timeout, 1.0)))
        except RuntimeError as err:
            # The receive was posted, so only a training rank that ended can fail this send.
            self._group = None
            if self._training_over():
                self._over = True  # the pair group is gone for good: later batches have nowhere to go
                return False
            self._failed = str(err)
            raise ExperienceError(
                f"Worker {self.ctx.worker_id}: sending a batch to training rank {self.target_rank} failed: {err}"
            ) from err
        self.sent += 1
        return True

    def _connect(self, schema: ExperienceSchema, deadline: float, timeout: float) -> bool:
        wid = self.ctx.worker_id
        self._schema = schema
        self._wire = schema.make_wire()
        self._leaves = [self._wire[DATA_KEY].get(path) for path in schema.paths]
        self._epoch = int(self._store.add(_epoch_key(wid), 1))
        self._store.set(_key(wid, self._epoch, "schema"), schema.to_json().encode())
        what = (
            f"to open its experience stream (training rank {self.target_rank} must call fabric.strategy.experience()"
            f" to receive from worker {wid})"
        )
        if not self._wait_for(_key(wid, self._epoch, "accept"), deadline, timeout, what, take=False):
            return False
        self._group = new_pair_group(self._store, _group_name(wid, self._epoch), 0, "gloo", self.ctx.timeout)
        return True

    def _stage(self, batch: TensorDictBase, version: int) -> None:
        with torch.no_grad():
            for target, path in zip(self._leaves, self._schema.paths):
                target.copy_(batch.get(path))
        self._wire[VERSION_KEY].fill_(int(version))
        self._wire[WORKER_KEY].fill_(self.ctx.worker_id)

    def _wait_for(self, key: str, deadline: float, timeout: float, what: str, *, take: bool) -> bool:
        """Poll ``key`` until it is there (``True``) or training stops (``False``); raise at ``deadline``.

        Polls rather than blocking in the store so the worker can watch the stop flag and take weight updates.
        """
        pause = 0.0002
        next_check = time.monotonic() + _STOP_CHECK_INTERVAL
        while True:
            if self._store.delete_key(key) if take else self._store.check([key]):
                return True
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _STOP_CHECK_INTERVAL
                if self.ctx.stop_requested:
                    return False
                receiver = getattr(self.ctx, "_receiver", None)
                if receiver is not None:
                    receiver.poll()  # the trainer's final delivery at shutdown must not wait on a blocked worker
            if now >= deadline:
                raise ExperienceTimeout(
                    f"Worker {self.ctx.worker_id}: waited {timeout:.1f}s for training rank {self.target_rank} {what};"
                    " pass a larger timeout to ctx.send() if that is expected"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def _training_over(self) -> bool:
        """Whether training stopped; after a dropped connection, gives the stop flag a moment to appear."""
        end = time.monotonic() + _END_GRACE
        while time.monotonic() < end:
            if self.ctx.stop_requested:
                return True
            time.sleep(0.05)
        return False


# ---------------------------------------------------------------------------------------------------- trainer side
class ExperienceStream:
    """A training rank's stream of experience from its workers (those with ``worker_id % world_size == rank``).

    Iterate it (``for batch in stream``) or take ``get(n)`` batches at a time; each item is an
    :class:`ExperienceBatch`. Batches of one worker arrive in the order it sent them. One background thread per
    worker receives into a bounded queue and posts its next receive only when the queue has room, so **workers
    block** in ``ctx.send()`` while it is full; memory on this rank is at most ``capacity`` x the batch size.

    With DDP, take the same number of batches on every rank per update (``get(n)``) so every rank runs the same
    number of steps. Iteration ends when every worker of this rank has finished and all its batches were taken.

    Made by :meth:`WeightSyncStrategy.experience` (``fabric.strategy.experience(capacity=..., max_staleness=...)``).

    Args:
        strategy: the training rank's strategy.
        capacity: batches this rank holds at most, received or being received (default: 2 per worker).
        max_staleness: drop batches collected with a policy more than this many versions older than
            ``strategy.policy_version`` (counted in :attr:`dropped`); ``None`` keeps every batch.
        timeout: default seconds :meth:`get` and ``next()`` wait before raising :class:`ExperienceTimeout`;
            ``None`` waits as long as this rank's workers are alive.
    """

    def __init__(
        self,
        strategy: "WeightSyncStrategy",
        *,
        capacity: Optional[int] = None,
        max_staleness: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> None:
        layout = strategy.layout
        self.rank = strategy.global_rank
        self.num_training_ranks = layout.devices * layout.num_nodes
        self.worker_ids = [w for w in range(layout.num_workers) if w % self.num_training_ranks == self.rank]
        if not self.worker_ids:
            raise ExperienceError(
                f"Training rank {self.rank} has no inference workers to receive experience from: worker i sends to"
                f" training rank i % {self.num_training_ranks}, and there are only {layout.num_workers} workers"
                f" ({layout.workers_per_node} per node x {layout.num_nodes} nodes). Launch at least"
                f" {self.num_training_ranks} workers in all, or do not call experience() on this rank."
            )
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.strategy = strategy
        self.capacity = capacity if capacity is not None else 2 * len(self.worker_ids)
        self.max_staleness = max_staleness
        self.timeout = timeout
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
        control = strategy.control_plane()
        self._receivers = [_WorkerReceiver(self, w, control.client(), strategy.sync_timeout) for w in self.worker_ids]
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
        exited end within 20 ms). The strategy waits at shutdown: a daemon thread still inside a store or gloo
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
        return self.max_staleness is not None and self.strategy.policy_version - batch.version > self.max_staleness

    def _raise_failures(self) -> None:
        while self._unreported:
            worker_id = self._unreported.pop(0)
            message = f"Inference worker {worker_id} failed: {self._ended[worker_id]}"
            if getattr(self.strategy, "on_worker_failure", "raise") == "raise":
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

    def _worker_joined(self, worker_id: int) -> None:
        with self._cond:
            self._ended.pop(worker_id, None)

    @property
    def closing(self) -> bool:
        return self._closing


class _WorkerReceiver(threading.Thread):
    """Receives one worker's batches: accept its schema, then one posted receive (and one credit) per free slot.

    Serves each connection (epoch) of the worker in turn, so a replacement process under the same worker id is
    received from again.
    """

    def __init__(self, stream: ExperienceStream, worker_id: int, store: dist.Store, timeout: float) -> None:
        super().__init__(name=f"fws-experience-{worker_id}", daemon=True)
        self.stream = stream
        self.worker_id = worker_id
        self.store = store
        self.timeout = timeout

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
                        self.store.delete_key(_key(self.worker_id, epoch, name))
        except Exception:  # the store went away with training rank 0: training is over
            return

    def _next_epoch(self, served: int) -> Optional[int]:
        """Wait for a connection newer than ``served``; report a worker that exits without connecting."""
        next_check = 0.0
        while not self.stream.closing:
            epoch = int(self.store.add(_epoch_key(self.worker_id), 0))
            if epoch > served:
                return epoch  # the newest: a process that died before being served is skipped
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.25
                report = self._exit_report()
                if report is not None:
                    self.stream._worker_ended(self.worker_id, report or None)
            time.sleep(0.02)
        return None

    def _serve(self, epoch: int) -> None:
        layout = self._accept(epoch)
        if layout is None:
            return
        group = new_pair_group(self.store, _group_name(self.worker_id, epoch), 1, "gloo", self.timeout)
        credit = _key(self.worker_id, epoch, "credit")
        while self.stream._acquire_slot():
            storage = torch.empty(layout.nbytes, dtype=torch.uint8)
            try:
                work = group.recv([storage], 0, _TAG)
                self.store.set(credit, b"1")
                work.wait(_FOREVER)
            except BaseException:
                self.stream._release_slot()
                raise
            self.stream._deliver(layout.unpack(storage))

    def _accept(self, epoch: int) -> Optional[_Layout]:
        """Read the schema of connection ``epoch`` and accept it; ``None`` if the stream closed or a newer one came."""
        key = _key(self.worker_id, epoch, "schema")
        while not self.store.check([key]):  # the worker counts the epoch first, then publishes its schema
            if self.stream.closing or int(self.store.add(_epoch_key(self.worker_id), 0)) > epoch:
                return None
            time.sleep(0.01)
        layout = _Layout(ExperienceSchema.from_json(self.store.get(key)))
        self.stream._worker_joined(self.worker_id)
        self.store.set(_key(self.worker_id, epoch, "accept"), b"1")
        return layout

    def _exit_report(self) -> Optional[str]:
        """``""`` if the worker finished cleanly, its error if it failed, ``None`` while it runs."""
        rank = self.worker_id + 1
        if self.store.check([error_key(rank)]):
            return "it raised:\n" + self.store.get(error_key(rank)).decode(errors="replace")
        if self.store.check([exit_key(rank)]):
            code = self.store.get(exit_key(rank)).decode()
            return "" if code == "0" else f"its process exited with code {code}"
        return None

    def _why_ended(self, err: Exception, epoch: int) -> Optional[str]:
        """``None`` for a normal end (worker finished, training stopping), :data:`_RECONNECTED` if a newer
        connection of the worker superseded this one, else what went wrong."""
        if self.stream.closing:
            return None
        end = time.monotonic() + _END_GRACE
        try:
            while True:
                if int(self.store.add(_epoch_key(self.worker_id), 0)) > epoch:
                    return _RECONNECTED
                report = self._exit_report()
                if report is not None:
                    return report or None
                if self.store.check([STOP_KEY]):
                    return None
                if time.monotonic() >= end:
                    return f"lost the connection to it: {err}"
                time.sleep(0.05)
        except Exception:  # the store went away with training rank 0: training is over
            return None
