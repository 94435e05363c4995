"""The replica check: node senders serve their own DDP replica of the weights, so now and then compare them.

Under DDP every training rank holds the same weights after each optimizer step, which is what lets each node's
sender serve its own replica. Code that changes the weights on one rank only, or a non-deterministic optimizer,
breaks that silently; with ``verify_replicas=N`` every node sender checksums every N-th version it pushed and
global rank 0 compares them, failing the run at its next push, naming the node, when they differ.
"""

import queue
import threading
from typing import Callable, Optional

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.protocol import SKIPPED, SLOW_POLL_S, poll_until, replica_key
from fabric_weightsync.staging import Staging


class ReplicaMismatchError(RuntimeError):
    """A node sender pushed weights that differ from global rank 0's for the same version."""


class ReplicaCheck(threading.Thread):
    """Checksums every ``every``-th version this node sender pushes, off the trainer thread; on global rank 0 also
    compares every other node's checksum of that version with its own.

    A due version that comes while the previous check still runs is skipped on that node (the trainer never
    waits), and a version is compared only where every node checked it.

    Args:
        staging: this node sender's staging (the checked buffer is pinned until its checksum is taken).
        open_store: opens a new client of the control store.
        node_rank: this sender's node.
        num_nodes: nodes in the run; global rank 0 (node 0) compares the others' checksums with its own.
        every: check every ``every``-th version.
        timeout: seconds global rank 0 waits for a node's checksum before it gives up on that version.
    """

    def __init__(self, staging: Staging, open_store: Callable[[], ControlStore], node_rank: int, num_nodes: int, every: int, timeout: float) -> None:
        super().__init__(name="fws-replica-check", daemon=True)
        self.staging = staging
        self.node_rank = node_rank
        self.num_nodes = num_nodes
        self.every = every
        self.timeout = timeout
        self.failure: Optional[ReplicaMismatchError] = None
        self.compared = 0
        """Versions whose checksums global rank 0 compared."""
        self._open_store = open_store
        self._due: "queue.SimpleQueue[Optional[tuple[int, Optional[int]]]]" = queue.SimpleQueue()
        self._busy = False
        self._stopping = False

    def pushed(self, version: int) -> None:
        """The trainer staged ``version`` (it is the newest): check it if it is due (costs a pin, no wait)."""
        if version % self.every:
            return
        index = None if self._busy else self.staging.pin_newest()
        self._busy = self._busy or index is not None
        self._due.put((version, index))

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def stop(self) -> None:
        self._stopping = True  # a comparison still waiting for a node gives up: the run is ending
        self._due.put(None)
        self.join(timeout=self.timeout)

    def run(self) -> None:
        store = self._open_store()
        while (item := self._due.get()) is not None:
            version, index = item
            checksum = SKIPPED
            if index is not None:
                try:
                    checksum = str(self.staging.buffers[index].compute_checksum()).encode()
                finally:
                    self.staging.unpin(index)
                    self._busy = False
            try:
                if self.node_rank == 0:
                    self._compare(store, version, checksum)
                else:
                    store.set(replica_key(version, self.node_rank), checksum)
            except Exception:  # the store is shutting down with the trainer
                return

    def _compare(self, store: ControlStore, version: int, own: bytes) -> None:
        for node in range(1, self.num_nodes):
            key = replica_key(version, node)
            if not poll_until(lambda: self._stopping or store.check([key]), self.timeout, max_pause=SLOW_POLL_S):
                continue  # that node is gone: training fails without this check
            theirs = store.read(key)
            if theirs is None:  # stopping, or a value not signed by this run
                continue
            store.delete_key(key)
            if SKIPPED in (own, theirs):
                continue
            self.compared += 1
            if theirs != own and self.failure is None:
                self.failure = ReplicaMismatchError(
                    f"The weights node {node}'s sender pushed as version {version} differ from global rank 0's (checksum"
                    f" {theirs.decode(errors='replace')} vs {own.decode()}): node {node}'s workers were served other weights"
                    " than the trainer's. Something changed the synced module on some training ranks only (a"
                    " non-deterministic optimizer, or code that runs on one rank); pass serve_replicas=False to relay global"
                    " rank 0's weights instead"
                )
