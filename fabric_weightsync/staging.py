"""The sender's double buffer: a push copies the module's weights into a staging buffer nobody reads; latest wins.

Two buffers whatever the number of workers (2x the weights). A buffer being sent (pinned) or copied from shared
memory is never written: the push takes the other one, and if both are busy it remembers the version, which the
next push or :meth:`Staging.take_pending` stages. Nothing here waits on a worker, and nothing needs a thread: the
links and the doorbell (:mod:`~fabric_weightsync.links`) wait on :attr:`Staging.pushed`.
"""

import contextlib
import functools
import os
import platform
import threading
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from fabric_weightsync.channels import SharedStaging
from fabric_weightsync.flat import FlatWeights
from fabric_weightsync.weights import LayoutProbe, SchemaMismatchError, WeightSchema, make_wire_buffer, named_weights, unwrap
from fabric_weightsync.wire import WireBuffer

_STORES_IN_ORDER = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
"""Whether a word written after some bytes is seen after them by other cores (total store order)."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Staging:
    """Two staging buffers of ``module``'s weights; :meth:`stage` copies into whichever nobody is reading.

    Args:
        module: the synced module (its weights are read at every :meth:`stage`).
        workers: how many workers may read the buffers (rows of the shared-memory board).
        shared: put the buffers in ``/dev/shm`` files with a board (workers on this host read them there);
            otherwise in memory on ``device``.
        device: where unshared buffers live (the weights' GPU for nccl, else host memory).
        checksum: stamp every version with a CRC32 before it is sent (done in :meth:`pin_latest`, off the trainer
            thread, and then published by :meth:`publish_latest`).
        flatten: move the module's weights into one wire-layout storage (see :class:`~fabric_weightsync.flat.FlatWeights`).
        pushed: the condition to notify after a push (its lock guards the staging's state); a new one by default.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        workers: int,
        shared: bool,
        device: torch.device,
        checksum: bool,
        flatten: bool,
        pushed: Optional[threading.Condition] = None,
    ) -> None:
        self.module = module
        self.checksum = checksum
        self._flatten = flatten
        self._workers = workers
        named = named_weights(module)
        self.schema = WeightSchema.of(named)
        self.shared: Optional[SharedStaging] = SharedStaging.create(self.schema, 2, workers) if shared else None
        self.buffers: list[WireBuffer] = self.shared.buffers if shared else [make_wire_buffer(named, device=device) for _ in (0, 1)]
        self._sources, self._flat, self._probe, self._streams = self._adopt(named)
        self.pushed = pushed or threading.Condition(threading.RLock())
        """Notified (by the doorbell) after a push, and whenever a waiter's world changes (a failure, close); its lock
        guards the staging's state."""
        self.waiters = 0
        """Threads inside :meth:`wait_for_push`: a push rings only when someone waits."""
        self._pins = [0, 0]
        self._latest = 0
        self._latest_version = -1
        self._pending: Optional[int] = None
        self._writing: Optional[int] = None
        self._sealed = [-1, -1]
        self._seal_locks = [threading.Lock(), threading.Lock()]

    @property
    def latest_version(self) -> int:
        return self._latest_version

    @property
    def streams(self) -> bool:
        """Whether a push publishes first and then writes in chunks, so shared-memory readers copy behind it."""
        return self._streams

    @property
    def pending_version(self) -> Optional[int]:
        """A version remembered but not staged yet (both buffers were busy, or :meth:`note` recorded it)."""
        return self._pending

    def start(self, version: int) -> None:
        """Stage the module's current weights as ``version`` (before any worker connects)."""
        self._snapshot(0, version)
        self._latest, self._latest_version = 0, version

    def stage(self, version: int, announce: Callable[[], None] = lambda: None) -> bool:
        """Copy the weights into a buffer nobody reads as ``version``; whether it was staged now.

        ``announce`` runs once the version is the newest, before shared-memory workers see it. Raises
        :class:`SchemaMismatchError` when the module's weights changed shape since the workers connected.
        """
        self._check_sources()
        with self.pushed:
            # Prefer the older buffer; overwrite the newest one only when a slow send or a worker's copy out of
            # shared memory still reads the older (readers then wait the one copy out, never the trainer).
            for target in (1 - self._latest, self._latest):
                if self._pins[target] == 0:
                    streamed = self._streams and not self.shared.is_newest(target)
                    if self.shared is None or self.shared.claim_for_write(target, hold=not streamed):
                        break
            else:
                self._pending = version
                return False
            self._writing = target
        if streamed:
            self._stream(target, version)
        else:
            self._snapshot(target, version)
        with self.pushed:
            self._latest, self._latest_version = target, version
            self._writing = self._pending = None
        announce()
        if self.shared is not None:
            self.shared.end_write(target)
            if not self.checksum and not streamed:  # with checksums on, publish_latest() does it once it is stamped
                self.shared.publish(target)
        return True

    def note(self, version: int) -> None:
        """Record that the module is now at ``version`` without staging it (a later flush stages it)."""
        if version > self._latest_version:
            self._pending = version

    def wait_for_push(self, predicate: Callable[[], bool]) -> None:
        """Sleep (holding :attr:`pushed`) until ``predicate()``, which only a push, a failure or close makes true."""
        self.waiters += 1
        try:
            self.pushed.wait_for(predicate)
        finally:
            self.waiters -= 1

    @contextlib.contextmanager
    def pin_latest(self) -> Iterator[WireBuffer]:
        """The newest buffer, stamped with its checksum if they are on, never rewritten while the context lasts."""
        index = self.pin_newest()
        try:
            wire = self.buffers[index]
            if self.checksum:
                with self._seal_locks[index]:  # pinned: the trainer cannot rewrite it meanwhile
                    if self._sealed[index] != wire.version:
                        wire.checksum = wire.compute_checksum()
                        self._sealed[index] = wire.version
            yield wire
        finally:
            self.unpin(index)

    def pin_newest(self) -> int:
        """Keep the newest buffer from being rewritten until :meth:`unpin`; returns its index."""
        with self.pushed:
            self.wait_for_push(lambda: self._writing != self._latest)  # a push overwriting the newest: its end rings
            self._pins[self._latest] += 1
            return self._latest

    def unpin(self, index: int) -> None:
        with self.pushed:
            self._pins[index] -= 1

    def publish_latest(self) -> int:
        """Stamp and publish the newest buffer to shared-memory workers (checksums on); returns its version."""
        with self.pin_latest() as wire:
            self.shared.publish(self.buffers.index(wire))
            return wire.version

    def exempt(self, rank: int) -> None:
        """Worker ``rank`` is served over a process group: writes need not wait for its board row."""
        if self.shared is not None:
            self.shared.exempt(rank)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def _snapshot(self, index: int, version: int) -> None:
        wire = self.buffers[index]
        if self._flat is not None:
            self._flat.stage_into(wire)
        else:
            with torch.no_grad():
                torch._foreach_copy_(wire.tensors, self._sources)
        wire.version = version

    def _stream(self, index: int, version: int) -> None:
        """Publish buffer ``index`` as ``version`` first, then write it chunk by chunk: shared-memory workers that poll
        meanwhile copy behind the trainer, so their copy overlaps the trainer's instead of following it."""
        shared, wire = self.shared, self.buffers[index]
        shared.begin_fill(index)
        wire.version = version
        shared.filled(index, wire.layout.data_offset)
        shared.publish(index)
        try:
            self._flat.stage_into(wire, functools.partial(shared.filled, index))
        except BaseException:  # a Ctrl-C between chunks: finish what workers may already be copying, then go
            self._flat.stage_into(wire)
            shared.filled(index, shared.nbytes)
            raise

    def _adopt(self, named: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], Optional[FlatWeights], LayoutProbe, bool]:
        """The weights in schema order, moved into one storage if they can be; the check of their layout; and
        whether a push streams."""
        sources = [named[name] for name, _, _ in self.schema.entries]
        module = unwrap(self.module)
        flat = FlatWeights.adopt(module, self.schema, sources) if self._flatten else None
        probe = flat.probe if flat is not None else LayoutProbe(module, self.schema, sources)
        # Big flat host weights on shared memory are published before they are written (see _stream), unless a
        # checksum must cover every byte first, or the workers' copies would take the trainer's cores. The fill
        # word must become visible after the bytes it covers, which only total store order guarantees.
        streams = (
            _STORES_IN_ORDER
            and self.shared is not None
            and not self.checksum
            and flat is not None
            and flat.streams
            and self._workers < available_cores()
        )
        return sources, flat, probe, streams

    def _check_sources(self) -> None:
        """Follow weights that were replaced or moved since the workers connected; refuse a changed layout."""
        if self._probe.unchanged():
            return
        named = named_weights(self.module)
        problem = self.schema.mismatch(WeightSchema.of(named), "workers", "trainer now")
        if problem is None:  # same layout, new tensors or new memory (load_state_dict(assign=True), p.data = ...)
            self._sources, self._flat, self._probe, self._streams = self._adopt(named)
            return
        raise SchemaMismatchError(f"The synced module changed its parameters after the workers connected: {problem}")
