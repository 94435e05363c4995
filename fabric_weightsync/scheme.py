"""Training rank 0's side of weight sync: one transport per worker, fed latest-wins from two staging buffers.

The trainer thread only ever copies the weights into a free staging buffer, publishes it, rings a doorbell when
a link waits for a newer version, and returns (:meth:`push`); it never touches the network or the store. One
link thread per worker owns that worker's transport. A worker on this host takes the newest publication off the
shared-memory board by itself, so its link only connects it; big weights are published there before the copy
and written in chunks, so a worker that polls meanwhile copies right behind the trainer. For a worker served
over a process group, the link sleeps until a push rings, and sends the newest staged version once the worker
has posted its receive: at once to a worker that armed it after its last update (it lands while the worker runs),
after an instruction and the worker's ready key otherwise. While such a worker holds an update it has not
answered, the doorbell also keeps the newest version in the store (:data:`~fabric_weightsync.control.LATEST_KEY`),
so that a worker that was busy while an update landed drops it if it was superseded meanwhile. A busy worker
therefore never holds a buffer, never delays the trainer or the other workers, and skips every version
superseded while it was busy.

Memory: two staging buffers (2x the weights) whatever the number of workers. A buffer being read by a send
is never written; if both are being read, the push is recorded and taken at the next step (or at
:meth:`close`), so the trainer still does not wait.
"""

import functools
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from tensordict import TensorDictBase
from torch import nn

from fabric_weightsync.channels import SharedMemoryChannel, SharedStaging
from fabric_weightsync.flat import FlatWeights
from fabric_weightsync.control import LATEST_KEY, ControlPlane, error_key, evicted_key, exit_key, heartbeat_key
from fabric_weightsync.transport import DistributedTransport, TransportAborted, TransportError, TransportTimeout
from fabric_weightsync.weights import (
    CHECKSUM_KEY,
    VERSION_KEY,
    WEIGHTS_KEY,
    SchemaMismatchError,
    WeightSchema,
    LayoutProbe,
    header_words,
    read_header,
    make_wire_buffer,
    named_weights,
    unwrap,
    weights_checksum,
    weights_offset,
)

log = logging.getLogger(__name__)

FLUSH_POLL_S = 0.0005
"""How often :meth:`WeightSyncScheme.flush` looks at the workers' acks at most: shared-memory workers write
theirs on the board, which notifies nobody."""

_DEAD_LINK_JOIN_S = 0.5
"""Seconds :meth:`WeightSyncScheme.close` waits in all for the links of dead workers."""

FailurePolicy = Literal["raise", "continue"]


class WorkerFailedError(RuntimeError):
    """An inference worker died, raised or stopped answering."""


@dataclass
class WorkerStatus:
    """What training rank 0 knows about one worker."""

    worker_id: int
    acked_version: int = -1
    """Newest version the worker acknowledged to its link (the group channel's acks come back that way)."""
    board_row: Optional[memoryview] = field(default=None, repr=False)
    """A shared-memory worker's (sequence, version) row on the board, which the worker writes itself."""
    alive: bool = True
    error: Optional[str] = None
    connected: bool = False
    beat: Optional[int] = None
    """Last heartbeat count seen, and when it was first seen (monotonic); reset when the worker (re)joins."""
    beat_seen_at: float = 0.0

    @property
    def rank(self) -> int:
        return self.worker_id + 1

    @property
    def delivered_version(self) -> int:
        """Newest version this worker has applied, as far as rank 0 knows (-1: none since it (re)connected)."""
        row = self.board_row
        return max(self.acked_version, int(row[1])) if row is not None else self.acked_version


def split_transport(transport: str) -> tuple[str, str]:
    """A ``transport`` choice as the pair group's backend and the transport's channel preference."""
    planes = {"auto": ("gloo", "auto"), "shm": ("gloo", "shm"), "gloo": ("gloo", "group"), "nccl": ("nccl", "group")}
    if transport not in planes:
        raise ValueError(f"transport must be 'auto', 'shm', 'gloo' or 'nccl', got {transport!r}")
    return planes[transport]


