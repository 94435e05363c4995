"""A worker's end of the experience path: each batch as one message to its training rank, with back-pressure.

Worker ``i`` sends to its training rank over a standalone two-rank gloo group of its own (the worker is rank 0),
built on the control store for each connection (*epoch*). The training rank posts a receive only when its queue
has room and then grants a *credit* through the store: a worker without one waits in :meth:`ExperienceSender.send`,
keeps applying weight updates meanwhile, and returns ``False`` once training stops.
"""

import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Union

import torch
from tensordict import TensorDict, TensorDictBase

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore
from fabric_weightsync.channels import new_pair_group
from fabric_weightsync.experience import ExperienceError, ExperienceSchema, ExperienceSchemaError, ExperienceTimeout
from fabric_weightsync.protocol import experience_epoch_key, experience_group_name, experience_key, poll_until, read_epoch

STOP_CHECK_S = 0.05
"""Seconds between looks at the stop flag (and weight polls) while a worker waits for its training rank."""


class ExperienceSender:
    """Sends one worker's batches to one training rank (made by ``WorkerContext.send``, which is what to call).

    Args:
        worker_id: the sending worker.
        target_rank: the training rank that receives its batches.
        store: a control-store client of its own (it polls while the worker waits).
        timeout: seconds for the group's operations.
        stop_requested: whether training has ended.
        idle: called while waiting for room (the worker takes weight updates meanwhile).
    """

    def __init__(
        self,
        worker_id: int,
        target_rank: int,
        store: ControlStore,
        timeout: float,
        stop_requested: Callable[[], bool],
        idle: Callable[[], object],
    ) -> None:
        self.worker_id = worker_id
        self.target_rank = target_rank
        self._store = store
        self._timeout = timeout
        self._stop_requested = stop_requested
        self._idle = idle
        self._schema = None
        self._wire = None
        self._group = None
        self._epoch = 0
        self._failed = None
        self._over = False
        self.sent = 0

    def send(self, batch: Union[TensorDictBase, Mapping[str, Any]], *, version: int, timeout: float) -> bool:
        """Send ``batch`` (collected with policy ``version``) as one message; block while the trainer has no room.

        A dict of tensors is sent as ``TensorDict(batch, batch_size=[])``.

        Returns ``True`` once the batch has been handed to the training rank, ``False`` when training stopped
        first (the batch is then dropped: end the worker loop). Raises :class:`ExperienceSchemaError` (nothing
        sent) when the batch's layout differs from this worker's first batch, and :class:`ExperienceTimeout` after
        ``timeout`` seconds without room.
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
                f" rank's buffers are laid out from that one): {self._schema.mismatch(schema)}"
            )
        deadline = time.monotonic() + timeout
        if self._group is None and not self._connect(schema, deadline, timeout):
            return False
        self._stage(batch, version)
        waiting_for = "to make room for a batch (its queue stays full: the trainer consumes slower than the workers produce)"
        credit = experience_key(self.worker_id, self._epoch, "credit")
        if not self._wait_for(lambda: self._store.delete_key(credit), deadline, timeout, waiting_for):
            return False
        try:
            self._group.send([self._wire.storage], 1, protocol.EXPERIENCE_TAG).wait(timedelta(seconds=max(timeout, 1.0)))
        except RuntimeError as err:
            # The receive was posted, so only a training rank that ended can fail this send.
            self._group = None
            if poll_until(self._stop_requested, protocol.END_GRACE_S, max_pause=protocol.SLOW_POLL_S):
                self._over = True  # the pair group is gone for good: later batches have nowhere to go
                return False
            self._failed = str(err)
            raise ExperienceError(f"Worker {self.worker_id}: sending a batch to training rank {self.target_rank} failed: {err}") from err
        self.sent += 1
        return True

    def _connect(self, schema: ExperienceSchema, deadline: float, timeout: float) -> bool:
        wid = self.worker_id
        self._schema, self._wire = schema, schema.wire()
        self._epoch = read_epoch(self._store, wid) + 1  # only this worker's process writes its count
        self._store.set(experience_epoch_key(wid), str(self._epoch))
        self._store.set(experience_key(wid, self._epoch, "schema"), schema.to_json().encode())
        what = (
            f"to open its experience stream (training rank {self.target_rank} must call fabric.strategy.experience()"
            f" to receive from worker {wid})"
        )
        accept = experience_key(wid, self._epoch, "accept")
        if not self._wait_for(lambda: self._store.check([accept]), deadline, timeout, what):
            return False
        answer = self._store.get(accept)
        if answer != protocol.ACCEPTED:
            raise ExperienceSchemaError(f"Worker {wid}: training rank {self.target_rank} refused its batches: {answer.decode(errors='replace')}")
        self._group = new_pair_group(self._store, experience_group_name(wid, self._epoch), 0, "gloo", self._timeout)
        return True

    def _stage(self, batch: TensorDictBase, version: int) -> None:
        with torch.no_grad():
            for target, path in zip(self._wire.tensors, self._schema.paths):
                target.copy_(batch.get(path))
        self._wire.set_word(0, int(version))
        self._wire.set_word(1, self.worker_id)

    def _wait_for(self, arrived: Callable[[], bool], deadline: float, timeout: float, what: str) -> bool:
        """Poll ``arrived`` until it holds (``True``) or training stops (``False``); raise at ``deadline``.

        Polls rather than blocking in the store so the worker can watch the stop flag and take weight updates.
        """
        outcome = []
        next_check = [time.monotonic() + STOP_CHECK_S]

        def done() -> bool:
            if arrived():
                outcome.append(True)
                return True
            now = time.monotonic()
            if now >= next_check[0]:
                next_check[0] = now + STOP_CHECK_S
                if self._stop_requested():
                    outcome.append(False)
                    return True
                self._idle()  # the trainer's final delivery at shutdown must not wait on a blocked worker
            return False

        if not poll_until(done, max(0.0, deadline - time.monotonic()), max_pause=protocol.STORE_POLL_S):
            raise ExperienceTimeout(
                f"Worker {self.worker_id}: waited {timeout:.1f}s for training rank {self.target_rank} {what};"
                " pass a larger timeout to ctx.send() if that is expected"
            )
        return outcome[0]
