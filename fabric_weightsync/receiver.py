"""``WeightReceiver``: a worker's end of the weights, which applies the trainer's newest version between rollouts."""

import logging
import threading
import time
from typing import Protocol

from torch import nn

from fabric_weightsync.control import ControlPlane
from fabric_weightsync.protocol import worker_keys
from fabric_weightsync.transport import DistributedTransport, TransportError
from fabric_weightsync.weights import WeightStrategy

log = logging.getLogger(__name__)

UPDATE_WAIT_SLICE_S = 0.1
"""``wait_for_update`` waits in slices this long, so it notices the end of training."""


class ReceiverContext(Protocol):
    """What a receiver needs of its worker (what :class:`~fabric_weightsync.worker.WorkerContext` is)."""

    worker_id: int
    control: ControlPlane
    backend: str
    timeout: float
    evicted: bool
    """Set once training rank 0 gave up on this worker; the receiver clears it when it reconnects."""

    @property
    def rank(self) -> int:
        """The worker's transport rank."""

    @property
    def stop_requested(self) -> bool:
        """Whether training ended."""

    def check_evicted(self) -> bool:
        """Whether rank 0 gave up on this worker, asking the store now."""


class WeightReceiver:
    """The collector-side callback: applies the trainer's newest weights to the local policy between rollouts.

    When nothing is pending, ``poll()`` costs a memory read: on shared memory (a worker on the trainer's host) and
    over gloo, where the receive of the next update is armed as soon as one is applied, so that it lands while
    the rollout runs (nccl: one store round trip). Updates are applied in the calling thread,
    all at once, only after they fully arrived: code that runs the policy in the same thread never sees it
    half-updated. ``version`` is the trainer's optimizer-step count of the applied weights and only grows.

    Safe to call from several threads: one receives and applies at a time; a ``poll()`` that finds another thread
    receiving returns ``False`` at once (that thread applies the update).
    """

    def __init__(self, policy: nn.Module, strategy: WeightStrategy, context: ReceiverContext, flatten_weights: bool = True) -> None:
        self._policy = policy
        self._strategy = strategy
        self._context = context
        self._flatten_weights = flatten_weights
        self._receiving = threading.Lock()  # two receives at once would post two receives into one landing buffer
        self._transport = self._connect()

    def _connect(self) -> DistributedTransport:
        context = self._context
        transport = DistributedTransport(
            weights_buffer=self._policy,
            store=context.control.client(),
            rank=context.rank,
            backend=context.backend,
            timeout=context.timeout,
            flatten_weights=self._flatten_weights,
        )
        transport.setup_connection_and_weights_on_receiver(worker_idx=context.worker_id, model=self._policy, strategy=self._strategy)
        return transport

    def _rejoin_if_evicted(self) -> None:
        """Rank 0 gave up on this worker (heartbeat too old, transfer timed out): reconnect with a full resync."""
        context = self._context
        if context.evicted:
            log.warning("fabric_weightsync: worker %d was evicted by the trainer; reconnecting", context.worker_id)
            context.control.store.delete_key(worker_keys(context.rank).evicted)
            context.evicted = False
            self._transport.close()
            self._transport = self._connect()

    @property
    def version(self) -> int:
        return self._transport.version

    def poll(self) -> bool:
        """Apply a pending update if there is one, without waiting; returns whether this call applied one."""
        if not self._receiving.acquire(blocking=False):
            return False  # another thread is receiving: it applies what is pending
        try:
            return self._receive(0.0)
        finally:
            self._receiving.release()

    def wait_for_update(self, timeout: float) -> bool:
        """Block until a newer version is applied (``True``), or ``timeout`` passes or training stops (``False``)."""
        deadline = time.monotonic() + timeout
        version = self.version
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._context.stop_requested:
                return False
            if not self._receiving.acquire(timeout=min(remaining, UPDATE_WAIT_SLICE_S)):
                continue
            try:
                if self.version > version or self._receive(min(remaining, UPDATE_WAIT_SLICE_S)):
                    return True  # applied here, or by another thread while this one waited for the lock
            finally:
                self._receiving.release()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the applied weights are ``version`` or newer (``True``); ``False`` once training ended first.

        The worker's half of an on-policy (lockstep) loop: collect with version ``v``, ``ctx.send`` the rollout, then
        ``wait_for_version(v + 1, timeout)`` for the trainer's next push (``fabric.strategy.push()``). Training
        rank 0 delivers its last version before it ends training, so ``False`` means no newer one is coming.

        Raises ``TimeoutError`` naming this worker and ``version`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.version < version:
            if self._context.stop_requested:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Worker {self._context.worker_id}: waited {timeout:g}s for policy version {version}, still at"
                    f" version {self.version}: the trainer pushes a version with fabric.strategy.push() (or"
                    " WeightSyncCallback); pass a larger timeout if an update takes longer"
                )
            self.wait_for_update(min(remaining, UPDATE_WAIT_SLICE_S))
        return True

    def _receive(self, timeout: float) -> bool:
        self._rejoin_if_evicted()
        try:
            return self._transport.receive_weights(timeout, model=self._policy, strategy=self._strategy) is not None
        except TransportError:
            # A worker resumed after an eviction can find its update withdrawn mid-receive: reconnect, don't die.
            if not self._context.check_evicted():
                raise
            self._rejoin_if_evicted()
            return False
