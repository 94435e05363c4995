"""``DistributedTransport``: one worker's weight transport, with TorchRL's API, on top of a data-plane channel.

It keeps the public methods and store keys of TorchRL's ``torchrl.weight_update.DistributedTransport`` and
changes what a user would want changed:

- one message per update: both ends hold a :class:`~fabric_weightsync.wire.WireBuffer` of the same layout, and
  the update travels as its single storage, whatever the number of tensors; the version rides inside it;
- a schema check (names, shapes, dtypes) before any byte of weights moves, and the choice of data plane at
  connect (:mod:`~fabric_weightsync.channels`: shared memory for a worker on the sender's host, a process group
  otherwise);
- latest wins: given the sender's staging (:class:`StagedWeights`), a send picks the newest version only once the
  worker is ready to take it;
- every blocking call has a timeout, and a failed or refused transfer is never applied.

The library's own sender (:class:`~fabric_weightsync.scheme.WeightSyncScheme`) drives its workers through these
same methods.
"""

import json
from typing import Any, Callable, ContextManager, Literal, Optional, Protocol, TypeVar, Union

import torch
import torch.distributed as dist
from tensordict import TensorDictBase
from torch import nn

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore, as_control_store
from fabric_weightsync.channels import ChannelError, ChannelTimeout, Endpoint, channel_named, choose, host_id
from fabric_weightsync.flat import ModuleTargets
from fabric_weightsync.protocol import Aborted, StoreTimeout, TrainingEnded, await_key, poll_until, worker_keys
from fabric_weightsync.weights import SchemaMismatchError, WeightSchema, WeightStrategy, make_wire_buffer
from fabric_weightsync.wire import WireBuffer

DEFAULT_TIMEOUT = 60.0
"""Seconds any single blocking step (connect, transfer, ack, store wait) may take before it raises."""

ChannelChoice = Literal["group", "shm", "auto"]
T = TypeVar("T")


class TransportError(RuntimeError):
    """A transfer did not complete: the peer died, timed out or the transport was aborted."""


class TransportAborted(TransportError):
    """The transport was closed from another thread while it waited for its peer."""


class TransportTimeout(TransportError):
    """A wait ran out of time: the peer may still be alive but busy."""


class StagedWeights(Protocol):
    """A sender's staging that always holds the newest version (what :class:`~fabric_weightsync.staging.Staging` is)."""

    def pin_latest(self) -> ContextManager[WireBuffer]:
        """The newest staged buffer, kept from being rewritten while the context lasts."""


