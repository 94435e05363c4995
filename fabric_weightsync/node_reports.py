"""Node senders report their workers to global rank 0, which so keeps every worker's status in one place.

With node fan-out, each node's local training rank 0 serves that node's workers and watches their heartbeats;
:class:`NodeReporter` writes their statuses to the control store whenever they change, and global rank 0's
:class:`NodeMirror` takes every other node's report into its own statuses, so its ``scheme.workers`` lists every
worker, its final delivery waits for all of them and its failure policy is the one that raises.
"""

import json
import logging
from typing import Sequence

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.health import Health, WorkerStatus
from fabric_weightsync.protocol import node_report_key

log = logging.getLogger(__name__)


class NodeReporter:
    """A node sender's report of its workers, written when it changed (called by its health monitor).

    Args:
        node_rank: the node served.
        statuses: the statuses of that node's workers.
    """

    def __init__(self, node_rank: int, statuses: Sequence[WorkerStatus]) -> None:
        self.key = node_report_key(node_rank)
        self.statuses = statuses
        self._written = b""

    def __call__(self, store: ControlStore) -> None:
        rows = [[s.worker_id, s.delivered_version, s.alive, s.error, s.connected] for s in self.statuses]
        report = json.dumps(rows).encode()
        if report != self._written:
            store.set(self.key, report)
            self._written = report


class NodeMirror:
    """Global rank 0's copy of the other nodes' reports (called by its health monitor).

    Args:
        health: rank 0's statuses of every worker.
        node_workers: the workers of each other node, by node rank.
    """

    def __init__(self, health: Health, node_workers: dict[int, Sequence[int]]) -> None:
        self.health = health
        self.node_workers = node_workers
        self._read: dict[int, bytes] = {}

    def __call__(self, store: ControlStore) -> None:
        for node, workers in self.node_workers.items():
            report = store.read(node_report_key(node))
            if report is None or report == self._read.get(node):
                continue
            self._read[node] = report
            for worker_id, delivered, alive, error, connected in self._rows(node, report, workers):
                self.health.mirror(worker_id, delivered, alive, error, connected)

    @staticmethod
    def _rows(node: int, report: bytes, workers: Sequence[int]) -> list:
        """The report's rows for ``workers``; a report that is not one is ignored, with a warning naming its node."""
        try:
            rows = json.loads(report)
            rows = [
                (int(w), int(d), bool(a), None if e is None else str(e), bool(c))
                for w, d, a, e, c in rows
                if int(w) in workers
            ]  # fmt: skip
        except (TypeError, ValueError) as err:
            log.warning("fabric_weightsync: ignoring node %d's report of its workers (%s): %r", node, err, report[:80])
            return []
        return rows
