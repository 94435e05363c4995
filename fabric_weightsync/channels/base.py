"""What a data plane is: the :class:`Channel` protocol, what it knows of its transport, and the registry of backends.

A backend is one module that defines a class following :class:`Channel` and decorates it with :func:`register`;
the transport picks one by :func:`choose` (sender) or by the name in the sender's verdict (worker), so adding a
data plane touches no other module.
"""

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch.distributed as dist

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.weights import WeightSchema
from fabric_weightsync.wire import WireBuffer


class ChannelError(RuntimeError):
    """The data plane failed: peer gone, a transfer cut short, or a shared-memory file that cannot be mapped."""


class ChannelTimeout(ChannelError):
    """The peer did not do its part in time; it may still be alive but busy."""


@dataclass
class Endpoint:
    """What a channel knows of its transport: the peer's rank, the control store and the limits."""

    store: Optional[ControlStore]
    rank: Optional[int]
    timeout: float
    aborted: Callable[[], bool]
    """True once the transport was closed from another thread: every wait gives up."""
    backend: str = "gloo"
    group: Optional[dist.ProcessGroup] = None
    """A two-rank group the caller built (sender rank 0, worker rank 1)."""
    group_name: str = ""
    latest_key: Optional[str] = None
    """Store key holding the newest version the sender staged (see :data:`~fabric_weightsync.protocol.LATEST_KEY`)."""
    shared_staging: Any = None
    """Sender side: shared-memory staging several transports publish from."""


class Channel(Protocol):
    """One worker's data plane: how an update's bytes and the worker's answer travel between the two ends."""

    name: ClassVar[str]
    priority: ClassVar[int]
    """Higher is tried first by :func:`choose`."""
    carries_bytes: ClassVar[bool]
    """Whether a post moves the update's bytes to the worker (``False``: the worker reads them where they are)."""
    applied_row: Optional[memoryview]
    """Sender side: ``(sequence, version)`` the worker writes when it applies an update, if it reports that way
    (it then takes updates itself and no send is needed); ``None`` when answers come through :meth:`wait_ack`."""

    @classmethod
    def accepts(cls, preferred: str, hello: dict) -> bool:
        """Whether this plane serves a worker that said ``hello``, given the sender's preference."""

    @classmethod
    def for_sender(cls, endpoint: Endpoint, schema: WeightSchema) -> "Channel":
        """The sender's end, before the worker has been told about it."""

    @classmethod
    def for_receiver(cls, endpoint: Endpoint, verdict: dict, schema: WeightSchema) -> "Channel":
        """The worker's end, from what the sender's :meth:`verdict` said."""

    def verdict(self) -> dict:
        """What the worker needs to open its end (JSON-able; ``"channel"`` is this plane's name)."""

    def connect(self, group_rank: int) -> None:
        """Join the data plane (blocks until both ends did, for planes that pair up)."""

    def sender_buffer(self, wire: WireBuffer) -> WireBuffer:
        """The buffer a transport that owns ``wire`` stages into from now on (the plane may need it elsewhere)."""

    def sends_from(self, wire: WireBuffer) -> bool:
        """Whether ``wire`` can be posted as it is."""

    def stage(self, wire: WireBuffer, write: Callable[[], None]) -> None:
        """Run ``write`` (which rewrites ``wire``) when no reader can be looking at ``wire``."""

    def await_ready(self, timeout: Optional[float]) -> None:
        """Until the worker can take the next update; raises :class:`ChannelTimeout` (calling again resumes)."""

    def post(self, wire: WireBuffer, tag: int) -> None:
        """Start sending ``wire``."""

    def wait_sent(self) -> None:
        """Until the buffer of the last :meth:`post` may be rewritten."""

    def wait_ack(self, timeout: Optional[float]) -> bytes:
        """The worker's answer to the last update (a word of :data:`~fabric_weightsync.protocol.ACK_WORDS`)."""

    def tidy(self) -> None:
        """Sender side: housekeeping between updates, done when the caller has time rather than in the next send."""

    def take_notice(self, timeout: float) -> bool:
        """Worker side: whether an update is there to receive within ``timeout`` (0: look once)."""

    def receive(self, landing: WireBuffer, tag: int, land: bool) -> WireBuffer:
        """Worker side: the update, whole: in ``landing``, or (``land=False``) wherever the plane holds it."""

    def acknowledge(self, version: int, word: bytes, arm: Optional[WireBuffer]) -> None:
        """Worker side: answer the update just received; ``arm``: land the next one there, if the plane can."""

    def wake(self, store: ControlStore) -> None:
        """Make a thread blocked on this channel notice the abort (``store``: a client of the caller's own)."""

    def close(self) -> None:
        """Let go of the plane's resources."""


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a :class:`Channel` backend available under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def channel_named(name: str) -> type:
    if name not in _REGISTRY:
        raise ChannelError(f"unknown data plane {name!r}; this process knows {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def choose(preferred: str, hello: dict) -> type:
    """The plane for a worker that said ``hello``: the first by priority that accepts it."""
    for cls in sorted(_REGISTRY.values(), key=lambda c: -c.priority):
        if cls.accepts(preferred, hello):
            return cls
    raise ChannelError(f"no data plane serves channel={preferred!r} for this worker")


HOST_ENV = "FABRIC_WEIGHTSYNC_HOST"
"""Overrides :func:`host_id`: processes given different values never share memory, as if on different hosts (to
simulate a multi-node layout on one machine)."""


def host_id() -> str:
    """Same value for two processes iff they can share ``/dev/shm`` files (same host, same boot)."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"
