"""A node's relay: where replicas cannot serve their node, global rank 0's weights cross to each node once.

With ``node_senders=False`` and several nodes, each node's local training rank 0 does not serve its own replica;
its relay connects to global rank 0 as one more receiver (transport rank
:func:`~fabric_weightsync.protocol.relay_rank`), takes every version into a copy of the module, and stages it in
this node's own :class:`~fabric_weightsync.scheme.WeightSyncScheme`, which serves the node's workers (through
shared memory on the node). Rank 0 then sends each version once per node, not once per remote worker.
"""

import logging
import threading
import time

from torch import nn

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.protocol import SLOW_POLL_S, STOP_KEY, TrainingEnded, poll_until, relay_rank, worker_keys
from fabric_weightsync.scheme import WeightSyncScheme
from fabric_weightsync.transport import DistributedTransport, TransportError
from fabric_weightsync.weights import SchemaMismatchError

log = logging.getLogger(__name__)

RECEIVE_SLICE_S = 0.1
"""The relay waits for an update in slices this long, looking for an eviction or the end in between."""


class Relay(threading.Thread):
    """Receives global rank 0's versions into ``module`` and stages each in ``scheme`` for this node's workers.

    Args:
        scheme: this node's sender (not started: the relay starts it with the first weights received).
        module: a copy of the synced module that the relay owns (updates are copied into it).
        control: the control plane.
        node_rank: this node.
        num_workers: workers in the run (the relay's rank comes after theirs).
        backend: the weight groups' backend.
        timeout: seconds for each blocking step of connecting and of a transfer.
    """

    def __init__(
        self, scheme: WeightSyncScheme, module: nn.Module, control: ControlPlane, node_rank: int, num_workers: int, backend: str, timeout: float
    ) -> None:
        super().__init__(name=f"fws-relay-{node_rank}", daemon=True)
        self.scheme = scheme
        self.module = module
        self.control = control
        self.node_rank = node_rank
        self.rank = relay_rank(num_workers, node_rank)
        self.backend = backend
        self.timeout = timeout
        self._stopped = threading.Event()

    def run(self) -> None:
        store = self.control.client()
        while not self._stopped.is_set():
            try:
                transport = self._connect(store)
            except TrainingEnded:
                return
            except (SchemaMismatchError, TransportError) as err:
                log.warning("fabric_weightsync: the relay of node %d could not connect (%s); trying again", self.node_rank, err)
                self._stopped.wait(RECEIVE_SLICE_S * 10)
                continue
            try:
                self._relay(transport, store)
            except TransportError as err:
                if not self._stopped.is_set():
                    log.warning("fabric_weightsync: the relay of node %d lost global rank 0 (%s); reconnecting", self.node_rank, err)
            finally:
                transport.close()

    def close(self, timeout: float) -> None:
        """Relay until global rank 0 says training ended (it has delivered the last version to every worker then),
        up to ``timeout`` seconds, then stop and close this node's sender."""
        store = self.control.client()
        try:
            poll_until(lambda: store.check([STOP_KEY]), timeout, max_pause=SLOW_POLL_S)
        except Exception:  # noqa: BLE001 - the store went with rank 0: nothing more will come
            pass
        self._stopped.set()
        self.join(timeout=max(RECEIVE_SLICE_S * 10, self.timeout))
        self.scheme.close()

    def _connect(self, store: ControlStore) -> DistributedTransport:
        """Join as global rank 0's receiver of ``rank``; the first connection starts this node's sender."""
        store.delete_key(worker_keys(self.rank).evicted)
        transport = DistributedTransport(
            weights_buffer=self.module, store=self.control.client(), rank=self.rank, backend=self.backend, timeout=self.timeout,
            flatten_weights=False,  # the scheme reads the module's own tensors: updates are copied into them
        )  # fmt: skip
        transport.setup_connection_and_weights_on_receiver(worker_idx=self.rank - 1, model=self.module)
        if self.scheme.staging is None:
            self.scheme.start(self.module, transport.version)
        else:
            self.scheme.push(transport.version)
        return transport

    def _relay(self, transport: DistributedTransport, store: ControlStore) -> None:
        """Stage every version received until stopped, or until rank 0 gives up on this connection (evicted)."""
        evicted = worker_keys(self.rank).evicted
        looked = time.monotonic()
        while not self._stopped.is_set():
            if transport.receive_weights(RECEIVE_SLICE_S, model=self.module) is not None:
                self.scheme.push(transport.version)
            elif time.monotonic() - looked > RECEIVE_SLICE_S:
                looked = time.monotonic()
                if store.check([evicted]):
                    raise TransportError(f"global rank 0 evicted the relay of node {self.node_rank}")
