"""Data planes of a transport: how the bytes of one update get from the sender's wire buffer to the worker.

- :class:`GroupChannel`: one ``send`` of the wire buffer's single storage on a standalone two-rank process
  group (gloo, or nccl for CUDA tensors on distinct GPUs). Works across hosts. A worker may *arm* it: post
  the receive of the next update ahead of time, so that gloo lands it in the background and a poll is a
  memory read.
- :class:`SharedMemoryChannel`: the sender's staging buffers are files in ``/dev/shm`` and a board in a third
  file says which one holds the newest version; the worker copies from it straight into its policy under a
  shared file lock and writes its ack on the board. One memcpy per worker, no network stack and no store
  round trip per update. Same host only.

Both are driven by :class:`~fabric_weightsync.transport.DistributedTransport`; the group channel's signalling
goes through the store (instruction, ready and ack keys), the shared-memory channel's through the board.
"""

import contextlib
import fcntl
import functools
import os
import random
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from tensordict import TensorDictBase

from fabric_weightsync.weights import WeightSchema, header_words, wire_nbytes, wire_storage, wire_views


class ChannelError(RuntimeError):
    """The data plane failed: peer gone, timed out, or a shared-memory file that cannot be mapped."""


class StoreTimeout(ChannelError):
    """A store key did not appear in time."""


def await_key(store: dist.Store, key: str, what: str, timeout: Optional[float] = None) -> bytes:
    """The value of ``key`` once it is set.

    Without ``timeout`` this is one round trip: a store ``get`` blocks until the key exists, up to the client's
    own timeout. With one, a ``wait`` comes first (one more round trip).
    """
    try:
        if timeout is not None:
            store.wait([key], timedelta(seconds=timeout))
        return store.get(key)
    except dist.DistStoreError as err:
        raise StoreTimeout(f"Timed out waiting {what} (store key {key!r}): {err}") from err


def poll_until(ready: Callable[[], bool], timeout: float, aborted: Callable[[], bool]) -> bool:
    """Poll ``ready`` (a memory read) with a growing pause until it holds (``True``) or ``timeout`` passes."""
    deadline, pause = None, 0.00005
    while not ready():
        if deadline is None:  # read the clock only when the first look failed: most calls succeed at once
            deadline = time.monotonic() + timeout
        if aborted():
            raise ChannelError("the transport was aborted")
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.001)
    return True


class _ArmedReceive(NamedTuple):
    work: dist.Work
    wire: TensorDictBase
    last_word: memoryview
    mark: int


