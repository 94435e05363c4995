"""The control protocol: every store key, every word written to one, and the one way this library polls.

Training rank 0's control store (:mod:`~fabric_weightsync.control`) carries small keys only; weights and
experience travel on the data planes. Worker ``i`` has transport rank ``r = i + 1`` (TorchRL's numbering) and the
keys of :func:`worker_keys`.
"""

import logging
import time
from datetime import timedelta
from typing import Callable, NamedTuple, Optional

import torch.distributed as dist

from fabric_weightsync.auth import ControlStore

log = logging.getLogger(__name__)

BOOTSTRAP_KEY = "fabric_weightsync/control"
"""In the rendezvous store on ``MASTER_PORT``: ``host:port`` of the control store."""
STOP_KEY = "fws/stop"
"""Set once training ended: workers finish and exit."""
ENDED_KEY = "fabric_weightsync/ended"
"""In the rendezvous store: training rank 0 has shut down, so a worker that starts now has nothing to join."""
LATEST_KEY = "fws/latest"
"""The newest version training rank 0 has staged, kept while a worker served over a group holds an unanswered update
(a node sender's is :func:`latest_key` of its node)."""
MESSAGES_KEY = "fws/messages"
"""Training rank 0's messages to the workers: one JSON object of every value published, rewritten whole by each publish
(see :mod:`~fabric_weightsync.messages`)."""

INSTRUCTION = b"update_weights"
"""An update waits for the worker (group channel, receive not armed)."""
READY = b"1"
"""The worker posted its receive."""
ACK = b"updated"
ACK_ARMED = b"updated, armed"
"""Applied, and the receive of the next update is already posted: send it without an instruction."""
SUPERSEDED = b"superseded, armed"
"""Dropped as superseded; the receive is posted again and waits for the newest version."""
REFUSED = b"checksum mismatch"
"""Not applied: its checksum did not match."""
ABORT = b"abort"
"""Written by the sender to wake its own thread blocked on a worker's key."""

ACK_WORDS = (ACK, ACK_ARMED, SUPERSEDED, REFUSED)

UPDATE_TAG = 0
INITIAL_TAG = 1
"""Message tags on a weight group: an update, and the initial weights sent at connect."""
EXPERIENCE_TAG = 0

ACCEPTED = b"1"
"""A training rank's answer to a worker's experience schema; anything else is why it refused it."""
"""Message tag of an experience batch on its pair group."""
END_GRACE_S = 5.0
"""Seconds either end of the experience path waits for the stop flag (or an exit report) after its connection
dropped, before calling it a failure."""

MEMORY_POLL_S = 0.001
"""Longest pause between two looks at memory (an armed receive, the shared-memory board)."""
STORE_POLL_S = 0.002
"""Longest pause between two looks at a store key that is about to appear."""
SLOW_POLL_S = 0.05
"""Longest pause between two looks at something that takes its time (a worker starting, a stop flag)."""
FIRST_PAUSE_S = 0.00005
"""The first pause of every poll: what is awaited is often under way already."""


class StoreTimeout(RuntimeError):
    """A store key did not appear in time."""


class TrainingEnded(RuntimeError):
    """Training was over before this worker could join it: nothing to do, and nothing failed."""


class Aborted(RuntimeError):
    """A wait was given up because its transport was closed from another thread."""


class WorkerKeys(NamedTuple):
    """The control-store keys of one worker (transport rank ``r``)."""

    instruction: str
    ready: str
    ack: str
    hello: str
    verdict: str
    heartbeat: str
    error: str
    exit: str
    evicted: str


def worker_keys(rank: int) -> WorkerKeys:
    """The keys of the worker of transport rank ``rank`` (TorchRL's ``NODE_{rank}_in`` / ``_out`` among them)."""
    return WorkerKeys(*(f"NODE_{rank}_{name}" for name in ("in", "ready", "out", "schema", "verdict", "hb", "error", "exit", "evicted")))


