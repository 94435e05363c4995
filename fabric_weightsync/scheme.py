"""``WeightSyncScheme``: training rank 0's sender of one module's weights to every worker, never blocking the trainer.

The trainer thread only copies the weights into a free staging buffer (:mod:`~fabric_weightsync.staging`),
publishes it and, when a link waits for a newer version, rings the doorbell (:mod:`~fabric_weightsync.links`); it
never touches the network or the store. Worker health and the failure policy live in
:mod:`~fabric_weightsync.health`.
"""

import threading
import time
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

import fabric_weightsync.protocol as protocol
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.health import FailurePolicy, Health, WorkerStatus
from fabric_weightsync.links import Links
from fabric_weightsync.node_reports import NodeMirror, NodeReporter
from fabric_weightsync.protocol import poll_until
from fabric_weightsync.replicas import ReplicaCheck
from fabric_weightsync.staging import Staging
from fabric_weightsync.transport import DistributedTransport

FLUSH_POLL_S = 0.0005
"""How often :meth:`WeightSyncScheme.flush` looks at the acks at most: shared-memory workers write theirs on the
board, which notifies nobody."""

class TransportChoice(NamedTuple):
    """What a ``transport`` setting means for the scheme."""

    backend: str
    """Backend of the pair groups."""
    channel: str
    """The transports' channel preference."""
    shared_staging: bool
    """Whether workers on this host may read the staging buffers in place, so they go in ``/dev/shm``."""


TRANSPORTS = {
    "auto": TransportChoice("gloo", "auto", True),
    "shm": TransportChoice("gloo", "shm", True),
    "gloo": TransportChoice("gloo", "group", False),
    "nccl": TransportChoice("nccl", "group", False),
}


