"""A worker's end of the experience path: each batch as one message to a training rank with room, with back-pressure.

Worker ``i`` sends to the training ranks of :class:`~fabric_weightsync.experience.ExperienceRoutes` (usually one).
To each it has a standalone two-rank gloo group of its own (the worker is rank 0), built on the control store for
each connection (*epoch*). A training rank posts a receive only when its queue has room and then grants a
*credit* through the store: a batch goes to a rank holding a credit (taking turns when several do), and a worker
without one waits in :meth:`ExperienceSender.send`, keeps applying weight updates meanwhile, and returns ``False``
once training stops.
"""

import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.channels import new_pair_group
from fabric_weightsync.experience import ExperienceError, ExperienceSchema, ExperienceSchemaError, ExperienceTimeout
from fabric_weightsync.protocol import experience_epoch_key, experience_group_name, experience_key, poll_until, read_epoch

STOP_CHECK_S = 0.05
"""Seconds between looks at the stop flag (and weight polls) while a worker waits for its training ranks."""


class _Connection:
    """One connection (epoch) of a worker to one training rank: keys, and the pair group once the rank accepted."""

    def __init__(self, worker_id: int, rank: int, epoch: int) -> None:
        self.rank = rank
        self.epoch = epoch
        self.accept = experience_key(worker_id, rank, epoch, "accept")
        self.credit = experience_key(worker_id, rank, epoch, "credit")
        self.group_name = experience_group_name(worker_id, rank, epoch)
        self.group: Optional[dist.ProcessGroup] = None


