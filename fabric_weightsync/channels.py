"""Data planes of a transport: how the bytes of one update get from the sender's wire buffer to the worker.

- :class:`GroupChannel`: one ``send`` of the wire buffer's single storage on a standalone two-rank process
  group (gloo, or nccl for CUDA tensors on distinct GPUs). Works across hosts.
- :class:`SharedMemoryChannel`: the sender's staging buffers are files in ``/dev/shm``; the sender names the
  file to read, the worker copies from it straight into its policy and acks, and the sender keeps that file
  untouched until the ack. One memcpy per worker, no network stack. Same host only.

Both are driven by :class:`~fabric_weightsync.transport.DistributedTransport`, which owns the store signalling.
"""

import functools
import os
import socket
import uuid
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from tensordict import TensorDictBase

from fabric_weightsync.weights import WEIGHTS_KEY, WeightSchema, wire_nbytes, wire_storage, wire_views


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


class GroupChannel:
    """Sends the wire storage as one message on a two-rank group (sender rank 0, worker rank 1)."""

    name = "group"

    def __init__(self, store: dist.Store, group_name: str, backend: str, timeout: float, group: Optional[dist.ProcessGroup] = None) -> None:
        self.store = store
        self.group_name = group_name
        self.backend = backend
        self.timeout = timeout
        self.group = group
        self._pending: Optional[dist.Work] = None

    def connect(self, group_rank: int) -> None:
        if self.group is None:
            self.group = new_pair_group(self.store, self.group_name, group_rank, self.backend, self.timeout)

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

    def receive(self, wire: TensorDictBase, tag: int) -> TensorDictBase:
        self._wait(self._group().recv([wire_storage(wire)], 0, tag), "receiving")
        return wire

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
    """The sender's wire buffers are ``/dev/shm`` files; an update is "read file F", then an ack.

    The slot key (``NODE_{rank}_slot``) names the file to read; the worker copies it into its buffer (or its
    policy) and acks, and only then may the sender overwrite that file, so the copy is always consistent even
    if the sender dies mid-way.
    """

    name = "shm"

    def __init__(self, store: dist.Store, slot_key: str, ack_key: str, timeout: float) -> None:
        self.store = store
        self.slot_key = slot_key
        self.ack_key = ack_key
        self.timeout = timeout
        self._mapped: dict[str, TensorDictBase] = {}
        self._posted = False

    def connect(self, group_rank: int) -> None:
        pass  # files are mapped on first use

    def post(self, wire: TensorDictBase, tag: int) -> None:
        path = getattr(wire, "_fws_shm_path", None)
        if path is None:
            raise ChannelError("the shared-memory channel needs a wire buffer made by SharedWireBuffer")
        self.store.set(self.slot_key, path.encode())
        self._posted = True

    def wait_sent(self) -> Optional[bytes]:
        """The buffer is free once the worker acked its copy: returns that ack."""
        if not self._posted:
            return None
        self._posted = False
        return await_key(self.store, self.ack_key, "for the worker to copy from shared memory")

    def receive(self, wire: TensorDictBase, tag: int) -> TensorDictBase:
        """The sender's (pinned) staging buffer to copy from; call :meth:`release` after the copy, before the ack."""
        path = await_key(self.store, self.slot_key, "for the sender to name a shared-memory slot").decode()
        if not path:  # the key was deleted between the wait and the read: the sender withdrew this update
            raise ChannelError("the sender withdrew the update before naming a shared-memory slot")
        if path not in self._mapped:
            self._mapped[path] = SharedWireBuffer.open(path, WeightSchema.of(wire[WEIGHTS_KEY]))
        return self._mapped[path]

    def release(self) -> None:
        # Before the ack: once acked, the sender may name the next slot, which must not be deleted.
        self.store.delete_key(self.slot_key)


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

