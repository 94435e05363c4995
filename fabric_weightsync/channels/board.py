"""The shared-memory staging of the shm data plane: wire buffers in ``/dev/shm`` files and the *board* beside them.

The board is a third file of int64 words: the newest publication, one row per worker with what it last applied,
and one fill word per buffer. The sender writes publications and fills, each worker its own row; both map the
same files, so a worker's poll is a memory read and no update needs a store round trip.
"""

import contextlib
import fcntl
import functools
import os
import re
import stat
import threading
import uuid
from typing import Iterator, Optional

import torch

from fabric_weightsync.channels.base import ChannelError
from fabric_weightsync.weights import WeightSchema
from fabric_weightsync.wire import WireBuffer

REFUSED_VERSION = -2
"""The version a worker writes in its row for an update it refused (its checksum did not match)."""

_NEVER = 2**62
"""The applied sequence of a worker rank that does not read shared memory."""


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

    def __init__(self, schema: WeightSchema, buffers: list[WireBuffer], board_path: str, owner: bool) -> None:
        self.schema = schema
        self.buffers = buffers
        self.board_path = board_path
        self._owner = owner
        # memoryviews of int64 words: indexing one costs far less than a tensor or numpy op
        self._words = memoryview(_map_words(board_path, None).numpy())
        rows_end = len(self._words) - len(buffers)
        self._ack_sequences = self._words[2:rows_end:2]  # every worker row's sequence, as one strided view
        self._fills = self._words[rows_end:]
        self.nbytes = schema.layout.nbytes
        self._files = [os.open(wire.path, os.O_RDONLY) for wire in buffers]
        self._publish_lock = threading.Lock()
        self._published_at = [0] * len(buffers)  # sender side: the sequence each buffer was last published at
        self._write_locked: set[int] = set()

    @classmethod
    def create(cls, schema: WeightSchema, buffers: int, ranks: int) -> "SharedStaging":
        """``buffers`` staging buffers and a board for worker ranks ``1..ranks``, new files of this process."""
        run_id = new_run_id()
        wires = [create_shared_buffer(schema, run_id, index) for index in range(buffers)]
        board_path = os.path.join(shm_dir(), f"{SHM_PREFIX}{run_id}-board")
        words = _map_words(board_path, 2 * (ranks + 1) + buffers)
        words.fill_(-1)
        words[0] = 0  # sequence 0: nothing published yet
        words[2 * (ranks + 1) :] = schema.layout.nbytes  # every buffer is whole until a write begins
        return cls(schema, wires, board_path, owner=True)

    @classmethod
    def open(cls, schema: WeightSchema, paths: list[str], board_path: str) -> "SharedStaging":
        return cls(schema, [open_shared_buffer(path, schema) for path in paths], board_path, owner=False)

    @property
    def paths(self) -> list[str]:
        return [wire.path for wire in self.buffers]

    def index_of(self, wire: WireBuffer) -> int:
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
        return self.buffers[index].version

    def publish(self, index: int) -> int:
        """Make buffer ``index`` the newest publication unless a newer version is out; returns the sequence now."""
        with self._publish_lock:  # the trainer thread and link threads both publish
            words = self._words
            sequence, version = words[0] >> 4, self.buffers[index].version
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
        """(sequence, version) that worker ``rank`` last applied; version :data:`REFUSED_VERSION` for a refused update."""
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
                _unlink(wire.path)
            if os.path.exists(self.board_path):
                os.unlink(self.board_path)


def _map_words(path: str, count: Optional[int]) -> torch.Tensor:
    """int64 words of a shared file: a new file of ``count`` words, or the whole existing file (checked first)."""
    if count is not None:
        return torch.from_file(path, shared=True, size=count, dtype=torch.int64)
    with _own_file(path) as (fd, size):
        return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size // 8, dtype=torch.int64)


def create_shared_buffer(schema: WeightSchema, run_id: str, index: int) -> WireBuffer:
    """A new wire buffer whose storage is the file ``fabric_weightsync-<run_id>-<index>`` in ``/dev/shm``."""
    sweep_stale_files()
    path = os.path.join(shm_dir(), f"{SHM_PREFIX}{run_id}-{index}")
    _unlink(path)
    return _map(path, schema)


def open_shared_buffer(path: str, schema: WeightSchema) -> WireBuffer:
    """Map the sender's shared-memory wire buffer at ``path`` (checked to be this user's staging file first)."""
    nbytes = schema.layout.nbytes
    with _own_file(path) as (fd, size):
        if size != nbytes:
            raise ChannelError(f"shared-memory file {path} holds {size} bytes, not the policy's {nbytes}; use transport='gloo'")
        storage = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)  # the inode checked
    return WireBuffer(schema.layout, storage, path=path)


def _map(path: str, schema: WeightSchema) -> WireBuffer:
    nbytes = schema.layout.nbytes
    return WireBuffer(schema.layout, torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), path=path)


@contextlib.contextmanager
def _own_file(path: str) -> Iterator[tuple[int, int]]:
    """An open descriptor of ``path`` and its size, once it is shown to be a staging file of this user's alone.

    A sender names its files in a store value: only a file this run could have made is mapped.
    """
    if os.path.dirname(path) != shm_dir() or not _STAGING_NAME.fullmatch(os.path.basename(path)):
        raise ChannelError(f"refusing shared-memory file {path!r}: not a fabric_weightsync staging file")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as err:
        raise ChannelError(f"shared-memory file {path} cannot be opened ({err.strerror}); use transport='gloo'") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ChannelError(f"refusing shared-memory file {path}: it must be a regular file of this user's that nobody else can open")
        yield fd, info.st_size
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


SHM_PREFIX = "fabric_weightsync-"
_STAGING_NAME = re.compile(rf"{SHM_PREFIX}\d+-[0-9a-f]{{12}}-(\d+|board)")


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
        pid = name[len(SHM_PREFIX) :].split("-", 1)[0] if name.startswith(SHM_PREFIX) else ""
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
