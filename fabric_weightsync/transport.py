"""The per-worker weight transport: torch.distributed send/recv on a two-rank group, a TCPStore as control plane.

It keeps the public API and store keys of TorchRL's ``torchrl.weight_update.DistributedTransport`` and changes
what a user would want changed:

- one message per update: both ends hold a consolidated wire buffer (see :mod:`fabric_weightsync.weights`)
  and the update travels as its single storage, whatever the number of tensors;
- versioned: the version rides inside that message, so data and version can never disagree;
- the receiver asks before the sender sends (``NODE_{rank}_ready``), so the sender decides *what* to send
  only once the worker is ready to take it: a busy worker never pins a stale buffer (latest version wins);
- a schema check (names, shapes, dtypes) before any byte of weights moves;
- every blocking call has a timeout, and a failed transfer is never applied.

Store keys for the worker of rank ``r`` (1-indexed, the trainer is rank 0 of the pair):
``NODE_{r}_in`` = ``update_weights`` (instruction), ``NODE_{r}_ready`` (receive posted), ``NODE_{r}_out`` =
``updated`` (ack), ``NODE_{r}_schema`` / ``NODE_{r}_verdict`` (connect-time schema check).
"""

import time
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from tensordict import TensorDictBase
from torch import nn

from fabric_weightsync.weights import (
    VERSION_KEY,
    WEIGHTS_KEY,
    SchemaMismatchError,
    WeightSchema,
    WeightStrategy,
    make_wire_buffer,
    wire_storage,
)

DEFAULT_TIMEOUT = 60.0
"""Seconds any single blocking step (connect, transfer, ack, store wait) may take before it raises."""

_UPDATE_TAG = 0
_INITIAL_TAG = 1
_INSTRUCTION = b"update_weights"
_ACK = b"updated"
_ABORT = b"abort"
_OK = b"ok"


class TransportError(RuntimeError):
    """A transfer did not complete: the peer died, timed out or the transport was aborted."""


class TransportAborted(TransportError):
    """The transport was closed from another thread while it waited for its peer."""


class TransportTimeout(TransportError):
    """A store wait ran out of time: the peer may still be alive but busy."""