def split_transport(transport: str) -> TransportChoice:
    """What a ``transport`` setting means; ``ValueError`` naming the allowed ones for anything else."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}, got {transport!r}")
    return TRANSPORTS[transport]


class WeightSyncScheme:
    """Delivers the newest weights of one module to every worker (or every worker of one node), never blocking the
    trainer.

    Args:
        control: the control plane (store) the workers joined.
        num_workers: workers in the run; worker ``i`` uses transport rank ``i + 1``.
        transport: ``"auto"`` (shared memory for workers on this host, gloo for the others), ``"shm"``, ``"gloo"``
            or ``"nccl"`` (process groups only).
        timeout: seconds for each blocking step of a transfer (connect, send, ack).
        heartbeat_timeout: a worker whose heartbeat is older than this is declared dead.
        on_worker_failure: ``"raise"``: the next :meth:`push` raises :class:`WorkerFailedError` naming the worker;
            ``"continue"``: log it and keep serving the others.
        checksum: stamp each version with a CRC32 that workers verify before applying (never on the trainer thread).
        flatten_weights: move the module's weights into one storage laid out like the wire, so a push is one copy.
        served: the workers this scheme serves (default: all); with node senders, those of ``node_rank``.
        node_rank: the node whose workers it serves; a node other than 0 reports their statuses to global rank 0.
        mirrored: global rank 0 with node senders: every other node's workers, by node, whose statuses it takes from
            their senders' reports (see :mod:`~fabric_weightsync.node_reports`).
        relays: global rank 0 when node senders relay its weights: the nodes whose relay it serves, each with
            transport rank :func:`~fabric_weightsync.protocol.relay_rank` (see :mod:`~fabric_weightsync.relay`).
        verify_replicas: with node senders, checksum every N-th version pushed and compare the nodes' checksums on
            global rank 0 (see :mod:`~fabric_weightsync.replicas`).
        num_nodes: nodes in the run.
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
        served: Optional[Sequence[int]] = None,
        node_rank: int = 0,
        mirrored: Optional[dict[int, Sequence[int]]] = None,
        relays: Sequence[int] = (),
        verify_replicas: Optional[int] = None,
        num_nodes: int = 1,
    ) -> None:
        self.backend, self.channel, self._shared_staging = split_transport(transport)
        self.control = control
        self.timeout = timeout
        self.checksum = checksum
        self.flatten_weights = flatten_weights
        lock = threading.RLock()
        # Links sleep on a condition of their own over the same lock: an ack, which wakes flush(), would otherwise
        # wake every waiting link for nothing. A failure wakes both.
        self._acked, self._pushed = threading.Condition(lock), threading.Condition(lock)
        served = list(range(num_workers) if served is None else served)
        mirrored = mirrored or {}
        known = served + [w for workers in mirrored.values() for w in workers]
        conditions = (self._acked, self._pushed)
        self.health = Health(known, on_worker_failure, heartbeat_timeout, control.client, conditions, watched=served, relays=relays)
        if mirrored:
            self.health.on_look.append(NodeMirror(self.health, mirrored))
        if node_rank > 0:
            self.health.on_look.append(NodeReporter(node_rank, self.health.watched))
        self.node_rank = node_rank
        self._verify = (verify_replicas, num_nodes) if verify_replicas and num_nodes > 1 else None
        self.staging: Optional[Staging] = None
        self._links: Optional[Links] = None
        self._replicas: Optional[ReplicaCheck] = None

    @property
    def workers(self) -> list[WorkerStatus]:
        """The status of every worker this scheme serves or mirrors, with its ``delivered_version``."""
        return self.health.workers

    @property
    def relays(self) -> list[WorkerStatus]:
        """The status of every node relay this scheme serves."""
        return self.health.relays

    @property
    def bytes_sent(self) -> int:
        """Bytes of weights this process sent so far to its workers and relays (what crossed a connection, not
        shared memory)."""
        return sum(status.bytes_sent for status in self.health.served)

    @property
    def links(self) -> Optional[Links]:
        """The per-worker link threads (after :meth:`start`)."""
        return self._links

    @property
    def module(self) -> Optional[nn.Module]:
        return self.staging.module if self.staging is not None else None

    @property
    def latest_version(self) -> int:
        return self.staging.latest_version if self.staging is not None else -1

    def start(self, module: nn.Module, version: int = 0) -> None:
        """Stage ``module``'s current weights as ``version`` and start serving every worker."""
        if self.staging is not None:
            raise RuntimeError("WeightSyncScheme.start() was called twice")
        sources = list(module.parameters())
        # Staging lives where the data plane reads it: host memory (shared files when workers may read them there;
        # a GPU trainer pays one device-to-host copy per push), or the GPU for nccl.
        device = sources[0].device if self.backend == "nccl" and sources else torch.device("cpu")
        ranks = max(status.rank for status in self.health.served)
        self.staging = Staging(
            module, workers=ranks, shared=self._shared_staging, device=device, checksum=self.checksum,
            flatten=self.flatten_weights, pushed=self._pushed,
        )  # fmt: skip
        served = {status.rank for status in self.health.served}
        for rank in set(range(1, ranks + 1)) - served:  # board rows of other nodes' workers: nobody reads from here
            self.staging.exempt(rank)
        self.staging.start(version)
        self.health.start_monitor()
        latest_key = protocol.latest_key(self.node_rank)
        self._links = Links(self.staging, self.health, self.control.client, self._transport_for, self.timeout, latest_key)
        self._links.start()
        if self._verify is not None:
            every, num_nodes = self._verify
            self._replicas = ReplicaCheck(self.staging, self.control.client, self.node_rank, num_nodes, every, self.timeout)
            self._replicas.start()

    def push(self, version: int) -> bool:
        """Stage the module's weights as ``version`` for every worker; returns whether it was staged now.

        Costs one copy of the weights into a staging buffer no worker reads, and never waits on a worker. When both
        buffers are busy the version is remembered and staged by the next push or by :meth:`flush`. Raises
        :class:`~fabric_weightsync.health.WorkerFailedError` for a failed worker under ``on_worker_failure="raise"``.
        """
        self.raise_if_failed()
        staged = self.staging.stage(version, self._links.announce)
        if staged and self._replicas is not None:
            self._replicas.pushed(version)
        return staged

    def note(self, version: int) -> None:
        """Record that the module is now at ``version`` without staging it; :meth:`flush` will deliver it."""
        self.staging.note(version)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Stage any remembered version, then wait until every live worker has the newest one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        staged = lambda: self.staging.pending_version is None or self.push(self.staging.pending_version)  # noqa: E731
        poll_until(staged, max(0.0, deadline - time.monotonic()), max_pause=protocol.MEMORY_POLL_S)
        latest = self.staging.latest_version
        with self._acked:
            return poll_until(
                lambda: all(not w.alive or w.delivered_version >= latest for w in self.workers),
                max(0.0, deadline - time.monotonic()),
                max_pause=FLUSH_POLL_S,
                sleep=self._acked.wait,
            )

    def wait_until_ready(self, timeout: float) -> list[WorkerStatus]:
        """Wait until every worker holds the initial weights or is gone (failed, or finished), up to ``timeout``
        seconds; returns the workers that are neither (a failure is left to the failure policy, as after a push)."""
        unready = lambda: [w for w in self.workers if w.alive and w.delivered_version < 0]  # noqa: E731
        with self._acked:  # connects and failures notify it
            poll_until(lambda: not unready(), timeout, max_pause=protocol.SLOW_POLL_S, sleep=self._acked.wait)
            return unready()

    def raise_if_failed(self) -> None:
        """Raise a worker's failure (under ``on_worker_failure="raise"``) or a replica mismatch, once each."""
        self.health.raise_if_failed()
        if self._replicas is not None:
            self._replicas.raise_if_failed()

    @property
    def replicas_compared(self) -> int:
        """Versions whose checksums global rank 0 compared across the node senders so far."""
        return self._replicas.compared if self._replicas is not None else 0

    def report_late_failures(self) -> None:
        """After :meth:`close` and the workers' exit: fail workers whose error arrived after the monitor stopped."""
        self.health.report_late_failures()

    def close(self) -> None:
        """Stop every link and the monitor (call :meth:`flush` first for a final delivery)."""
        if self._links is not None:
            self._links.close()
        if self._replicas is not None:
            self._replicas.stop()
        self.health.stop_monitor()
        if self.staging is not None:
            self.staging.close()

    def _transport_for(self, status: WorkerStatus, epoch: int) -> DistributedTransport:
        return DistributedTransport(
            weights_buffer=self.staging.buffers[0],
            shared_staging=self.staging.shared,
            store=self.control.client(),
            rank=status.rank,
            backend=self.backend,
            channel=self.channel,
            timeout=self.timeout,
            group_name=protocol.weights_group_name(status.rank, epoch),
            latest_key=protocol.latest_key(self.node_rank),
        )
