"""Training rank 0's per-worker link threads, and the doorbell that wakes them after a push.

A link connects its worker through a :class:`~fabric_weightsync.transport.DistributedTransport`, then serves it:
a worker that takes updates itself (shared memory) needs nothing more unless checksums must be stamped; for
one served over a process group, the link sleeps until a push rings and sends the newest staged version once the
worker is ready. A busy worker therefore never holds a buffer and skips every version superseded meanwhile. Each
connection is an *epoch* with a fresh transport, so a worker that dies and comes back is fully resynced.
"""

import functools
import threading
import time
from typing import Callable, Optional

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.health import Health, WorkerStatus
from fabric_weightsync.protocol import poll_until
from fabric_weightsync.staging import Staging
from fabric_weightsync.transport import DistributedTransport, TransportAborted, TransportError, TransportTimeout
from fabric_weightsync.weights import SchemaMismatchError

DEAD_LINK_JOIN_S = 0.5
"""Seconds :meth:`Links.close` waits in all for the links of dead workers (they poll for a reconnection)."""

TransportFactory = Callable[[WorkerStatus, int], DistributedTransport]
"""Makes the sender's transport of a worker's connection number ``epoch``."""


class Links:
    """A link thread per worker that needs one, plus the doorbell; :meth:`announce` after every push.

    A worker that takes updates off the shared-memory board by itself needs no thread once connected: its link
    parks the connection and ends, and a new link starts for the worker if it fails (to take its reconnection).

    Args:
        staging: the double buffer the links send from.
        health: the workers' statuses (a link reports connects, deliveries and failures there).
        open_store: opens a new client of the control store.
        transport_for: makes the transport of each connection.
        timeout: seconds a live worker's link gets to finish at :meth:`close` (at most 5).
        latest_key: the store key that holds the newest version for workers served over a group.
    """

    def __init__(
        self,
        staging: Staging,
        health: Health,
        open_store: Callable[[], ControlStore],
        transport_for: TransportFactory,
        timeout: float,
        latest_key: str = protocol.LATEST_KEY,
    ) -> None:
        self.staging = staging
        self.latest_key = latest_key
        self.timeout = timeout
        self.health = health
        self.open_store = open_store
        self.transport_for = transport_for
        self.closing = False
        self.group_workers = 0
        """Workers served over a process group: a push may have to reach the latest-version key for them."""
        self.idle_group_links = 0
        """Of those, links waiting for a newer version: their workers hold no update a push could supersede."""
        self._links = {status.worker_id: _WorkerLink(self, status, 0) for status in health.served}
        self._parked: dict[int, tuple[DistributedTransport, int]] = {}
        """Connections of workers that serve themselves, with their number, while they live (no thread serves them)."""
        self._doorbell = _Doorbell(self)
        self._abort_store: Optional[ControlStore] = None
        self._abort_lock = threading.Lock()
        health.on_failed = self.stopper

    @property
    def threads(self) -> list[threading.Thread]:
        """The link threads, worker by worker (a parked connection's has ended)."""
        return list(self._links.values())

    def sent_version(self, worker_id: int) -> int:
        """The version last sent to worker ``worker_id`` (its current connection's)."""
        transport = self._links[worker_id].transport
        return transport.version if transport is not None else -1

    def start(self) -> None:
        # One client for every abort, opened now: at close, after a crash, the store may be gone, and a new client
        # would retry connecting for the whole timeout where an open one fails at once.
        self._abort_store = self.open_store()
        self._doorbell.start()
        for link in self._links.values():
            link.start()

    def announce(self) -> None:
        """A push made a new version the newest: wake whoever waits for one (no-op when nobody does)."""
        if self.staging.waiters > 0 or self.group_workers > 0:
            self._doorbell.ring()

    def stopper(self, worker_id: int) -> Callable[[], None]:
        """What wakes worker ``worker_id``'s link from the connection it serves now, and only from that one: once
        woken, the link may already be opening the next connection, which this must not abort. A parked
        connection is closed instead, and a new link waits for the worker's next one. Called under the lock."""
        parked = self._parked.pop(worker_id, None)
        if parked is not None:
            return functools.partial(self._unpark, worker_id, *parked)
        link = self._links.get(worker_id)
        if link is None:  # another node's sender serves it
            return lambda: None
        return functools.partial(link.abort, link.transport)

    def park(self, status: WorkerStatus, transport: DistributedTransport, epoch: int) -> bool:
        """Keep a self-served worker's connection without a thread; ``False`` if it failed or closing began."""
        with self.staging.pushed:
            if self.closing or not status.alive:
                return False
            self._parked[status.worker_id] = (transport, epoch)
            return True

    def _unpark(self, worker_id: int, transport: DistributedTransport, epoch: int) -> None:
        transport.close()
        if not self.closing:
            link = self._links[worker_id] = _WorkerLink(self, self._links[worker_id].status, epoch + 1)
            link.start()

    def close(self) -> None:
        """Stop every link and the doorbell."""
        with self.staging.pushed:
            self.closing = True
            self.staging.pushed.notify_all()
            parked, self._parked = list(self._parked.values()), {}
        for transport, _ in parked:
            transport.close()
        self._doorbell.stop()
        for link in self._links.values():
            link.abort()
        dead_deadline = time.monotonic() + DEAD_LINK_JOIN_S
        for link in self._links.values():
            # A dead worker's link may sit in a transfer that only its timeout ends (it is a daemon thread): it gets
            # a moment, enough to leave its wait for a reconnection (a thread inside a store call when the
            # interpreter finalizes aborts the process).
            link.join(min(self.timeout, 5.0) if link.status.alive else max(0.0, dead_deadline - time.monotonic()))

    def wait_for_newer(self, status: WorkerStatus, delivered: int, over_group: bool = False) -> bool:
        """Sleep until a version newer than ``delivered`` is staged; ``False`` if closing or the worker failed.

        ``over_group``: the link serves its worker over a process group and its last send was answered, so that
        worker holds no update a push could supersede while the link waits here (see :meth:`_latest_due`).
        """
        staging = self.staging
        with staging.pushed:
            self.idle_group_links += over_group
            try:
                staging.wait_for_push(lambda: self.closing or not status.alive or staging.latest_version > delivered)
            finally:
                self.idle_group_links -= over_group
            return not self.closing and status.alive

    def serving_over_group(self, joined: bool) -> None:
        with self.staging.pushed:
            self.group_workers += 1 if joined else -1

    def _latest_due(self) -> bool:
        """Whether the newest version must reach the store now (asked under the lock before the links wake).

        Only a worker served over a group that holds an update it has not answered reads that key, and its link
        is then not waiting for a newer version. When every such link waits, each sends the newest itself, and a
        store write would only compete with their sends for the cores.
        """
        return self.group_workers > self.idle_group_links