class DistributedTransport:
    """torch.distributed transport for ONE inference worker, TorchRL-compatible.

    The sender (training rank 0) and the worker form their own two-rank process group (the sender is rank 0,
    the worker rank 1), built on ``store`` unless ``group`` is given, so neither the trainers' DDP world nor
    ``torch.distributed``'s default group is involved.

    Args:
        weights_buffer: the weights layout: a module, a ``TensorDict`` of weights or a wire buffer made by
            :func:`~fabric_weightsync.weights.make_wire_buffer`. The transport keeps a consolidated wire
            buffer of it (the given one when it already is one): the sender's staging area or the receiver's
            landing area.
        store: the control-plane store. Give each transport its own client: a store client serialises its
            calls, and the transport waits on the store.
        rank: the worker's rank, 1-indexed as in TorchRL (``worker_idx + 1``); names the store keys.
        sync: with ``False``, :meth:`send_weights` returns once the send is posted; :meth:`wait_ack` finishes it.
        group: an existing two-rank process group to use instead of building one.
        backend: ``"gloo"`` (CPU, any host) or ``"nccl"`` (CUDA tensors on distinct GPUs).
        timeout: seconds any single blocking step may take (default :data:`DEFAULT_TIMEOUT`).
        group_name: store prefix of the group; a rejoining worker uses a new one.
    """

    def __init__(
        self,
        *,
        weights_buffer: Union[TensorDictBase, nn.Module, dict],
        store: Optional[dist.Store] = None,
        rank: Optional[int] = None,
        sync: bool = True,
        group: Optional[dist.ProcessGroup] = None,
        backend: str = "gloo",
        timeout: float = DEFAULT_TIMEOUT,
        group_name: Optional[str] = None,
    ) -> None:
        self._store = store
        self._rank = rank
        self._sync = sync
        self._group = group
        self._backend = backend
        self._timeout = float(timeout)
        self._group_name = group_name or f"fws/pg/{rank}"
        self._wire = _as_wire_buffer(weights_buffer)
        self._schema = WeightSchema.of(self._wire[WEIGHTS_KEY])
        self._pending: Optional[dist.Work] = None
        self._ack_pending = False
        self._version = 0

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> Optional[int]:
        return self._rank

    @property
    def schema(self) -> WeightSchema:
        return self._schema

    @property
    def wire_buffer(self) -> TensorDictBase:
        """The consolidated ``{weights, version}`` buffer this transport sends from or receives into."""
        return self._wire

    @property
    def version(self) -> int:
        """The version last sent (sender) or received (receiver)."""
        return self._version

    # ------------------------------------------------------------------ sender side
    def send_weights(self, weights: Any, *, version: Optional[int] = None) -> None:
        """Signal the worker through the store, send the weights as one message and wait for its ack."""
        self.send_weights_async(weights, version=version)
        self.wait_ack()

    def send_weights_async(self, weights: Any, *, version: Optional[int] = None) -> None:
        """Like :meth:`send_weights` without waiting for the ack; call :meth:`wait_ack` (after other workers).

        ``weights`` may be a module, a ``TensorDict`` or a wire buffer of the same schema; anything but a wire
        buffer is first copied into the transport's own one. ``version`` defaults to the last one plus one.
        """
        if self._store is None or self._rank is None:
            return
        wire = self._stage(weights, self._version + 1 if version is None else version)
        self.instruct()
        self.wait_ready()
        self.post_send(wire)
        if self._sync:
            self.wait_sent()

    def instruct(self) -> None:
        """Set the worker's instruction key: an update is waiting for it."""
        self._store.set(self._key("in"), _INSTRUCTION)

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the worker has posted its receive (or :meth:`abort` is called from another thread)."""
        value = self._wait_key("ready", self._timeout if timeout is None else timeout, "for the worker to post its receive")
        self._store.delete_key(self._key("ready"))
        if value == _ABORT:
            raise TransportAborted(f"transport to worker rank {self._rank} was aborted")

    def post_send(self, wire: TensorDictBase) -> None:
        """Post the send of one wire buffer (already staged) on the group; :meth:`wait_ack` completes it."""
        self._pending = self._group_or_raise().send([wire_storage(wire)], 1, _UPDATE_TAG)
        self._ack_pending = True
        self._version = int(wire[VERSION_KEY])

    def wait_sent(self) -> None:
        """Wait until the posted send has left the wire buffer, which may then be overwritten."""
        if self._pending is not None:
            work, self._pending = self._pending, None
            self._wait_work(work, "sending an update")

    def wait_ack(self, timeout: Optional[float] = None) -> None:
        """Wait until the posted send completed and the worker acknowledged (``NODE_{rank}_out`` = ``updated``)."""
        if self._store is None or self._rank is None or not self._ack_pending:
            return
        self.wait_sent()
        status = self._wait_key("out", self._timeout if timeout is None else timeout, "for the worker's ack")
        self._store.delete_key(self._key("out"))
        self._ack_pending = False
        if status != _ACK:
            raise TransportError(f"worker rank {self._rank} answered {status!r} instead of {_ACK!r}")

    def send_initial_weights(self, weights: Any) -> None:
        """Send version 0 directly on the group, without store signalling (the worker is blocked in connect)."""
        wire = self._stage(weights, 0)
        self._wait_work(self._group_or_raise().send([wire_storage(wire)], 1, _INITIAL_TAG), "sending the initial weights")
        self._version = 0

    def receiver_connected(self) -> bool:
        """Whether the worker has published its schema, i.e. called its side of the connection setup."""
        return self._store.check([self._key("schema")])

    def setup_connection_and_weights_on_sender(self, weights: Any = None) -> None:
        """Check the worker's schema, join the group and send it the initial weights.

        Blocks until the worker connects (up to the timeout). Raises :class:`SchemaMismatchError` naming the
        offending keys, after telling the worker the same, when the two layouts differ.
        """
        theirs = WeightSchema.from_json(self._wait_key("schema", self._timeout, "for the worker to connect"))
        problem = self._schema.mismatch(theirs)
        self._store.set(self._key("verdict"), _OK if problem is None else problem.encode())
        if problem:
            raise SchemaMismatchError(f"Worker rank {self._rank} has a different policy: {problem}")
        self._connect_group(group_rank=0)
        self.send_initial_weights(self._wire if weights is None else weights)

    # ------------------------------------------------------------------ receiver side
    def receive_weights(
        self,
        timeout: Optional[float] = None,
        *,
        weights: Any = None,
        model: Any = None,
        strategy: Optional[WeightStrategy] = None,
    ) -> Optional[TensorDictBase]:
        """Wait up to ``timeout`` seconds for an update; receive it, apply it to ``model`` and ack.

        Returns the received weights (``weights`` when given, filled in) or ``None`` when no update was
        instructed within ``timeout`` (``0`` polls once; ``None`` waits the transport's timeout). The update is
        applied only once it has fully arrived: a transfer cut short raises :class:`TransportError` and leaves
        ``model`` untouched.
        """
        if not self.take_instruction(self._timeout if timeout is None else timeout):
            return None
        self._store.set(self._key("ready"), b"1")
        self._wait_work(self._group_or_raise().recv([wire_storage(self._wire)], 0, _UPDATE_TAG), "receiving an update")
        received = self._deliver(weights, model, strategy)
        self._store.set(self._key("out"), _ACK)
        return received

    def take_instruction(self, timeout: float = 0.0) -> bool:
        """Consume a pending ``update_weights`` instruction, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        pause = 0.0002
        while not self._store.delete_key(self._key("in")):
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        return True

    def receive_initial_weights(self) -> TensorDictBase:
        """Receive version 0 directly on the group (the counterpart of :meth:`send_initial_weights`)."""
        self._wait_work(self._group_or_raise().recv([wire_storage(self._wire)], 0, _INITIAL_TAG), "receiving the initial weights")
        self._version = int(self._wire[VERSION_KEY])
        return self._wire[WEIGHTS_KEY]

    def setup_connection_and_weights_on_receiver(
        self,
        *,
        worker_idx: int,
        weights: Any = None,
        model: Any = None,
        strategy: Optional[WeightStrategy] = None,
    ) -> TensorDictBase:
        """Publish this worker's schema, join the group, receive the initial weights and apply them to ``model``."""
        if self._rank is None:
            self._rank = worker_idx + 1
        self._store.set(self._key("schema"), self._schema.to_json().encode())
        verdict = self._wait_key("verdict", self._timeout, "for the trainer to check this worker's schema")
        self._store.delete_key(self._key("verdict"))
        if verdict != _OK:
            raise SchemaMismatchError(f"Worker {worker_idx} (rank {self._rank}) policy differs from the trainer's: {verdict.decode()}")
        self._connect_group(group_rank=1)
        self.receive_initial_weights()
        return self._deliver(weights, model, strategy)

    # ------------------------------------------------------------------ lifecycle
    def abort(self) -> None:
        """Wake a thread blocked in :meth:`wait_ready` (from any thread, through its own store client)."""
        self._store.set(self._key("ready"), _ABORT)

    def close(self) -> None:
        """Drop the group and the keys this transport owns in the store."""
        for name in ("in", "ready", "out", "schema", "verdict"):
            try:
                self._store.delete_key(self._key(name))
            except Exception:  # the store may already be gone at shutdown
                pass
        self._group = None

    # ------------------------------------------------------------------ helpers
    def _key(self, name: str) -> str:
        return f"NODE_{self._rank}_{name}"

    def _stage(self, weights: Any, version: int) -> TensorDictBase:
        wire = weights if _is_wire(weights) else self._wire
        if wire is not weights:
            WeightStrategy().apply_weights(wire[WEIGHTS_KEY], _extract(weights))
        wire[VERSION_KEY].fill_(version)
        return wire

    def _deliver(self, weights: Any, model: Any, strategy: Optional[WeightStrategy]) -> TensorDictBase:
        self._version = int(self._wire[VERSION_KEY])
        received = self._wire[WEIGHTS_KEY]
        strategy = strategy or WeightStrategy()
        if weights is not None:
            strategy.apply_weights(weights, received)
            received = weights
        if model is not None:
            strategy.apply_weights(model, received)
        return received

    def _wait_key(self, name: str, timeout: float, what: str) -> bytes:
        key = self._key(name)
        try:
            self._store.wait([key], timedelta(seconds=timeout))
        except dist.DistStoreError as err:
            raise TransportTimeout(f"Timed out after {timeout:.1f}s waiting {what} (store key {key!r}): {err}") from err
        return self._store.get(key)

    def _wait_work(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self._timeout))
        except RuntimeError as err:
            self._group = None  # a group whose transfer failed cannot be trusted again
            raise TransportError(f"Worker rank {self._rank}: {what} failed: {err}") from err

    def _connect_group(self, group_rank: int) -> None:
        if self._group is None:
            self._group = new_pair_group(self._store, self._group_name, group_rank, self._backend, self._timeout)

    def _group_or_raise(self) -> dist.ProcessGroup:
        if self._group is None:
            raise TransportError(f"Transport of worker rank {self._rank} is not connected (or a transfer failed)")
        return self._group


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


def _is_wire(weights: Any) -> bool:
    return (
        isinstance(weights, TensorDictBase)
        and weights.is_consolidated()
        and set(weights.keys()) == {WEIGHTS_KEY, VERSION_KEY}
    )


def _as_wire_buffer(weights: Any) -> TensorDictBase:
    return weights if _is_wire(weights) else make_wire_buffer(_extract(weights))


def _extract(weights: Any) -> Any:
    return weights if isinstance(weights, (TensorDictBase, dict)) else WeightStrategy().extract_weights(weights)
