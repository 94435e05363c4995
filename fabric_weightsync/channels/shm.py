"""The shared-memory data plane: workers on the sender's host copy updates straight out of its staging files.

The sender's staging buffers are files in ``/dev/shm`` and the board (:class:`~.board.SharedStaging`) says which
one holds the newest version. A worker's poll is a read of that memory; to take an update it holds a shared
``flock`` on the buffer's file while it copies, and the sender only rewrites a buffer it can lock exclusively
without waiting, so an old version is never overwritten while it is read, a sender never waits on a reader, and
a reader that dies releases its lock with its process. A publication may come before its bytes (the scheme
streams big updates): a reader then copies only what the buffer's fill word says is written.
"""

from typing import Callable, Optional

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.channels.base import ChannelTimeout, Endpoint, host_id, register
from fabric_weightsync.channels.board import REFUSED_VERSION, SharedStaging
from fabric_weightsync.protocol import poll_until
from fabric_weightsync.weights import WeightSchema
from fabric_weightsync.wire import WireBuffer


@register
class SharedMemoryChannel:
    """Same-host data plane: staging files and a board in ``/dev/shm``, with no store round trip per update."""

    name = "shm"
    priority = 10
    carries_bytes = False

    def __init__(self, endpoint: Endpoint, staging: SharedStaging, owns_staging: bool) -> None:
        self.endpoint = endpoint
        self.staging = staging
        self._owns_staging = owns_staging
        self._posted = 0
        self._taken = 0
        self._locked: Optional[int] = None

    @classmethod
    def accepts(cls, preferred: str, hello: dict) -> bool:
        return preferred == "shm" or (preferred == "auto" and hello.get("host") == host_id())

    @classmethod
    def for_sender(cls, endpoint: Endpoint, schema: WeightSchema) -> "SharedMemoryChannel":
        staging, owns = endpoint.shared_staging, endpoint.shared_staging is None
        if owns:  # a standalone transport: one shared buffer of its own
            staging = SharedStaging.create(schema, 1, endpoint.rank)
        staging.reset_acks(endpoint.rank)  # before the verdict: the worker may ack right after it
        return cls(endpoint, staging, owns)

    @classmethod
    def for_receiver(cls, endpoint: Endpoint, verdict: dict, schema: WeightSchema) -> "SharedMemoryChannel":
        return cls(endpoint, SharedStaging.open(schema, verdict["files"], verdict["board"]), owns_staging=True)

    @property
    def applied_row(self) -> memoryview:
        return self.staging.ack_row(self.endpoint.rank)

    def verdict(self) -> dict:
        return {"channel": self.name, "files": self.staging.paths, "board": self.staging.board_path}

    def connect(self, group_rank: int) -> None:
        pass  # both ends mapped the files already

    def sender_buffer(self, wire: WireBuffer) -> WireBuffer:
        if self.sends_from(wire):
            return wire
        staged = self.staging.buffers[0]  # the worker can only read our shared files
        staged.copy_from(wire)
        return staged

    def sends_from(self, wire: WireBuffer) -> bool:
        return any(wire is staged for staged in self.staging.buffers)

    def stage(self, wire: WireBuffer, write: Callable[[], None]) -> None:
        """Hold ``wire``'s file exclusively while ``write`` rewrites it (waits out a worker's copy)."""
        index = self.staging.index_of(wire)
        self._wait(lambda: self.staging.try_lock(index), "for a worker to finish copying from shared memory")
        try:
            write()
        finally:
            self.staging.unlock(index)

    # ------------------------------------------------------------------ sender
    def await_ready(self, timeout: Optional[float]) -> None:
        pass  # the worker takes whatever is published when it looks

    def post(self, wire: WireBuffer, tag: int) -> None:
        self._posted = self.staging.publish(self.staging.index_of(wire))

    def wait_sent(self) -> None:
        """The buffer is free once the worker applied this publication or a newer one."""
        self._wait(lambda: self.staging.acked(self.endpoint.rank)[0] >= self._posted, "for the worker to copy from shared memory")

    def wait_ack(self, timeout: Optional[float]) -> bytes:
        self._wait(lambda: self.staging.acked(self.endpoint.rank)[0] >= self._posted, "for the worker's ack", timeout)
        return protocol.REFUSED if self.staging.acked(self.endpoint.rank)[1] == REFUSED_VERSION else protocol.ACK

    def tidy(self) -> None:
        pass  # answers are rows on the board: nothing to clear

    # ------------------------------------------------------------------ worker
    def take_notice(self, timeout: float) -> bool:
        """Whether a publication newer than the last one taken appears within ``timeout`` (0: look once)."""
        return poll_until(lambda: self.staging.published()[0] > self._taken, timeout, aborted=self.endpoint.aborted)

    def receive(self, landing: WireBuffer, tag: int, land: bool) -> WireBuffer:
        """The newest publication: with ``land``, copied into ``landing`` (as the sender writes it, if it still does);
        otherwise its buffer, locked and whole until :meth:`acknowledge`."""
        self._wait(self._lock_newest, "for the sender to publish an update in shared memory")
        staging, index = self.staging, self._locked
        staged = staging.buffers[index]
        if not land:
            self._wait(lambda: staging.fill_of(index) == staging.nbytes, "for the sender to finish writing the update")
            return staged
        source, destination, done = staged.storage, landing.storage, 0
        if staging.fill_of(index) == staging.nbytes:  # written already (the usual case): one copy, no slicing
            destination.copy_(source)
            done = staging.nbytes
        while done < staging.nbytes:
            self._wait(lambda: staging.fill_of(index) > done, "for the sender to finish writing the update")
            ready = staging.fill_of(index)
            destination[done:ready].copy_(source[done:ready])
            done = ready
        self._release()  # early: the sender may rewrite that buffer while this worker applies its copy
        return landing

    def acknowledge(self, version: int, word: bytes, arm: Optional[WireBuffer]) -> None:
        self._release()
        self.staging.acknowledge(self.endpoint.rank, self._taken, REFUSED_VERSION if word == protocol.REFUSED else version)

    def _release(self) -> None:
        if self._locked is not None:
            self.staging.unlock(self._locked)
            self._locked = None

    def _lock_newest(self) -> bool:
        sequence, index, version = self.staging.published()
        if sequence <= self._taken or not self.staging.try_lock(index, shared=True):
            return False
        # Locked: nothing writes the buffer now. It must still hold what was published (a sender may have
        # rewritten it since), or a checksum stamped for that version would not match.
        if self.staging.published() != (sequence, index, version) or self.staging.version_in(index) != version:
            self.staging.unlock(index)
            return False
        self._taken, self._locked = sequence, index
        return True

    # ------------------------------------------------------------------ both
    def wake(self, store: ControlStore) -> None:
        pass  # every wait here is a poll that checks the abort flag

    def close(self) -> None:
        if self._owns_staging:
            self.staging.close()

    def _wait(self, ready: Callable[[], bool], what: str, timeout: Optional[float] = None) -> None:
        """Poll ``ready`` (a memory read) up to ``timeout`` (default: the endpoint's); raise naming ``what``."""
        timeout = self.endpoint.timeout if timeout is None else timeout
        if not poll_until(ready, timeout, aborted=self.endpoint.aborted):
            raise ChannelTimeout(f"Timed out waiting {what} (worker rank {self.endpoint.rank}, board {self.staging.board_path})")