class DistributedTransport:
    """Weight transport for ONE inference worker, with the API of TorchRL's ``DistributedTransport``.

    Args:
        weights_buffer: the weights layout: a module, a ``TensorDict`` of weights or a
            :class:`~fabric_weightsync.wire.WireBuffer`. The transport keeps a wire buffer of it (the given one when
            it already is one): the sender's staging area or the receiver's landing area, in host memory (on the
            weights' GPU with ``backend="nccl"``). GPU policies are updated with one host-to-device copy.
        store: the control-plane store: a :class:`~fabric_weightsync.auth.ControlStore` (values signed with the run's
            secret, as the library's own clients are) or a bare ``dist.Store``. Give each transport its own client: a
            store client serialises its calls.
        rank: the worker's rank, 1-indexed as in TorchRL (``worker_idx + 1``); names the store keys.
        sync: with ``False``, :meth:`send_weights` returns once the send is posted; :meth:`wait_ack` finishes it.
        group: an existing two-rank process group (sender rank 0, worker rank 1) instead of one built on ``store``.
        backend: backend of the group it builds: ``"gloo"`` or ``"nccl"`` (CUDA tensors, distinct GPUs).
        channel: the sender's choice of data plane: ``"group"``, ``"shm"`` (same host only) or ``"auto"`` (shared
            memory when the worker is on this host). The worker follows the sender's choice.
        timeout: seconds any single blocking step may take.
        group_name: store prefix of the group; a rejoining worker uses a new one.
        checksum: stamp each staged update with a CRC32 that the receiver verifies before applying.
        shared_staging: sender side: shared-memory staging several transports publish from.
        latest_key: sender side: a store key holding the newest version staged, which an armed worker that was busy
            while an update landed checks before applying it (see :mod:`~fabric_weightsync.channels.group`).
        flatten_weights: receiver side, for a CPU ``model`` of plain tensors: move its weights into one wire-layout
            storage once, so an update is applied by swapping storage with the landing buffer instead of a copy.
            Off when ``weights_buffer`` is a wire buffer: it stays the landing area the caller reads.
    """

    def __init__(
        self,
        *,
        weights_buffer: Union[WireBuffer, TensorDictBase, nn.Module, dict],
        store: Union[ControlStore, dist.Store, None] = None,
        rank: Optional[int] = None,
        sync: bool = True,
        group: Optional[dist.ProcessGroup] = None,
        backend: str = "gloo",
        channel: ChannelChoice = "group",
        timeout: float = DEFAULT_TIMEOUT,
        group_name: Optional[str] = None,
        checksum: bool = False,
        shared_staging: Any = None,
        latest_key: Optional[str] = None,
        flatten_weights: bool = True,
    ) -> None:
        if channel not in ("group", "shm", "auto"):
            raise ValueError(f"channel must be 'group', 'shm' or 'auto', got {channel!r}")
        if store is not None:  # gets and waits without an explicit timeout use the client's: make it ours
            store = as_control_store(store, timeout)
        self._store = store
        self._rank = rank
        self._sync = sync
        self._timeout = float(timeout)
        self._preferred_channel = channel
        self._checksum = checksum
        self._wire = _as_wire_buffer(weights_buffer, backend)
        self._schema = WeightSchema.of(self._wire)
        self._endpoint = Endpoint(
            store, rank, self._timeout, lambda: self._aborted, backend, group,
            group_name or protocol.weights_group_name(rank), latest_key, shared_staging,
        )  # fmt: skip
        self._channel = channel_named("group")(self._endpoint)  # a pair group (given or built) until connect picks the plane
        self._ack_pending = False
        self._aborted = False
        self._closed = False
        # A wire buffer the caller gave us is theirs to read: every update lands there, and the policy never takes it.
        self._lands_always = self._wire is weights_buffer
        self._targets = ModuleTargets(flatten_weights and not self._lands_always)
        self._version = 0
        self.bytes_sent = 0
        """Bytes of weights this end sent to the worker (0 when the worker reads them in shared memory)."""

    @property
    def rank(self) -> Optional[int]:
        return self._rank

    @property
    def schema(self) -> WeightSchema:
        return self._schema

    @property
    def wire_buffer(self) -> WireBuffer:
        """The buffer this transport sends from or receives into."""
        return self._wire

    @property
    def channel(self) -> str:
        """The data plane in use (its registered name, decided at connect)."""
        return self._channel.name

    @property
    def applied_row(self) -> Optional[memoryview]:
        """Sender side: the ``(sequence, version)`` the worker writes itself on applying, if its plane reports so
        (it then takes updates by itself); ``None`` when its answers come through :meth:`wait_ack`."""
        return self._channel.applied_row

    @property
    def version(self) -> int:
        """The version last sent (sender) or received (receiver)."""
        return self._version

    # ------------------------------------------------------------------ sender side
    def send_weights(self, weights: Any, *, version: Optional[int] = None) -> None:
        """Send the weights as one message and wait for the worker's ack."""
        self.send_weights_async(weights, version=version)
        self.wait_ack()

    def send_weights_async(self, weights: Any, *, version: Optional[int] = None) -> None:
        """Like :meth:`send_weights` without waiting for the ack; call :meth:`wait_ack` (after other workers).

        ``weights``: a module, a ``TensorDict`` or a wire buffer of the same schema (anything but a wire buffer the
        channel can send is first copied into the transport's own one; ``version`` defaults to the last one plus
        one), or :class:`StagedWeights`: the newest staged buffer is sent as it is, chosen once the worker is ready.
        A :class:`TransportTimeout` while the worker is not ready yet leaves nothing sent: calling again resumes.
        """
        if self._store is None or self._rank is None:
            return
        self.wait_ack()  # a send still in flight reads the buffer that staging would rewrite
        pin_latest = getattr(weights, "pin_latest", None)  # StagedWeights; a Protocol isinstance costs every send
        if pin_latest is not None:
            self._call(lambda: self._channel.await_ready(None), "waiting for the worker to be ready")
            with pin_latest() as wire:
                self._post(wire, protocol.UPDATE_TAG)
                self._call(self._channel.wait_sent, "sending an update")
            return
        wire = self._stage(weights, self._version + 1 if version is None else version)
        self._call(lambda: self._channel.await_ready(None), "waiting for the worker to be ready")
        self._post(wire, protocol.UPDATE_TAG)
        if self._sync:
            self._call(self._channel.wait_sent, "sending an update")

    def wait_ack(self, timeout: Optional[float] = None) -> bool:
        """Wait until the last send completed and the worker answered; whether it applied the update.

        ``False``: the worker dropped it as superseded and waits for the newest, which the next send should carry.
        A :class:`TransportTimeout` leaves the answer pending: calling again keeps waiting.
        """
        if not self._ack_pending:
            return True
        self._call(self._channel.wait_sent, "sending an update")
        status = self._call(lambda: self._channel.wait_ack(timeout), "waiting for the worker's ack")
        self._ack_pending = False
        if self._aborted:
            raise TransportAborted(f"transport to worker rank {self._rank} was aborted")
        if status not in (protocol.ACK, protocol.ACK_ARMED, protocol.SUPERSEDED):
            raise TransportError(f"worker rank {self._rank} answered {status!r} instead of {protocol.ACK!r}")
        return status != protocol.SUPERSEDED

    def tidy(self) -> None:
        """Housekeeping between updates (clears the ack read last), for a caller with time on its hands."""
        self._channel.tidy()

    def send_initial_weights(self, weights: Any) -> None:
        """Send the first weights without an instruction (the worker is blocked in its connect)."""
        version = weights.version if isinstance(weights, WireBuffer) else 0
        self._post(self._stage(weights, version), protocol.INITIAL_TAG)
        self.wait_ack()  # the worker acks its initial weights too: the connection is then confirmed end to end

    def check_connection(self) -> bool:
        """Whether the worker has published its hello, i.e. called its side of the connection setup."""
        return self._store.check([self._keys.hello])

    def setup_connection_and_weights_on_sender(self, weights: Any = None) -> None:
        """Check the worker's schema, pick the data plane, connect, and send the initial weights.

        Blocks until the worker connects (up to the timeout). Raises :class:`SchemaMismatchError` naming the
        offending keys, after telling the worker the same, when the two layouts differ.
        """
        keys = self._keys
        hello = self._read_json(keys.hello, "for the worker to connect")
        for stale in (keys.hello, keys.instruction, keys.ready, keys.ack):  # left by an earlier connection of this rank
            self._store.delete_key(stale)
        try:
            problem = self._schema.mismatch(WeightSchema.from_json(hello["schema"]))
        except (KeyError, TypeError, ValueError) as err:
            problem = f"its hello does not describe a policy ({err})"
        if problem:
            self._store.set(keys.verdict, json.dumps({"error": problem}).encode())
            raise SchemaMismatchError(f"Worker rank {self._rank} has a different policy: {problem}")
        self._channel = self._call(lambda: choose(self._preferred_channel, hello).for_sender(self._endpoint, self._schema), "opening the data plane")
        self._wire = self._channel.sender_buffer(self._wire)
        self._store.set(keys.verdict, json.dumps(self._channel.verdict()).encode())
        self._call(lambda: self._channel.connect(0), "connecting")
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

        Returns the received weights (``weights`` when given, filled in; with ``model`` alone, the model's own
        tensors by name) or ``None`` when no update came within ``timeout`` (``0`` polls once; ``None`` waits the
        transport's timeout). The update is applied only once it has fully arrived: a transfer cut short raises
        :class:`TransportError` and leaves ``model`` untouched.
        """
        timeout = self._timeout if timeout is None else timeout
        if not self._call(lambda: self._channel.take_notice(timeout), "waiting for an update"):
            return None
        return self._receive(protocol.UPDATE_TAG, weights, model, strategy)

    def receive_initial_weights(self) -> TensorDictBase:
        """Receive the first weights (the counterpart of :meth:`send_initial_weights`)."""
        return self._receive(protocol.INITIAL_TAG, None, None, None)

    def setup_connection_and_weights_on_receiver(
        self, *, worker_idx: int, weights: Any = None, model: Any = None, strategy: Optional[WeightStrategy] = None
    ) -> TensorDictBase:
        """Publish this worker's schema and host, connect as the sender decides, and apply the initial weights."""
        if self._rank is None:
            self._rank = self._endpoint.rank = worker_idx + 1
        keys = self._keys
        hello = {"schema": json.loads(self._schema.to_json()), "host": host_id()}
        self._store.delete_key(keys.verdict)  # an earlier connection's, never read: the sender answers this hello anew
        self._store.set(keys.hello, json.dumps(hello).encode())
        self._await_verdict(worker_idx)
        verdict = self._read_json(keys.verdict, "for the trainer to check this worker's schema")
        self._store.delete_key(keys.verdict)  # the worker's to remove: the sender never deletes a verdict being read
        if "error" in verdict:
            raise SchemaMismatchError(f"Worker {worker_idx} (rank {self._rank}) policy differs from the trainer's: {verdict['error']}")
        opened = lambda: channel_named(verdict["channel"]).for_receiver(self._endpoint, verdict, self._schema)  # noqa: E731
        self._channel = self._call(opened, "opening the data plane")
        self._call(lambda: self._channel.connect(1), "connecting")
        return self._receive(protocol.INITIAL_TAG, weights, model, strategy)

    # ------------------------------------------------------------------ lifecycle
    def abort(self, store: ControlStore) -> None:
        """Make a thread blocked on this transport give up; call it from another thread with its own store client."""
        if self._closed:  # nobody waits on it, and its keys may belong to this rank's next connection by now
            return
        self._aborted = True
        self._channel.wake(store)

    def close(self) -> None:
        """Drop the data plane and the keys this transport owns in the store."""
        self._closed = True
        if self._store is not None and self._rank is not None:
            keys = self._keys
            for key in (keys.instruction, keys.ready, keys.ack, keys.hello):
                try:
                    self._store.delete_key(key)
                except Exception:  # the store may already be gone at shutdown
                    pass
        self._channel.close()

    # ------------------------------------------------------------------ helpers
    @property
    def _keys(self) -> protocol.WorkerKeys:
        return worker_keys(self._rank)

    def _post(self, wire: WireBuffer, tag: int) -> None:
        self._call(lambda: self._channel.post(wire, tag), "sending an update")
        self._ack_pending = True
        self._version = wire.version
        self.bytes_sent += wire.layout.nbytes if self._channel.carries_bytes else 0

    def _stage(self, weights: Any, version: int) -> WireBuffer:
        """The buffer to send ``weights`` from, stamped ``version``: ``weights`` itself if the channel can send it."""
        sendable = isinstance(weights, WireBuffer) and self._channel.sends_from(weights)
        if sendable and weights.version == version:
            return weights  # staged already (a scheme's pinned buffer): nothing to rewrite
        wire = weights if sendable else self._wire

        def write() -> None:
            if isinstance(weights, WireBuffer) and wire is not weights:
                wire.copy_from(weights)
            elif wire is not weights:
                WeightStrategy().apply_weights(wire.weights, _extract(weights))
            wire.version = version
            if self._checksum and wire is not weights:
                wire.checksum = wire.compute_checksum()

        self._call(lambda: self._channel.stage(wire, write), "staging an update")
        return wire

    def _receive(self, tag: int, weights: Any, model: Any, strategy: Optional[WeightStrategy]) -> TensorDictBase:
        into_model = weights is None and model is not None and (strategy is None or type(strategy) is WeightStrategy)
        # Landing in our own buffer costs nothing extra when the policy then takes that buffer over (a swap).
        swap = into_model and self._targets.bind(model, self._wire, self._schema)
        source = self._call(lambda: self._channel.receive(self._wire, tag, swap or self._lands_always), "receiving weights")
        version, stamp = source.version, source.checksum
        if stamp and stamp != source.compute_checksum():
            self._channel.acknowledge(version, protocol.REFUSED, None)
            raise TransportError(f"Worker rank {self._rank}: update {version} failed its checksum and was not applied")
        if self._aborted:
            raise TransportAborted(f"transport of worker rank {self._rank} was aborted")
        if into_model:
            landing = self._targets.apply(source, swap)
            self._wire = landing if landing is not None else self._wire
            received = self._targets.weights
        else:
            if source is not self._wire:
                self._wire.copy_from(source)
            received = self._wire.weights
            strategy = strategy or WeightStrategy()
            if weights is not None:
                strategy.apply_weights(weights, received)
                received = weights
            if model is not None:
                strategy.apply_weights(model, received)
        self._version = version  # applied: from here on the policy is this version, acked or not
        # The next update may land in the background only in a buffer nobody else reads.
        arm = self._wire if (into_model or weights is not None) and not self._lands_always else None
        try:
            self._channel.acknowledge(version, protocol.ACK, arm)
        except RuntimeError as err:
            raise TransportError(f"Worker rank {self._rank}: update {version} was applied but could not be acknowledged: {err}") from err
        return received

    def _await_verdict(self, worker_idx: int) -> None:
        """Wait for the sender's verdict; raise :class:`TrainingEnded` if training ends first (nobody will answer)."""
        store, verdict = self._store, self._keys.verdict
        if not poll_until(lambda: store.check([verdict]) or store.check([protocol.STOP_KEY]), self._timeout, max_pause=protocol.SLOW_POLL_S):
            raise TransportTimeout(
                f"Timed out waiting for the trainer to check this worker's schema (worker rank {self._rank}, store key"
                f" {verdict!r}) after {self._timeout:.1f}s"
            )
        if not store.check([verdict]):
            raise TrainingEnded(f"training ended before worker {worker_idx} could connect")

    def _read_json(self, key: str, what: str) -> dict:
        raw = self._call(lambda: await_key(self._store, key, f"{what} (worker rank {self._rank})"), what)
        try:
            value = json.loads(raw)
        except ValueError as err:
            raise TransportError(f"Worker rank {self._rank}: store key {key!r} does not hold JSON: {err}") from err
        if not isinstance(value, dict):
            raise TransportError(f"Worker rank {self._rank}: store key {key!r} holds {type(value).__name__}, not an object")
        return value

    def _call(self, operation: Callable[[], T], what: str) -> T:
        """Run a data-plane or store step, raising its failure as this transport's error naming the worker."""
        try:
            return operation()
        except Aborted as err:
            raise TransportAborted(f"transport of worker rank {self._rank} was aborted while {what}") from err
        except (ChannelTimeout, StoreTimeout) as err:
            raise TransportTimeout(f"Worker rank {self._rank}: {what}: {err}") from err
        except ChannelError as err:
            raise TransportError(f"Worker rank {self._rank}: {what} failed: {err}") from err


def _as_wire_buffer(weights: Any, backend: str) -> WireBuffer:
    """The landing/staging buffer: host memory unless nccl moves it (gloo and shared memory read host memory)."""
    if isinstance(weights, WireBuffer):
        return weights
    device = None if backend == "nccl" else torch.device("cpu")
    return make_wire_buffer(_extract(weights), device=device)


def _extract(weights: Any) -> Any:
    return weights if isinstance(weights, (TensorDictBase, dict)) else WeightStrategy().extract_weights(weights)