class _WorkerLink(threading.Thread):
    """Serves one worker: connect, deliver the newest staged version whenever it is ready, and re-admit it."""

    def __init__(self, links: Links, status: WorkerStatus, epoch: int) -> None:
        super().__init__(name=f"fws-link-{status.worker_id}", daemon=True)
        self.links = links
        self.status = status
        self.epoch = epoch
        """The number of the worker's connection this link serves first."""
        self.transport: Optional[DistributedTransport] = None
        self._sent_before = 0

    def abort(self, transport: Optional[DistributedTransport] = None) -> None:
        """Wake this link wherever it waits on ``transport`` (default: its current one; called from other threads)."""
        transport = transport or self.transport
        if transport is None:
            return
        try:
            with self.links._abort_lock:
                transport.abort(self.links._abort_store)
        except Exception:  # the store is gone: the link is exiting anyway
            pass

    def run(self) -> None:
        epoch = self.epoch
        while not self.links.closing:
            transport = self.transport = self.links.transport_for(self.status, epoch)
            parked = False
            try:
                parked = self._serve(transport) and self.links.park(self.status, transport, epoch)
            except TransportAborted:
                pass
            except (SchemaMismatchError, TransportError) as err:
                if not self.links.closing:
                    self.links.health.failed(self.status.worker_id, str(err))
            finally:
                if not parked:
                    transport.close()
            if parked:
                return
            epoch += 1

    def _serve(self, transport: DistributedTransport) -> bool:
        """Serve one connection of the worker; ``True`` when the worker takes updates by itself from now on."""
        links, staging = self.links, self.links.staging
        poll_until(lambda: links.closing or transport.check_connection(), None, max_pause=protocol.SLOW_POLL_S)
        if links.closing:
            return False
        links.health.joined(self.status)
        self._sent_before = self.status.bytes_sent
        with staging.pin_latest() as wire:
            transport.setup_connection_and_weights_on_sender(wire)
            version = wire.version
        self._delivered(transport, version)
        if transport.applied_row is not None:
            return self._serve_self_served(transport)
        staging.exempt(self.status.rank)
        links.serving_over_group(True)
        try:
            while links.wait_for_newer(self.status, self.status.delivered_version, over_group=True):
                self._deliver(transport)
        finally:
            links.serving_over_group(False)
        return False

    def _serve_self_served(self, transport: DistributedTransport) -> bool:
        """The worker takes each update off the board by itself; this link stays only to stamp checksums."""
        links, staging = self.links, self.links.staging
        self.status.applied_row = transport.applied_row
        if not staging.checksum:
            return True
        published = self.status.delivered_version
        while links.wait_for_newer(self.status, published):
            published = staging.publish_latest()
        return False

    def _deliver(self, transport: DistributedTransport) -> None:
        # A busy worker is fine and an armed one answers when it next polls: wait as long as it lives.
        self._patiently(lambda: transport.send_weights_async(self.links.staging))
        if self._patiently(transport.wait_ack):
            self._delivered(transport, transport.version)
        transport.tidy()  # now, rather than on the way of the next send

    def _delivered(self, transport: DistributedTransport, version: int) -> None:
        self.status.bytes_sent = self._sent_before + transport.bytes_sent
        self.links.health.delivered(self.status, version)

    def _patiently(self, wait: Callable[[], object]) -> object:
        """Wait as long as the worker lives: a busy worker is fine, a dead one is the monitor's to declare."""
        while True:
            try:
                return wait()
            except TransportTimeout:
                if not self.status.alive or self.links.closing:
                    raise TransportAborted(f"worker {self.status.worker_id} is gone") from None


class _Doorbell(threading.Thread):
    """Wakes the threads waiting on :attr:`Staging.pushed` after a push, for one lock release on the trainer thread.

    A ``notify_all`` from the push itself would cost the trainer two wakes per waiting link; the doorbell costs one
    whatever the number of workers, and this thread does the notifying. Rings that come while a previous one is
    being answered coalesce: the links read the newest version anyway. After waking them it also writes the newest
    version to the store when a worker served over a group may need it (:meth:`Links._latest_due`).
    """

    def __init__(self, links: Links) -> None:
        super().__init__(name="fws-doorbell", daemon=True)
        self.links = links
        self._bell = threading.Lock()
        self._bell.acquire()  # held = not rung
        self._stopped = False
        self._store: Optional[ControlStore] = None

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
        staging = self.links.staging
        self._store = self.links.open_store()
        while not self._stopped:
            self._bell.acquire()
            with staging.pushed:
                due = self.links._latest_due()
                staging.pushed.notify_all()
            if not due:
                continue
            try:
                self._store.set(self.links.latest_key, str(staging.latest_version).encode())
            except Exception:  # the store is shutting down with the trainer
                pass