def weights_group_name(rank: int, epoch: Optional[int] = None) -> str:
    """Store prefix of a worker's weight group; each connection (epoch) gets a fresh one."""
    return f"fws/pg/{rank}" if epoch is None else f"fws/pg/{rank}/{epoch}"


def experience_epoch_key(worker_id: int, rank: int) -> str:
    """Counts a worker's experience connections to training rank ``rank`` (written by the worker only): a
    replacement process gets fresh keys and a fresh group."""
    return f"fws/expctl/{worker_id}/{rank}/epoch"


def experience_key(worker_id: int, rank: int, epoch: int, name: str) -> str:
    """``schema`` (worker's batch layout), ``accept`` (receiver ready) or ``credit`` (a receive is posted)."""
    return f"fws/expctl/{worker_id}/{rank}/{epoch}/{name}"


def experience_group_name(worker_id: int, rank: int, epoch: int) -> str:
    return f"fws/exp/{worker_id}/{rank}/{epoch}"


def relay_rank(num_workers: int, node_rank: int) -> int:
    """The transport rank of node ``node_rank``'s relay, after every worker's."""
    return num_workers + node_rank


def latest_key(node_rank: int) -> str:
    """The newest version node ``node_rank``'s sender staged (see :data:`LATEST_KEY`)."""
    return LATEST_KEY if node_rank == 0 else f"{LATEST_KEY}/{node_rank}"


def node_report_key(node_rank: int) -> str:
    """The statuses of node ``node_rank``'s workers as its sender sees them (JSON, rewritten when they change)."""
    return f"fws/node/{node_rank}/workers"


def replica_key(version: int, node_rank: int) -> str:
    """Node ``node_rank``'s checksum of the weights it pushed as ``version`` (or :data:`SKIPPED`)."""
    return f"fws/replica/{version}/{node_rank}"


SKIPPED = b"skipped"
"""A node's answer for a version it did not checksum (its previous check was still running)."""


def worker_log_key(worker_id: int) -> str:
    """A worker's log mailbox: one chunk of metric records, written by the worker when empty, taken by rank 0."""
    return f"fws/log/{worker_id}"


def read_epoch(store: ControlStore, key: str) -> int:
    """The connection count under ``key`` (0 before the first); a value that is not a count (or not signed by this
    run) reads as 0, with a warning naming the key."""
    raw = store.read(key)
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        log.warning("fabric_weightsync: ignoring store key %r: %r is not a connection count", key, raw[:40])
        return 0


def poll_until(
    ready: Callable[[], bool],
    timeout: Optional[float],
    *,
    max_pause: float = MEMORY_POLL_S,
    aborted: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], object] = time.sleep,
) -> bool:
    """Look at ``ready`` with a pause that doubles up to ``max_pause`` until it holds (``True``) or ``timeout`` passes.

    Args:
        ready: the condition; called first without any pause or clock read.
        timeout: seconds; ``None`` waits for ever.
        max_pause: the longest pause between two looks.
        aborted: raises :class:`Aborted` when it turns true.
        sleep: how to pause (e.g. a condition's ``wait``, to be woken early).
    """
    deadline, pause = None, FIRST_PAUSE_S
    while not ready():
        now = time.monotonic()
        if deadline is None:  # read the clock only when the first look failed: most calls succeed at once
            deadline = float("inf") if timeout is None else now + timeout
        if aborted():
            raise Aborted("the wait was aborted")
        if now >= deadline:
            return False
        sleep(min(pause, deadline - now))
        pause = min(pause * 2, max_pause)
    return True


def await_key(store: ControlStore, key: str, what: str, timeout: Optional[float] = None) -> bytes:
    """The value of ``key`` once it is set; raises :class:`StoreTimeout` naming ``what`` and the key.

    Without ``timeout`` this is one round trip (a store ``get`` blocks up to the client's own timeout).
    """
    try:
        if timeout is not None:
            store.wait([key], timedelta(seconds=timeout))
        return store.get(key)
    except dist.DistStoreError as err:
        raise StoreTimeout(f"Timed out waiting {what} (store key {key!r}): {err}") from err