class ExperienceSender:
    """Sends one worker's batches to its training ranks (made by ``WorkerContext.send``, which is what to call).

    Args:
        worker_id: the sending worker.
        target_ranks: the training ranks that receive its batches; each batch goes to one of them that has room.
        store: a control-store client of its own (it polls while the worker waits).
        timeout: seconds for the groups' operations.
        stop_requested: whether training has ended.
        idle: called while waiting for room (the worker takes weight updates meanwhile).
    """

    def __init__(
        self,
        worker_id: int,
        target_ranks: list[int],
        store: ControlStore,
        timeout: float,
        stop_requested: Callable[[], bool],
        idle: Callable[[], object],
    ) -> None:
        self.worker_id = worker_id
        self.target_ranks = list(target_ranks)
        self._store = store
        self._timeout = timeout
        self._stop_requested = stop_requested
        self._idle = idle
        self._schema = None
        self._wire = None
        self._connections: list[_Connection] = []
        self._turn = 0  # where the next look for a credit starts, so that ranks with room take turns
        self._failed = None
        self._over = False
        self.sent = 0
        self.sent_to = {rank: 0 for rank in self.target_ranks}
        """Batches handed to each training rank."""

    def send(self, batch: Union[TensorDictBase, Mapping[str, Any]], *, version: int, timeout: float) -> bool:
        """Send ``batch`` (collected with policy ``version``) as one message to a training rank with room; block
        while none has room. A dict of tensors is sent as ``TensorDict(batch, batch_size=[])``.

        Returns ``True`` once the batch has been handed to a training rank, ``False`` when training stopped first
        (the batch is then dropped: end the worker loop). Raises :class:`ExperienceSchemaError` (nothing sent) when
        the batch's layout differs from this worker's first batch, or a training rank refused its size, and
        :class:`ExperienceTimeout` after ``timeout`` seconds without room.
        """
        if isinstance(batch, Mapping) and not isinstance(batch, TensorDictBase):
            batch = TensorDict(dict(batch), batch_size=[])
        if not isinstance(batch, TensorDictBase):
            raise TypeError(f"ctx.send() takes a TensorDict or a dict of tensors, got {type(batch).__name__}")
        if self._failed is not None:
            raise ExperienceError(f"Worker {self.worker_id}: the experience path failed earlier: {self._failed}")
        if self._over:
            return False
        schema = ExperienceSchema.of(batch)
        if self._schema is not None and schema != self._schema:
            raise ExperienceSchemaError(
                f"Worker {self.worker_id}: this experience batch differs from the first one it sent (the training"
                f" ranks' buffers are laid out from that one): {self._schema.mismatch(schema)}"
            )
        if not self._connections:
            self._publish(schema)
        self._stage(batch, version)
        target = self._wait_for_room(time.monotonic() + timeout, timeout)
        if target is None:
            return False
        try:
            target.group.send([self._wire.storage], 1, protocol.EXPERIENCE_TAG).wait(timedelta(seconds=max(timeout, 1.0)))
        except RuntimeError as err:
            # The receive was posted, so only a training rank that ended can fail this send.
            target.group = None
            if poll_until(self._stop_requested, protocol.END_GRACE_S, max_pause=protocol.SLOW_POLL_S):
                self._over = True  # the pair group is gone for good: later batches have nowhere to go
                return False
            self._failed = str(err)
            raise ExperienceError(f"Worker {self.worker_id}: sending a batch to training rank {target.rank} failed: {err}") from err
        self.sent += 1
        self.sent_to[target.rank] += 1
        return True

    def _publish(self, schema: ExperienceSchema) -> None:
        """Open a new connection to every target rank: count it (this worker is the key's only writer) and publish
        the schema that both ends lay their buffers out from."""
        self._schema, self._wire = schema, schema.wire()
        for rank in self.target_ranks:
            epoch_key = experience_epoch_key(self.worker_id, rank)
            epoch = read_epoch(self._store, epoch_key) + 1
            self._store.set(epoch_key, str(epoch).encode())
            self._store.set(experience_key(self.worker_id, rank, epoch, "schema"), schema.to_json().encode())
            self._connections.append(_Connection(self.worker_id, rank, epoch))

    def _stage(self, batch: TensorDictBase, version: int) -> None:
        with torch.no_grad():
            for target, path in zip(self._wire.tensors, self._schema.paths):
                target.copy_(batch.get(path))
        self._wire.set_word(0, int(version))
        self._wire.set_word(1, self.worker_id)

    def _take_credit(self) -> Optional[_Connection]:
        """A connection whose rank granted a credit (now consumed), looking from where the last look stopped;
        joins the group of a rank that accepted since."""
        count = len(self._connections)
        for step in range(count):
            connection = self._connections[(self._turn + step) % count]
            if connection.group is None:
                answer = self._store.read(connection.accept)
                if answer is None:
                    continue
                if answer != protocol.ACCEPTED:
                    raise ExperienceSchemaError(
                        f"Worker {self.worker_id}: training rank {connection.rank} refused its batches: {answer.decode(errors='replace')}"
                    )
                connection.group = new_pair_group(self._store, connection.group_name, 0, "gloo", self._timeout)
            # Only a credit the rank signed counts: a forged one would send into a receive nobody posted.
            if self._store.check([connection.credit]) and self._store.delete_key(connection.credit):
                self._turn = (self._turn + step + 1) % count
                return connection
        return None

    def _wait_for_room(self, deadline: float, timeout: float) -> Optional[_Connection]:
        """Poll for a credit until one is taken (its connection) or training stops (``None``); raise at ``deadline``.

        Polls rather than blocking in the store so the worker can watch the stop flag and take weight updates.
        """
        outcome: list[Optional[_Connection]] = []
        next_check = [time.monotonic() + STOP_CHECK_S]

        def done() -> bool:
            connection = self._take_credit()
            if connection is not None:
                outcome.append(connection)
                return True
            now = time.monotonic()
            if now >= next_check[0]:
                next_check[0] = now + STOP_CHECK_S
                if self._stop_requested():
                    outcome.append(None)
                    return True
                self._idle()  # the trainer's final delivery at shutdown must not wait on a blocked worker
            return False

        if not poll_until(done, max(0.0, deadline - time.monotonic()), max_pause=protocol.STORE_POLL_S):
            ranks = self.target_ranks
            who = f"training rank {ranks[0]}" if len(ranks) == 1 else f"training ranks {ranks}"
            if not any(connection.group is not None for connection in self._connections):
                what = (
                    f"to open its experience stream ({who} must call fabric.strategy.experience() to receive from"
                    f" worker {self.worker_id})"
                )
            else:
                what = "to make room for a batch (the queue stays full: the trainer consumes slower than the workers produce)"
            raise ExperienceTimeout(
                f"Worker {self.worker_id}: waited {timeout:.1f}s for {who} {what}; pass a larger timeout to ctx.send()"
                " if that is expected"
            )
        return outcome[0]