class WeightSyncScheme:
    """Delivers the newest weights of one module to every worker, never blocking the trainer.

    Args:
        control: the control plane (store) the workers joined.
        num_workers: how many workers to serve; worker ``i`` uses store rank ``i + 1``.
        transport: data plane per worker: ``"auto"`` (shared memory for workers on this host, gloo for the
            others), ``"shm"``, ``"gloo"`` or ``"nccl"`` (process groups only).
        timeout: seconds for each blocking step of a transfer (connect, send, ack).
        heartbeat_timeout: a worker whose heartbeat is older than this is declared dead.
        on_worker_failure: ``"raise"``: the next :meth:`push` raises :class:`WorkerFailedError` naming the
            worker; ``"continue"``: log it and keep serving the others.
        checksum: stamp each staged version with a CRC32 that workers verify before applying. Computed once
            per version by the first link that sends it, never on the trainer thread.
        flatten_weights: move the module's weights into one storage laid out like the wire (see
            :class:`~fabric_weightsync.flat.FlatWeights`), so a push is one copy. The ``Parameter`` objects stay
            the same, their data moves once; turn it off if something relies on the weights' addresses.
    """

    def __init__(
        self,
        control: ControlPlane,
        num_workers: int,
        *,
        transport: str = "auto",
        timeout: float = 60.0,
        heartbeat_timeout: float = 10.0,
        on_worker_failure: FailurePolicy = "raise",
        checksum: bool = False,
        flatten_weights: bool = True,
    ) -> None:
        if on_worker_failure not in ("raise", "continue"):
            raise ValueError(f"on_worker_failure must be 'raise' or 'continue', got {on_worker_failure!r}")
        self.backend, self.channel = split_transport(transport)
        self.control = control
        self.transport = transport
        self.timeout = timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.on_worker_failure = on_worker_failure
        self.checksum = checksum
        self.flatten_weights = flatten_weights
        self._flat: Optional[FlatWeights] = None
        self._sealed = [-1, -1]
        self._seal_locks = [threading.Lock(), threading.Lock()]
        self.workers = [WorkerStatus(i) for i in range(num_workers)]
        self._module: Optional[nn.Module] = None
        self._sources: list[torch.Tensor] = []
        self._schema: Optional[WeightSchema] = None
        self._staging: Optional[SharedStaging] = None
        self._buffers: list[TensorDictBase] = []
        self._targets: list[list[torch.Tensor]] = []
        self._pins = [0, 0]
        self._latest: Optional[int] = None
        self._latest_version = -1
        self._pending_version: Optional[int] = None
        self._writing: Optional[int] = None
        state_lock = threading.RLock()
        self._cond = threading.Condition(state_lock)
        # Links sleep on a condition of their own over the same lock: a worker's ack, which wakes flush(), would
        # otherwise wake every other waiting link for nothing.
        self._links_wake = threading.Condition(state_lock)
        self._waiting_links = 0
        self._group_workers = 0  # connected over a process group: a push may have to reach LATEST_KEY for them
        self._idle_group_links = 0  # of those, links waiting for a newer version: their workers hold no update
        self._doorbell: Optional[_Doorbell] = None
        self._closing = False
        self._links: list[_WorkerLink] = []
        self._monitor: Optional[_HeartbeatMonitor] = None
        self._raised: set[int] = set()

    @property
    def module(self) -> Optional[nn.Module]:
        return self._module

    @property
    def latest_version(self) -> int:
        return self._latest_version

    # ------------------------------------------------------------------ trainer thread
    def start(self, module: nn.Module, version: int = 0) -> None:
        """Stage ``module``'s current weights as ``version`` and start serving every worker."""
        if self._module is not None:
            raise RuntimeError("WeightSyncScheme.start() was called twice")
        self._module = module
        named = named_weights(module)
        self._schema = WeightSchema.of(named)
        self._adopt_sources(named)
        # Staging lives where the data plane reads it: host memory for gloo and shared memory (a GPU
        # trainer pays one device-to-host copy per push), the GPU for nccl.
        if self.channel != "group":  # shm-backed staging costs no extra memory and serves both planes
            self._staging = SharedStaging.create(self._schema, 2, len(self.workers))
            self._buffers = self._staging.buffers
        else:
            device = self._sources[0].device if self.backend == "nccl" and self._sources else torch.device("cpu")
            self._buffers = [make_wire_buffer(named, device=device) for _ in (0, 1)]
        self._targets = [list(wire[WEIGHTS_KEY].values()) for wire in self._buffers]
        self._version_slots = [_version_slot(wire) for wire in self._buffers]
        self._snapshot(0, version)
        with self._cond:
            self._latest, self._latest_version = 0, version
        self._monitor = _HeartbeatMonitor(self)
        self._monitor.start()
        self._latest_store = self.control.client()
        self._doorbell = _Doorbell(self._links_wake, self._latest_version_due, self._publish_latest_version)
        self._doorbell.start()
        self._links = [_WorkerLink(self, status) for status in self.workers]
        for link in self._links:
            link.start()

    def push(self, version: int) -> bool:
        """Stage the module's weights as ``version`` for every worker; returns whether it was staged now.

        Costs one copy of the weights into a staging buffer no send is reading, plus one lock release when a link
        waits for a newer version (see :class:`_Doorbell`), and never waits on a worker.
        When both buffers are being read by sends, the version is remembered and staged by the next push or by
        :meth:`close`. Raises :class:`WorkerFailedError` for a failed worker under ``on_worker_failure="raise"``.
        """
        self.raise_if_failed()
        self._check_sources()
        with self._cond:
            # Prefer the older buffer; overwrite the newest one only when a slow send or a worker's copy out of
            # shared memory still reads the older (readers then wait the one copy out, never the trainer).
            for target in (1 - self._latest, self._latest):
                if self._pins[target] == 0:
                    streamed = self._streams and not self._staging.is_newest(target)
                    if self._claim_for_write(target, hold=not streamed):
                        break
            else:
                self._pending_version = version
                return False
            self._writing = target
        if streamed:
            self._stream(target, version)
        else:
            self._snapshot(target, version)
        with self._cond:
            self._latest, self._latest_version = target, version
            self._writing = None
            self._pending_version = None
            wake = self._waiting_links > 0 or self._group_workers > 0
        if wake:
            self._doorbell.ring()
        if self._staging is not None:
            self._staging.end_write(target)
            if not self.checksum and not streamed:  # with checksums on, a link publishes it once it is stamped
                self._staging.publish(target)
        return True

    def note(self, version: int) -> None:
        """Record that the module is now at ``version`` without staging it; :meth:`flush` will deliver it."""
        if version > self._latest_version:
            self._pending_version = version

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Stage any remembered version, then wait until every live worker has the newest one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._pending_version is not None and time.monotonic() < deadline:
            if not self.push(self._pending_version):
                time.sleep(0.001)
        with self._cond:
            return self._await(
                lambda: all(not w.alive or w.delivered_version >= self._latest_version for w in self.workers),
                timeout=max(0.0, deadline - time.monotonic()),
            )

    def report_late_failures(self) -> None:
        """After :meth:`close` and the workers' exit: fail workers whose error arrived after the monitor stopped."""
        if self._monitor is not None:
            self._monitor.sweep()

    def raise_if_failed(self) -> None:
        if self.on_worker_failure != "raise":
            return
        for status in self.workers:
            if status.error is not None and status.worker_id not in self._raised:
                self._raised.add(status.worker_id)
                raise WorkerFailedError(f"Inference worker {status.worker_id} failed: {status.error}")

    def close(self) -> None:
        """Stop every link and the monitor (call :meth:`flush` first for a final delivery)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._links_wake.notify_all()
        if self._doorbell is not None:
            self._doorbell.stop()
        for link in self._links:
            link.abort()
        dead_links_deadline = time.monotonic() + _DEAD_LINK_JOIN_S
        for link in self._links:
            # A dead worker's link may sit in a transfer that only its timeout ends (it is a daemon thread): it gets
            # a moment only, enough to leave its wait for a reconnection, which polls the store every 50 ms (a thread
            # inside a store call when the interpreter finalizes aborts the process).
            link.join(min(self.timeout, 5.0) if link.status.alive else max(0.0, dead_links_deadline - time.monotonic()))
        if self._monitor is not None:
            self._monitor.stop()
        if self._staging is not None:
            self._staging.close()

    # ------------------------------------------------------------------ link threads
    def wait_for_newer(self, status: WorkerStatus, delivered: int, over_group: bool = False) -> bool:
        """Sleep until a version newer than ``delivered`` is staged; ``False`` if training closes or the worker
        fails first (a failed worker's link then opens its next connection at once). ``over_group``: the link
        serves its worker over a process group and its last send was answered, so that worker holds no update
        a push could supersede while the link waits here (see :meth:`_latest_version_due`)."""
        with self._cond:
            self._idle_group_links += over_group
            try:
                self._await_push(lambda: self._closing or not status.alive or self._latest_version > delivered)
            finally:
                self._idle_group_links -= over_group
            return not self._closing and status.alive

    def wait_while_served(self, status: WorkerStatus) -> None:
        """Until training closes or ``status``'s worker fails (both notify: no polling)."""
        with self._cond:
            self._links_wake.wait_for(lambda: self._closing or not status.alive)

    def publish_latest(self) -> int:
        """Stamp (checksums on) and publish the newest staged buffer to shared-memory workers; its version."""
        wire, index = self.pin_latest()
        try:
            self._staging.publish(index)
            return read_header(wire)[0]
        finally:
            self.unpin(index)

    def pin_latest(self) -> tuple[TensorDictBase, int]:
        with self._cond:
            self._await_push(lambda: self._writing != self._latest)  # a push overwriting the newest: its end rings
            index = self._latest
            self._pins[index] += 1
        wire = self._buffers[index]
        if self.checksum:
            with self._seal_locks[index]:  # pinned: the trainer cannot rewrite it meanwhile
                version = read_header(wire)[0]
                if self._sealed[index] != version:
                    wire[CHECKSUM_KEY].fill_(weights_checksum(wire))
                    self._sealed[index] = version
        return wire, index

    def unpin(self, index: int) -> None:
        with self._cond:
            self._pins[index] -= 1

    def serving_over_group(self, joined: bool) -> None:
        """A link starts (``True``) or stops serving its worker over a process group."""
        with self._cond:
            self._group_workers += 1 if joined else -1

    def delivered(self, status: WorkerStatus, version: int) -> None:
        with self._cond:
            status.acked_version = version
            self._cond.notify_all()

    def watch_board(self, status: WorkerStatus) -> None:
        """From now on ``status``'s worker reports what it applied on the shared-memory board."""
        status.board_row = self._staging.ack_row(status.rank)

    def worker_joined(self, status: WorkerStatus) -> None:
        """A worker (re)connected: serve it again from the newest version."""
        with self._cond:
            status.connected = True
            status.beat = None  # heartbeat silence counts from (re)connect, not from a previous process or start
            if status.alive and status.error is None:
                return
            status.alive, status.error, status.acked_version, status.board_row = True, None, -1, None
            self._raised.discard(status.worker_id)
        log.warning("fabric_weightsync: inference worker %d rejoined", status.worker_id)

    def worker_failed(self, worker_id: int, reason: str, error: bool = True) -> None:
        """Mark a worker gone (idempotent) and stop serving it; ``error`` ones count for the failure policy."""
        status = self.workers[worker_id]
        with self._cond:
            if not status.alive:
                return
            status.alive = False
            status.error = reason if error else None
            link = self._links[worker_id] if worker_id < len(self._links) else None
            # The connection that failed. Once notified, the link may already be opening the next one, which
            # this failure must not abort (its worker would then be served by nobody).
            failed = link.transport if link is not None else None
            self._cond.notify_all()
            self._links_wake.notify_all()
        log.warning("fabric_weightsync: inference worker %d %s: %s", worker_id, "failed" if error else "left", reason)
        if link is not None:
            link.abort(failed)
        try:  # a worker that is only slow or was cut off reconnects (full resync) when it sees this
            self.control.client().set(evicted_key(status.rank), reason.encode())
        except Exception:  # the store is shutting down with the trainer
            pass

    @property
    def closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ helpers
    def _latest_version_due(self) -> bool:
        """Whether the newest version must reach :data:`LATEST_KEY` now (asked under ``_cond`` before the links wake).

        Only a worker served over a group that holds an update it has not answered yet reads that key, to learn
        whether the update was superseded, and its link is then not waiting for a newer version. When every such
        link waits, each sends the newest version itself: a store round trip then would only compete with their
        sends for the cores (it made a tight-polling worker's push -> applied 1.3x slower on 2 cores).
        """
        return self._group_workers > self._idle_group_links

    def _publish_latest_version(self) -> None:
        """The doorbell's second duty: the newest version staged, where workers served over a group can ask."""
        self._latest_store.set(LATEST_KEY, str(self._latest_version).encode())

    def _await_push(self, predicate: Callable[[], bool]) -> None:
        """Sleep (holding ``_cond``) until ``predicate()``, which only a push, a failure or close can make true:
        each of them notifies (a push through the doorbell, which it rings only while someone waits here)."""
        self._waiting_links += 1
        try:
            self._links_wake.wait_for(predicate)
        finally:
            self._waiting_links -= 1

    def _await(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Wait (holding ``_cond``) until ``predicate()``; ``False`` on timeout. Polls, as the shared-memory
        board notifies nobody: first every 50 us (what is awaited is often under way), then every
        :data:`FLUSH_POLL_S`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.00005
        while not predicate():
            wait = pause if deadline is None else min(pause, deadline - time.monotonic())
            if wait <= 0:
                return False
            self._cond.wait(wait)
            pause = min(2 * pause, FLUSH_POLL_S)
        return True

    def _claim_for_write(self, index: int, hold: bool) -> bool:
        """Shared-memory staging: ``False`` while a worker's copy from that buffer may be under way."""
        return self._staging is None or self._staging.claim_for_write(index, hold)

    def _snapshot(self, index: int, version: int) -> None:
        if self._flat is not None:
            self._flat.stage_into(self._buffers[index])
        else:
            with torch.no_grad():
                torch._foreach_copy_(self._targets[index], self._sources)
        self._version_slots[index][0] = version

    def _stream(self, index: int, version: int) -> None:
        """Publish buffer ``index`` as ``version`` first, then write it chunk by chunk: shared-memory workers that
        poll meanwhile copy behind the trainer, so their copy overlaps the trainer's instead of following it."""
        staging = self._staging
        staging.begin_fill(index)
        self._version_slots[index][0] = version
        staging.filled(index, weights_offset())
        staging.publish(index)
        try:
            self._flat.stage_into(self._buffers[index], functools.partial(staging.filled, index))
        except BaseException:  # a Ctrl-C between chunks: finish what workers may already be copying, then go
            self._flat.stage_into(self._buffers[index])
            staging.filled(index, staging.nbytes)
            raise

    def _adopt_sources(self, named: dict[str, torch.Tensor]) -> None:
        self._sources = [named[name] for name, _, _ in self._schema.entries]
        module = unwrap(self._module)
        self._flat = FlatWeights.adopt(module, self._schema, self._sources) if self.flatten_weights else None
        self._layout_probe = self._flat.probe if self._flat is not None else LayoutProbe(module, self._schema, self._sources)
        # Shared-memory staging of big flat weights is published before it is written (see _stream), unless a
        # checksum must be stamped on every byte first, or the workers' copies would take the trainer's cores
        # (then they make the push slower instead of the delivery faster). The fill word must become visible
        # after the bytes it covers, which x86's total store order guarantees and weaker CPUs do not.
        self._streams = (
            _STORES_IN_ORDER
            and self.channel != "group"
            and not self.checksum
            and self._flat is not None
            and self._flat.streams
            and len(self.workers) < _available_cores()
        )

    def _check_sources(self) -> None:
        """Detect a module whose parameters were replaced, reshaped or moved since :meth:`start`."""
        if self._layout_probe.unchanged():
            return
        named = named_weights(self._module)
        problem = self._schema.mismatch(WeightSchema.of(named), "workers", "trainer now")
        if problem is None:  # same layout, new tensors or new memory (load_state_dict(assign=True), p.data = ...)
            self._adopt_sources(named)
            return
        raise SchemaMismatchError(f"The synced module changed its parameters after the workers connected: {problem}")


_STORES_IN_ORDER = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _version_slot(wire: TensorDictBase):
    """Where to write a wire buffer's version: word 0 of its header on the host, a one-element view on a GPU."""
    words = header_words(wire)
    return words if words is not None else wire[VERSION_KEY].view(1)


class _WorkerLink(threading.Thread):
    """Serves one worker: connect, deliver the newest staged version whenever it is ready, and re-admit it.

    Each connection of the worker is an *epoch* with a fresh transport and group name, so a worker process
    that dies and comes back under the same worker id gets a full resync and jumps to the newest version.
    """

    def __init__(self, scheme: WeightSyncScheme, status: WorkerStatus) -> None:
        super().__init__(name=f"fws-link-{status.worker_id}", daemon=True)
        self.scheme = scheme
        self.status = status
        self.store = scheme.control.client()
        self.transport: Optional[DistributedTransport] = None

    def abort(self, transport: Optional[DistributedTransport] = None) -> None:
        """Wake this link wherever it waits on its worker (called from other threads); ``transport``: only if it
        still waits on that connection."""
        transport = transport or self.transport
        if transport is None:
            return
        try:
            transport.abort(self.scheme.control.client())
        except Exception:  # the store is gone: the link is exiting anyway
            pass

    def run(self) -> None:
        epoch = 0
        while not self.scheme.closing:
            transport = self.transport = DistributedTransport(
                weights_buffer=self.scheme._buffers[0],
                shared_staging=self.scheme._staging,
                store=self.store,
                rank=self.status.rank,
                backend=self.scheme.backend,
                channel=self.scheme.channel,
                timeout=self.scheme.timeout,
                group_name=f"fws/pg/{self.status.rank}/{epoch}",
                latest_key=LATEST_KEY,
            )
            try:
                self._serve(transport)
            except TransportAborted:
                pass
            except (SchemaMismatchError, TransportError) as err:
                if not self.scheme.closing:
                    self.scheme.worker_failed(self.status.worker_id, str(err))
            finally:
                transport.close()
            epoch += 1

    def _serve(self, transport: DistributedTransport) -> None:
        while not transport.receiver_connected():
            if self.scheme.closing:
                return
            time.sleep(0.05)
        self.scheme.worker_joined(self.status)
        wire, index = self.scheme.pin_latest()
        try:
            transport.setup_connection_and_weights_on_sender(wire)
        finally:
            self.scheme.unpin(index)
        self.scheme.delivered(self.status, read_header(wire)[0])
        if transport.channel == SharedMemoryChannel.name:
            self._serve_shared()
            return
        self.scheme.serving_over_group(True)
        try:
            while self.scheme.wait_for_newer(self.status, self.status.delivered_version, over_group=True):
                self._deliver(transport)
        finally:
            self.scheme.serving_over_group(False)

    def _serve_shared(self) -> None:
        """A shared-memory worker takes each update off the board by itself; this link only stamps checksums."""
        self.scheme.watch_board(self.status)
        if not self.scheme.checksum:
            self.scheme.wait_while_served(self.status)
            return
        published = self.status.delivered_version
        while self.scheme.wait_for_newer(self.status, published):
            published = self.scheme.publish_latest()

    def _deliver(self, transport: DistributedTransport) -> None:
        if not transport.peer_armed:
            transport.instruct()
            self._patiently(transport.wait_ready)
        wire, index = self.scheme.pin_latest()
        version = read_header(wire)[0]
        try:
            transport.post_send(wire)
            transport.wait_sent()
        finally:
            self.scheme.unpin(index)
        # An armed worker answers when it next polls, however long its rollout: wait as long as it lives.
        if self._patiently(transport.wait_ack):
            self.scheme.delivered(self.status, version)
        transport.drop_read_ack()  # now, rather than on the way of the next send

    def _patiently(self, wait: Callable[[], object]) -> object:
        """Wait as long as the worker lives: a busy worker is fine, a dead one is the monitor's to declare."""
        while True:
            try:
                return wait()
            except TransportTimeout:
                if not self.status.alive or self.scheme.closing:
                    raise TransportAborted(f"worker {self.status.worker_id} is gone") from None


class _Doorbell(threading.Thread):
    """Wakes the links waiting on the scheme's condition after a push, for one lock release on the trainer thread.

    A ``notify_all`` from push() itself would cost the trainer two futex wakes per waiting link (each waiter's
    lock, then the condition's lock it takes back); the doorbell costs one whatever the number of workers, and
    this thread does the notifying. Links that poll instead cost the trainer far more: four links looking every
    0.5 ms made a small training step 1.4x slower (they take the GIL each time the trainer releases it). Rings
    that come while a previous one is being answered coalesce: the links read the newest version anyway, and
    ``publish`` (called after an answer, off the trainer thread, when ``publish_due()`` said so before the links
    woke) writes the newest one to the store.
    """

    def __init__(self, cond: threading.Condition, publish_due: Callable[[], bool], publish: Callable[[], None]) -> None:
        super().__init__(name="fws-doorbell", daemon=True)
        self._cond = cond
        self._publish_due = publish_due
        self._publish = publish
        self._bell = threading.Lock()
        self._bell.acquire()  # held = not rung
        self._stopped = False

    def ring(self) -> None:
        try:
            self._bell.release()
        except RuntimeError:  # rung already and not yet answered: that answer covers this ring too
            pass

    def stop(self) -> None:
        self._stopped = True
        self.ring()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stopped:
            self._bell.acquire()
            with self._cond:
                due = self._publish_due()
                self._cond.notify_all()
            if not due:
                continue
            try:
                self._publish()
            except Exception:  # the store is shutting down with the trainer
                pass


class _HeartbeatMonitor(threading.Thread):
    """Declares a worker dead when it reports an error, exits, or its heartbeat stops advancing."""

    def __init__(self, scheme: WeightSyncScheme, interval: float = 0.25) -> None:
        super().__init__(name="fws-heartbeat-monitor", daemon=True)
        self.scheme = scheme
        self.interval = interval
        self._stopped = threading.Event()
        self._store = scheme.control.client()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            for status in self.scheme.workers:
                if not status.alive:
                    continue
                try:
                    reason = self._check(status, now)
                except Exception:  # store shutting down with the trainer
                    return
                if reason:
                    self.scheme.worker_failed(status.worker_id, reason)

    def sweep(self) -> None:
        """One last look at the workers' error reports (at shutdown, after the monitor stopped)."""
        for status in self.scheme.workers:
            if status.alive and self._store.check([error_key(status.rank)]):
                self.scheme.worker_failed(status.worker_id, self._reported_error(status))

    def _reported_error(self, status: WorkerStatus) -> str:
        return "it raised:\n" + self._store.get(error_key(status.rank)).decode(errors="replace")

    def _check(self, status: WorkerStatus, now: float) -> Optional[str]:
        store = self._store
        if store.check([error_key(status.rank)]):
            return self._reported_error(status)
        if store.check([exit_key(status.rank)]):
            code = store.get(exit_key(status.rank)).decode()
            if code == "0":
                self.scheme.worker_failed(status.worker_id, "worker_fn returned before training ended", error=False)
                return None
            return f"its process exited with code {code}"
        beat = store.add(heartbeat_key(status.rank), 0)
        if beat != status.beat:
            status.beat, status.beat_seen_at = beat, now
            return None
        # A worker that connected has been beating since before its connect; one that never connected may
        # still be starting up (imports, building envs), which is not a failure.
        silent = now - status.beat_seen_at
        if status.connected and silent > self.scheme.heartbeat_timeout:
            return f"no heartbeat for {silent:.1f}s (process killed or hung)"
        return None