class GroupChannel:
    """Sends the wire storage as one message on a two-rank group (sender rank 0, worker rank 1).

    The worker either posts its receive when told an update waits (and the sender sends once it is posted), or
    *arms* the channel (:meth:`arm`, host memory only): the receive of the next update is posted right after the
    previous one was applied, gloo's own thread lands the bytes whenever the sender sends, and :meth:`landed`
    is a read of the buffer's last word. A gloo receive cannot be asked whether it finished without waiting
    on it (a wait that times out breaks the whole group), so the worker fills that word with a random mark
    before posting, and the update's own bytes overwrite it last: gloo's TCP pairs write a message in order. The
    work's wait still confirms every byte arrived before the update is taken (:meth:`receive`).
    """

    name = "group"

    def __init__(
        self,
        store: dist.Store,
        group_name: str,
        backend: str,
        timeout: float,
        group: Optional[dist.ProcessGroup] = None,
        aborted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.group_name = group_name
        self.backend = backend
        self.timeout = timeout
        self.group = group
        self._aborted = aborted
        self._pending: Optional[dist.Work] = None
        self._armed: Optional[_ArmedReceive] = None
        self._last_words: dict[int, memoryview] = {}
        self._marks = random.Random()  # its own: drawing from the global one would shift a seeded user's stream

    def connect(self, group_rank: int) -> None:
        if self.group is None:
            self.group = new_pair_group(self.store, self.group_name, group_rank, self.backend, self.timeout)

    def writing(self, wire: TensorDictBase) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the transport finishes a send in flight before it restages

    def post(self, wire: TensorDictBase, tag: int) -> None:
        self._pending = self._group().send([wire_storage(wire)], 1, tag)

    def wait_sent(self) -> Optional[bytes]:
        """Block until the sender's buffer is free again; returns the worker's ack if it had to read it."""
        if self._pending is not None:
            work, self._pending = self._pending, None
            self._wait(work, "sending")
        return None

    def release(self) -> None:
        pass

    def receive(self, wire: TensorDictBase, tag: int, land: bool = True) -> TensorDictBase:
        """Receive into ``wire`` (a process group always lands the update there); armed, take what landed."""
        if self._armed is None:
            self._wait(self._group().recv([wire_storage(wire)], 0, tag), "receiving")
            return wire
        armed, self._armed = self._armed, None
        if armed.wire is not wire:
            raise ChannelError("the update was armed to land in another buffer")
        self._wait(armed.work, "receiving")
        return wire

    # ------------------------------------------------------------------ armed receiver
    @property
    def armed(self) -> bool:
        return self._armed is not None

    def arm(self, wire: TensorDictBase, tag: int) -> None:
        """Post the receive of the next update into ``wire`` (host memory) now, ahead of any notice of it."""
        storage = wire_storage(wire)
        last_word = self._last_words.get(storage.data_ptr())
        if last_word is None:  # the landing buffers alternate between two storages: map each one once
            last_word = self._last_words[storage.data_ptr()] = memoryview(storage[-8:].view(torch.int64).numpy())
        mark = self._marks.getrandbits(63)  # an update whose last word equals it would go unnoticed: 1 in 2**63
        last_word[0] = mark
        self._armed = _ArmedReceive(self._group().recv([storage], 0, tag), wire, last_word, mark)

    def landed(self) -> bool:
        """Whether the armed update's bytes have all arrived (a memory read; :meth:`receive` confirms it)."""
        return self._armed.last_word[0] != self._armed.mark

    def wait_landed(self, timeout: float) -> bool:
        return poll_until(self.landed, timeout, self._aborted)

    def close(self) -> None:
        """Drop the group; an armed receive goes with it (its buffer stays referenced by the work until then)."""
        self.group, self._armed = None, None

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise ChannelError("not connected, or an earlier transfer failed")
        return self.group

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as err:
            self.group = None  # a group whose transfer failed cannot be trusted again
            raise ChannelError(f"{what} failed: {err}") from err


class SharedMemoryChannel:
    """Same-host data plane: staging buffers and a *board* in ``/dev/shm``, with no store round trip per update.

    The board (:class:`SharedStaging`) holds the newest publication (a sequence number, which buffer, which
    version) and, per worker rank, the sequence and version it last applied. A worker's poll is a read of
    that memory; to take an update it holds a shared ``flock`` on the buffer's file while it copies, and the
    sender only rewrites a buffer it can lock exclusively without waiting, so an old version is never
    overwritten while it is read, a trainer never waits on a reader, and a reader that dies releases its lock
    with its process. A publication may come before its bytes (the scheme streams big updates): a reader then
    copies only what the buffer's fill word on the board says is written, into its own landing buffer.
    """

    name = "shm"

    def __init__(self, staging: "SharedStaging", rank: int, timeout: float, aborted: Callable[[], bool]) -> None:
        self.staging = staging
        self.rank = rank
        self.timeout = timeout
        self._aborted = aborted
        self._posted = 0
        self._taken = 0
        self._locked: Optional[int] = None

    def connect(self, group_rank: int) -> None:
        pass  # both ends mapped the files already

    # ------------------------------------------------------------------ sender
    @contextlib.contextmanager
    def writing(self, wire: TensorDictBase) -> Iterator[None]:
        """Hold ``wire``'s file exclusively while the sender rewrites it (waits out a worker's copy)."""
        index = self.staging.index_of(wire)
        self._wait(lambda: self.staging.try_lock(index), "for a worker to finish copying from shared memory")
        try:
            yield
        finally:
            self.staging.unlock(index)

    def post(self, wire: TensorDictBase, tag: int) -> None:
        self._posted = self.staging.publish(self.staging.index_of(wire))

    def wait_sent(self) -> Optional[bytes]:
        """The buffer is free once the worker applied this publication or a newer one: returns its ack."""
        self._wait(lambda: self.staging.acked(self.rank)[0] >= self._posted, "for the worker to copy from shared memory")
        return _ACK if self.staging.acked(self.rank)[1] != REFUSED else b"checksum mismatch"

    # ------------------------------------------------------------------ receiver
    def take_notice(self, timeout: float) -> bool:
        """Whether a publication newer than the last one taken appears within ``timeout`` (0: look once)."""
        return self._wait(lambda: self.staging.published()[0] > self._taken, None, timeout)

    def receive(self, wire: TensorDictBase, tag: int, land: bool = False) -> TensorDictBase:
        """The newest publication: with ``land``, copied into ``wire`` (as the sender writes it, if it still does)
        and returned; otherwise its buffer, locked and whole. Call :meth:`release` after the copy, before the ack."""
        self._wait(self._lock_newest, "for the sender to publish an update in shared memory")
        staged, index = self.staging.buffers[self._locked], self._locked
        if not land:
            self._wait(lambda: self.staging.fill_of(index) == self.staging.nbytes, "for the sender to finish writing the update")
            return staged
        source, destination, done = wire_storage(staged), wire_storage(wire), 0
        if self.staging.fill_of(index) == self.staging.nbytes:  # written already (the usual case): one copy, no slicing
            destination.copy_(source)
            done = self.staging.nbytes
        while done < self.staging.nbytes:
            self._wait(lambda: self.staging.fill_of(index) > done, "for the sender to finish writing the update")
            ready = self.staging.fill_of(index)
            destination[done:ready].copy_(source[done:ready])
            done = ready
        self.release()  # early: the sender may rewrite that buffer while this worker applies its copy
        return wire

    def release(self) -> None:
        if self._locked is not None:
            self.staging.unlock(self._locked)
            self._locked = None

    def acknowledge(self, version: int) -> None:
        self.staging.acknowledge(self.rank, self._taken, version)

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

    def _wait(self, ready: Callable[[], bool], what: Optional[str], timeout: Optional[float] = None) -> bool:
        """Poll ``ready`` (a memory read); on time out ``False``, or with ``what`` an error."""
        if poll_until(ready, self.timeout if timeout is None else timeout, self._aborted):
            return True
        if what is None:
            return False
        raise ChannelError(f"Timed out waiting {what} (worker rank {self.rank}, board {self.staging.board_path})")


REFUSED = -2
"""The version a worker acknowledges for an update it refused (its checksum did not match)."""

_NEVER = 2**62
"""The acknowledged sequence of a worker rank that does not read shared memory."""

_ACK = b"updated"


class SharedStaging:
    """Wire buffers in ``/dev/shm`` plus the board that publishes the newest one; both ends map the same files.

    The sender creates it (:meth:`create`) and names its files to the worker at connect; the worker maps them
    (:meth:`open`). Board rows are int64 pairs: row 0 = (sequence << 4 | buffer index, version) of the newest
    publication, row ``r`` = (sequence, version) that the worker of rank ``r`` last applied; after the rows, one
    *fill* word per buffer: how many of its bytes hold the version in its header. A buffer can be published
    while the sender still writes it (:meth:`begin_fill`, then :meth:`filled` after each chunk), so a worker
    copies behind the sender instead of after it. Each word is written in one aligned store (ordered after the
    bytes it describes on x86's total store order), and readers re-check what they read under the buffer's lock.
    """

    def __init__(self, schema: WeightSchema, buffers: list[TensorDictBase], board_path: str, owner: bool) -> None:
        self.schema = schema
        self.buffers = buffers
        self.board_path = board_path
        self._owner = owner
        # memoryviews of int64 words: indexing one costs ~50 ns, where numpy's machinery costs microseconds
        self._words = memoryview(_map_words(board_path, None).numpy())
        rows_end = len(self._words) - len(buffers)
        self._ack_sequences = self._words[2:rows_end:2]  # every worker row's sequence, as one strided view
        self._fills = self._words[rows_end:]
        self.nbytes = wire_nbytes(schema)
        self._files = [os.open(wire._fws_shm_path, os.O_RDONLY) for wire in buffers]
        self._headers = [header_words(wire) for wire in buffers]
        self._publish_lock = threading.Lock()
        self._published_at = [0] * len(buffers)  # sender side: the sequence each buffer was last published at
        self._write_locked: set[int] = set()

    @classmethod
    def create(cls, schema: WeightSchema, buffers: int, ranks: int, run_id: Optional[str] = None) -> "SharedStaging":
        """``buffers`` staging buffers and a board for worker ranks ``1..ranks``, new files of this process."""
        run_id = run_id or new_run_id()
        wires = [SharedWireBuffer.create(schema, run_id, index) for index in range(buffers)]
        board_path = os.path.join(shm_dir(), f"{_SHM_PREFIX}{run_id}-board")
        words = _map_words(board_path, 2 * (ranks + 1) + buffers)
        words.fill_(-1)
        words[0] = 0  # sequence 0: nothing published yet
        words[2 * (ranks + 1) :] = wire_nbytes(schema)  # every buffer is whole until a write begins
        return cls(schema, wires, board_path, owner=True)

    @classmethod
    def open(cls, schema: WeightSchema, paths: list[str], board_path: str) -> "SharedStaging":
        return cls(schema, [SharedWireBuffer.open(path, schema) for path in paths], board_path, owner=False)

    @property
    def paths(self) -> list[str]:
        return [wire._fws_shm_path for wire in self.buffers]

    def index_of(self, wire: TensorDictBase) -> int:
        for index, staged in enumerate(self.buffers):
            if staged is wire:
                return index
        raise ChannelError("the shared-memory channel sends only its own staging buffers")

    def claim_for_write(self, index: int, hold: bool = True) -> bool:
        """Whether the sender may rewrite buffer ``index`` now, without waiting; if so, :meth:`end_write` after.

        No lock is needed when every worker has applied something published after this buffer last was: none
        is reading it, and none will (a worker only takes publications newer than what it applied). Otherwise
        an exclusive lock tells whether a worker's copy is still under way. ``hold=False`` lets go of that lock
        at once, which is safe when a newer publication than this buffer's is out: a worker that locks it from
        then on finds it is not the newest (or is the sender's new publication of it) and moves on.
        """
        if min(self._ack_sequences, default=_NEVER) >= self._published_at[index]:
            return True
        if not self.try_lock(index):
            return False
        if hold:
            self._write_locked.add(index)
        else:
            self.unlock(index)
        return True

    def is_newest(self, index: int) -> bool:
        """Whether buffer ``index`` holds the newest publication (sender side)."""
        return self._published_at[index] == self._words[0] >> 4 > 0

    def begin_fill(self, index: int) -> None:
        """Buffer ``index`` is about to be rewritten: none of its bytes hold the coming version yet."""
        self._fills[index] = 0

    def filled(self, index: int, nbytes: int) -> None:
        """The first ``nbytes`` bytes of buffer ``index`` hold the version in its header."""
        self._fills[index] = nbytes

    def fill_of(self, index: int) -> int:
        return self._fills[index]

    def end_write(self, index: int) -> None:
        if index in self._write_locked:
            self._write_locked.discard(index)
            self.unlock(index)

    def try_lock(self, index: int, shared: bool = False) -> bool:
        """Lock a buffer without waiting: exclusively to write it, shared to read it."""
        try:
            fcntl.flock(self._files[index], (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def unlock(self, index: int) -> None:
        fcntl.flock(self._files[index], fcntl.LOCK_UN)

    def version_in(self, index: int) -> int:
        return self._headers[index][0]

    def publish(self, index: int) -> int:
        """Make buffer ``index`` the newest publication unless a newer version is out; returns the sequence now."""
        with self._publish_lock:  # the trainer thread and link threads both publish
            words = self._words
            sequence, version = words[0] >> 4, self._headers[index][0]
            if sequence == 0 or version > words[1]:
                sequence += 1
                self._published_at[index] = sequence
                words[1] = version
                words[0] = sequence << 4 | index
            return sequence

    def published(self) -> tuple[int, int, int]:
        """(sequence, buffer index, version) of the newest publication; sequence 0: none yet."""
        words = self._words
        word, version = words[0], words[1]
        return word >> 4, word & 15, version

    def acked(self, rank: int) -> tuple[int, int]:
        """(sequence, version) that worker ``rank`` last applied; version :data:`REFUSED` for a refused update."""
        return self._words[2 * rank], self._words[2 * rank + 1]

    def ack_row(self, rank: int) -> memoryview:
        """The live (sequence, version) row of ``rank``: reading it costs no call to anyone."""
        return self._words[2 * rank : 2 * rank + 2]

    def acknowledge(self, rank: int, sequence: int, version: int) -> None:
        self._words[2 * rank + 1] = version  # version first: a reader that sees the new sequence sees its version
        self._words[2 * rank] = sequence

    def reset_acks(self, rank: int) -> None:
        self.acknowledge(rank, -1, -1)

    def exempt(self, rank: int) -> None:
        """Worker ``rank`` is served over a process group: it never reads these files."""
        self._words[2 * rank] = _NEVER

    def close(self) -> None:
        """Release the file handles; the creator also removes the files (mappings elsewhere stay valid)."""
        for fd in self._files:
            os.close(fd)
        self._files = []
        if self._owner:
            for wire in self.buffers:
                SharedWireBuffer.unlink(wire)
            if os.path.exists(self.board_path):
                os.unlink(self.board_path)


def _map_words(path: str, count: Optional[int]) -> torch.Tensor:
    """int64 words of a shared file: a new file of ``count`` words, or the whole existing file."""
    if count is None:
        if not os.path.exists(path):
            raise ChannelError(f"shared-memory board {path} is missing; use transport='gloo'")
        count = os.path.getsize(path) // 8
    return torch.from_file(path, shared=True, size=count, dtype=torch.int64)


class SharedWireBuffer:
    """A wire buffer whose single storage is a file in ``/dev/shm``, mappable by any process on the host."""

    @staticmethod
    def create(schema: WeightSchema, run_id: str, index: int) -> TensorDictBase:
        sweep_stale_files()
        path = os.path.join(shm_dir(), f"{_SHM_PREFIX}{run_id}-{index}")
        if os.path.exists(path):
            os.unlink(path)
        return SharedWireBuffer._map(path, schema)

    @staticmethod
    def open(path: str, schema: WeightSchema) -> TensorDictBase:
        if not os.path.exists(path) or os.path.getsize(path) != wire_nbytes(schema):
            raise ChannelError(f"shared-memory file {path} is missing or has the wrong size; use transport='gloo'")
        return SharedWireBuffer._map(path, schema)

    @staticmethod
    def unlink(wire: TensorDictBase) -> None:
        path = getattr(wire, "_fws_shm_path", None)
        if path and os.path.exists(path):
            os.unlink(path)

    @staticmethod
    def _map(path: str, schema: WeightSchema) -> TensorDictBase:
        wire = wire_views(schema, torch.from_file(path, shared=True, size=wire_nbytes(schema), dtype=torch.uint8))
        wire._fws_shm_path = path
        return wire


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


def host_id() -> str:
    """Same value for two processes iff they can share ``/dev/shm`` files (same host, same boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


_SHM_PREFIX = "fabric_weightsync-"


def new_run_id() -> str:
    """Unique per run, led by the creating pid so that files of a process that died can be found."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


@functools.lru_cache(maxsize=None)
def sweep_stale_files() -> None:
    """Remove (once per process) shared-memory files whose creating process is gone.

    A trainer killed by SIGKILL or the OOM killer cannot unlink its staging files, and ``/dev/shm`` is RAM: the
    next run on the host reclaims them. Mappings that workers still hold stay valid after the unlink.
    """
    for name in os.listdir(shm_dir()):
        pid = name[len(_SHM_PREFIX) :].split("-", 1)[0] if name.startswith(_SHM_PREFIX) else ""
        if pid.isdigit() and not _process_exists(int(pid)):
            try:
                os.unlink(os.path.join(shm_dir(), name))
            except OSError:  # another process swept it first
                pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def new_pair_group(store: dist.Store, name: str, group_rank: int, backend: str, timeout: float) -> dist.ProcessGroup:
    """A standalone two-rank process group on ``store``: outside the default group and the trainers' world."""
    prefixed = dist.PrefixStore(name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, group_rank, 2, timedelta(seconds=timeout))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(prefixed, group_rank, 2, options)
    raise ValueError(f"Unsupported backend {backend!r}: use 'gloo' or 'nccl'")

