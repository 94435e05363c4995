"""The per-worker weight transport: a TCPStore as control plane, one message per update on the data plane.

It keeps the public API and store keys of TorchRL's ``torchrl.weight_update.DistributedTransport`` and changes
what a user would want changed:

- one message per update: both ends hold a wire buffer (one storage) (see :mod:`fabric_weightsync.weights`)
  and the update travels as its single storage, whatever the number of tensors;
- versioned: the version rides inside that message, so data and version can never disagree;
- the receiver asks before the sender sends (``NODE_{rank}_ready``), so the sender decides *what* to send
  only once the worker is ready to take it: a busy worker never pins a stale buffer (latest version wins);
- a schema check (names, shapes, dtypes) before any byte of weights moves, and the choice of data plane:
  shared memory for a worker on the sender's host (``channel="auto"``), a process group otherwise;
- every blocking call has a timeout, and a failed transfer is never applied.

Store keys for the worker of rank ``r`` (1-indexed, the trainer is rank 0 of the pair):
``NODE_{r}_schema`` / ``NODE_{r}_verdict`` (connect), and on the group channel ``NODE_{r}_in`` =
``update_weights`` (instruction), ``NODE_{r}_ready`` (receive posted), ``NODE_{r}_out`` = ``updated`` (ack).
The shared-memory channel signals through its board in ``/dev/shm`` instead (see
:class:`~fabric_weightsync.channels.SharedMemoryChannel`): a poll there is a memory read.

A worker whose landing buffer is its own (it applies updates to a model or into ``weights=``) *arms* the group
channel (gloo, host memory) after each update it applies: it posts the receive of the next one at once and
says so in its ack (``updated, armed``). The sender then sends the next update without instruction or ready
key, gloo lands it while the worker runs, and the worker's poll is a memory read. An armed worker that was
busy when an update landed first asks the store for the newest version staged (the ``latest_key`` the sender
names at connect); if the update was superseded meanwhile it drops it, re-arms, answers ``superseded, armed``
and waits for the newest, which the sender sends next. It asks only when the update may have waited longer
than fetching the newest would take (what its last fetches took): a worker that polls every 10 ms takes a
100 MB update that landed since, rather than block 50 ms for one at most 10 ms fresher.
"""

import json
import time
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase
from torch import nn

from fabric_weightsync.channels import (
    REFUSED,
    ChannelError,
    GroupChannel,
    SharedMemoryChannel,
    SharedStaging,
    StoreTimeout,
    await_key,
    host_id,
)
from fabric_weightsync.flat import FlatWeights
from fabric_weightsync.weights import (
    VERSION_KEY,
    WEIGHTS_KEY,
    SchemaMismatchError,
    WeightSchema,
    WeightStrategy,
    make_wire_buffer,
    named_weights,
    unwrap,
    CHECKSUM_KEY,
    LayoutProbe,
    has_wire_storage,
    is_wire_buffer,
    read_header,
    weights_checksum,
    wire_storage,
)

DEFAULT_TIMEOUT = 60.0
"""Seconds any single blocking step (connect, transfer, ack, store wait) may take before it raises."""

Channel = Literal["group", "shm", "auto"]

_UPDATE_TAG = 0
_INITIAL_TAG = 1
_INSTRUCTION = b"update_weights"
_ACK = b"updated"
_ACK_ARMED = b"updated, armed"
_SUPERSEDED = b"superseded, armed"
_ABORT = b"abort"

_FRESH_S = 0.0005
"""An armed worker that last looked (and found nothing) this recently takes what landed without asking the store
whether it is still the newest: the answer, a round trip away (about this long on one host), would be no
fresher than the update. The worker raises this bar to what fetching the newest took it lately (see
:meth:`DistributedTransport._superseded`)."""


class TransportError(RuntimeError):
    """A transfer did not complete: the peer died, timed out or the transport was aborted."""


class TransportAborted(TransportError):
    """The transport was closed from another thread while it waited for its peer."""


class TransportTimeout(TransportError):
    """A store wait ran out of time: the peer may still be alive but busy."""


class DistributedTransport:
    """Weight transport for ONE inference worker, with the API of TorchRL's ``DistributedTransport``.

    Args:
        weights_buffer: the weights layout: a module, a ``TensorDict`` of weights or a wire buffer made by
            :func:`~fabric_weightsync.weights.make_wire_buffer`. The transport keeps a wire
            buffer of it (the given one when it already is one): the sender's staging area or the receiver's
            landing area, in host memory (on the weights' GPU with ``backend="nccl"``). Policies on a GPU
            receive into host memory and are updated with one host-to-device copy.
        store: the control-plane store. Give each transport its own client: a store client serialises its
            calls, and the transport blocks on the store.
        rank: the worker's rank, 1-indexed as in TorchRL (``worker_idx + 1``); names the store keys.
        sync: with ``False``, :meth:`send_weights` returns once the send is posted; :meth:`wait_ack` finishes it.
        group: an existing two-rank process group (sender rank 0, worker rank 1) instead of building one on
            ``store`` (neither the default group nor the trainers' world is ever used).
        backend: backend of the group it builds: ``"gloo"`` (any tensors, any host) or ``"nccl"`` (CUDA
            tensors, distinct GPUs).
        channel: the sender's choice of data plane: ``"group"`` (always the process group), ``"shm"`` (shared
            memory, same host only) or ``"auto"`` (shared memory when the worker is on this host).
        timeout: seconds any single blocking step may take (default :data:`DEFAULT_TIMEOUT`).
        group_name: store prefix of the group; a rejoining worker uses a new one.
        checksum: the sender stamps each update it stages with a CRC32 of the weights; a receiver verifies any
            stamped update before applying it and refuses a corrupt one (costs about one extra pass over the
            weights on each side; off by default).
        shared_staging: shared-memory staging to publish from on the ``"shm"`` channel, shared by the
            transports of several workers (what :class:`~fabric_weightsync.scheme.WeightSyncScheme` does);
            without it the transport creates one buffer of its own when the shared-memory channel is chosen.
        latest_key: sender side: a store key that holds the newest version staged for this worker (an integer,
            kept by whoever stages, at least while the worker holds an update it has not answered); an armed
            worker that was busy while an update landed checks it before applying, and drops an update
            superseded meanwhile. Without it, what lands is applied.
        flatten_weights: receiver side, for a ``model`` on the CPU made of plain tensors: move its weights into a
            wire buffer once (the ``Parameter`` objects stay the same), so that an update, once in the landing
            buffer (received over a process group, or copied out of shared memory as the sender writes it), is
            applied by swapping storage with it instead of copying every byte. The weights' memory then
            alternates between two buffers; turn it off if something relies on their addresses. Off when
            ``weights_buffer`` is a wire buffer: it stays the landing area the caller can read.
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
        channel: Channel = "group",
        timeout: float = DEFAULT_TIMEOUT,
        group_name: Optional[str] = None,
        checksum: bool = False,
        shared_staging: Optional[SharedStaging] = None,
        latest_key: Optional[str] = None,
        flatten_weights: bool = True,
    ) -> None:
        if channel not in ("group", "shm", "auto"):
            raise ValueError(f"channel must be 'group', 'shm' or 'auto', got {channel!r}")
        if store is not None:  # gets and waits without an explicit timeout use the client's: make it ours
            store.set_timeout(timedelta(seconds=timeout))
        self._store = store
        self._rank = rank
        self._sync = sync
        self._timeout = float(timeout)
        self._preferred_channel = channel
        self._checksum = checksum
        self._wire = _as_wire_buffer(weights_buffer, backend)
        self._schema = WeightSchema.of(self._wire[WEIGHTS_KEY])
        self._group_channel = GroupChannel(
            store, group_name or f"fws/pg/{rank}", backend, self._timeout, group, aborted=lambda: self._aborted
        )
        self._channel: Union[GroupChannel, SharedMemoryChannel] = self._group_channel
        self._ack_pending = False
        self._ack: Optional[bytes] = None
        self._ack_key_read = False
        self._ready_taken = False
        self._peer_armed = False
        self._latest_key = latest_key
        self._looked_at = 0.0
        self._fetch_s: Optional[float] = None  # what fetching the newest took lately (smoothed); none yet
        self._aborted = False
        self._closed = False
        self._staging = shared_staging
        self._owns_staging = False
        # A wire buffer the caller gave us is theirs to read: every update lands there, and the policy never takes
        # it over.
        self._lands_always = self._wire is weights_buffer
        self._targets = _ModuleTargets(flatten_weights and not self._lands_always)
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
        """The ``{weights, version, checksum}`` buffer this transport sends from or receives into."""
        return self._wire

    @property
    def channel(self) -> str:
        """The data plane in use: ``"group"`` or ``"shm"`` (decided at connect)."""
        return self._channel.name

    @property
    def version(self) -> int:
        """The version last sent (sender) or received (receiver)."""
        return self._version

    @property
    def peer_armed(self) -> bool:
        """Sender side: the worker's receive of the next update is posted already (it said so in its last ack)."""
        return self._peer_armed

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
        self.wait_ack()  # a send still in flight reads the buffer that staging would rewrite
        wire = self._stage(weights, self._version + 1 if version is None else version)
        if self._channel.name == GroupChannel.name and not self._peer_armed:
            self.instruct()
            self.wait_ready()
        self.post_send(wire)
        if self._sync:
            self.wait_sent()

    def instruct(self) -> None:
        """Set the worker's instruction key: an update is waiting for it."""
        self._store.set(self._key("in"), _INSTRUCTION)
        self.drop_read_ack()  # while the worker notices the instruction: it cannot ack before it is ready

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the worker is ready to receive (or :meth:`abort` is called from another thread)."""
        key = self._key("ready")
        try:
            self._store.wait([key], timedelta(seconds=self._timeout if timeout is None else timeout))
        except dist.DistStoreError as err:
            raise TransportTimeout(f"Timed out waiting for worker rank {self._rank} to post its receive ({key!r})") from err
        if self._aborted:
            raise TransportAborted(f"transport to worker rank {self._rank} was aborted")
        self._ready_taken = True

    def post_send(self, wire: TensorDictBase) -> None:
        """Send one staged wire buffer on the data plane; :meth:`wait_sent` / :meth:`wait_ack` complete it."""
        if self._peer_armed:
            self.drop_read_ack()  # an armed worker acks as soon as this lands: the old ack must be gone first
        self._data_plane(lambda: self._channel.post(wire, _UPDATE_TAG), "sending an update")
        self._ack_pending, self._ack = True, None
        if self._ready_taken:
            self._store.delete_key(self._key("ready"))  # after posting: off the worker's critical path
            self._ready_taken = False
        self._version = read_header(wire)[0]

    def wait_sent(self) -> None:
        """Wait until the wire buffer passed to :meth:`post_send` may be overwritten."""
        self._ack = self._data_plane(self._channel.wait_sent, "sending an update") or self._ack

    def wait_ack(self, timeout: Optional[float] = None) -> bool:
        """Wait until the send completed and the worker answered (``NODE_{rank}_out``); whether it applied it.

        ``False``: an armed worker dropped the update as superseded and waits for the newest one, which the next
        send should carry. A :class:`TransportTimeout` leaves the answer pending: calling again keeps waiting.
        """
        if self._store is None or self._rank is None or not self._ack_pending:
            return True
        self.wait_sent()
        status = self._ack  # the shared-memory channel's ack came with the end of the send
        if status is None:
            status = self._wait_key("out", timeout, "for the worker's ack")
            self._ack_key_read = True  # deleted later (drop_read_ack), off the path of this ack
        self._ack_pending = False
        if self._aborted:
            raise TransportAborted(f"transport to worker rank {self._rank} was aborted")
        if status not in (_ACK, _ACK_ARMED, _SUPERSEDED):
            raise TransportError(f"worker rank {self._rank} answered {status!r} instead of {_ACK!r}")
        self._peer_armed = status != _ACK
        return status != _SUPERSEDED

    def send_initial_weights(self, weights: Any) -> None:
        """Send the first weights without an instruction (the worker is blocked in its connect)."""
        wire = self._stage(weights, read_header(weights)[0] if is_wire_buffer(weights) else 0)
        self.drop_read_ack()
        self._data_plane(lambda: self._channel.post(wire, _INITIAL_TAG), "sending the initial weights")
        self._ack_pending, self._ack = True, None
        self.wait_ack()  # the worker acks its initial weights too: the connection is then confirmed end to end
        self._version = read_header(wire)[0]

    def receiver_connected(self) -> bool:
        """Whether the worker has published its schema, i.e. called its side of the connection setup."""
        return self._store.check([self._key("schema")])

    def setup_connection_and_weights_on_sender(self, weights: Any = None) -> None:
        """Check the worker's schema, pick the data plane, connect, and send the initial weights.

        Blocks until the worker connects (up to the timeout). Raises :class:`SchemaMismatchError` naming the
        offending keys, after telling the worker the same, when the two layouts differ.
        """
        hello = json.loads(self._wait_key("schema", None, "for the worker to connect"))
        for stale in ("schema", "in", "ready", "out"):  # left by an earlier connection of this rank
            self._store.delete_key(self._key(stale))
        problem = self._schema.mismatch(WeightSchema.from_json(json.dumps(hello["schema"])))
        if problem:
            self._store.set(self._key("verdict"), json.dumps({"error": problem}).encode())
            raise SchemaMismatchError(f"Worker rank {self._rank} has a different policy: {problem}")
        use_shm = self._preferred_channel == "shm" or (self._preferred_channel == "auto" and hello["host"] == host_id())
        verdict = {"channel": GroupChannel.name, "group": self._group_channel.group_name, "latest": self._latest_key}
        if use_shm:
            if self._staging is None:  # standalone: one shared buffer of its own, holding its current weights
                self._staging, self._owns_staging = SharedStaging.create(self._schema, 1, self._rank), True
                wire_storage(self._staging.buffers[0]).copy_(wire_storage(self._wire))
                self._wire = self._staging.buffers[0]
            self._staging.reset_acks(self._rank)  # before the verdict: the worker may ack right after it
            self._channel = self._shared_channel()
            verdict = {"channel": SharedMemoryChannel.name, "files": self._staging.paths, "board": self._staging.board_path}
        elif self._staging is not None:
            self._staging.exempt(self._rank)  # served over the group: the scheme's writes need not wait on it
        self._store.set(self._key("verdict"), json.dumps(verdict).encode())
        self._data_plane(lambda: self._channel.connect(0), "connecting")
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
        tensors by name) or ``None`` when no update came within ``timeout`` (``0`` polls once; ``None`` waits
        the transport's timeout). The update is applied only once it has fully arrived: a transfer cut short
        raises :class:`TransportError` and leaves ``model`` untouched. Applied to ``model`` or ``weights``, the
        next update's receive is armed (see the module's docstring) and polls cost no store round trip.
        """
        timeout = self._timeout if timeout is None else timeout
        if self._group_channel.armed:
            return self._receive_armed(timeout, weights, model, strategy)
        if not self.take_instruction(timeout):
            return None
        if self._channel.name == GroupChannel.name:
            self._store.set(self._key("ready"), b"1")
        return self._receive(_UPDATE_TAG, weights, model, strategy)

    def take_instruction(self, timeout: float = 0.0) -> bool:
        """Consume a pending update notice, waiting up to ``timeout`` seconds for one.

        On the group channel that is the ``update_weights`` instruction key (one store round trip per look), or
        with the receive armed, an update that landed (a memory read); on shared memory, a publication on the
        board newer than the last one taken (a memory read).
        """
        if self._group_channel.armed:
            return self._data_plane(lambda: self._group_channel.wait_landed(timeout), "waiting for an update")
        if self._channel.name == SharedMemoryChannel.name:
            return self._channel.take_notice(timeout)
        deadline = time.monotonic() + timeout
        pause = 0.0002
        while not self._store.delete_key(self._key("in")):
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
        return True

    def receive_initial_weights(self) -> TensorDictBase:
        """Receive the first weights (the counterpart of :meth:`send_initial_weights`)."""
        return self._receive(_INITIAL_TAG, None, None, None)

    def setup_connection_and_weights_on_receiver(
        self,
        *,
        worker_idx: int,
        weights: Any = None,
        model: Any = None,
        strategy: Optional[WeightStrategy] = None,
    ) -> TensorDictBase:
        """Publish this worker's schema and host, connect as the sender decides, and apply the initial weights."""
        if self._rank is None:
            self._rank = worker_idx + 1
        hello = {"schema": json.loads(self._schema.to_json()), "host": host_id()}
        self._store.set(self._key("schema"), json.dumps(hello).encode())
        verdict = json.loads(self._wait_key("verdict", None, "for the trainer to check this worker's schema"))
        self._store.delete_key(self._key("verdict"))
        if "error" in verdict:
            raise SchemaMismatchError(f"Worker {worker_idx} (rank {self._rank}) policy differs from the trainer's: {verdict['error']}")
        if verdict["channel"] == SharedMemoryChannel.name:
            self._staging = self._data_plane(lambda: SharedStaging.open(self._schema, verdict["files"], verdict["board"]), "mapping shared memory")
            self._owns_staging = True
            self._channel = self._shared_channel()
        else:
            self._group_channel.group_name = verdict["group"]
            self._latest_key = verdict.get("latest")
        self._data_plane(lambda: self._channel.connect(1), "connecting")
        return self._receive(_INITIAL_TAG, weights, model, strategy)

    # ------------------------------------------------------------------ lifecycle
    def abort(self, store: dist.Store) -> None:
        """Make a thread blocked on this transport give up; call it from another thread with its own store client."""
        if self._closed:  # nobody waits on it, and its keys may belong to this rank's next connection by now
            return
        self._aborted = True
        store.set(self._key("ready"), _ABORT)
        store.set(self._key("out"), _ABORT)

    def close(self) -> None:
        """Drop the data plane and the keys this transport owns in the store."""
        self._closed = True
        for name in ("in", "ready", "out", "schema", "verdict"):
            try:
                self._store.delete_key(self._key(name))
            except Exception:  # the store may already be gone at shutdown
                pass
        self._group_channel.close()
        if self._owns_staging:
            self._staging.close()
            self._staging, self._owns_staging = None, False

    def drop_read_ack(self) -> None:
        """Delete the ack key read last, before the worker can set it again for the next update.

        :meth:`wait_ack` leaves it in place, so that a store round trip does not stand between the worker's ack
        and the caller learning of it; every send that waits for an ack drops it first. A caller with time on its
        hands (a link thread about to sleep) drops it then, so that the next send to an armed worker need not.
        """
        if self._ack_key_read:
            self._store.delete_key(self._key("out"))
            self._ack_key_read = False

    def _key(self, name: str) -> str:
        return f"NODE_{self._rank}_{name}"

    def _receive_armed(self, timeout: float, weights: Any, model: Any, strategy: Optional[WeightStrategy]) -> Optional[TensorDictBase]:
        channel = self._group_channel
        landed_earlier = channel.landed()  # it may have landed at any time since this worker last looked
        if not landed_earlier and not self._data_plane(lambda: channel.wait_landed(timeout), "waiting for an update"):
            self._looked_at = time.monotonic()
            return None
        if landed_earlier and self._superseded():
            self._fetch_newest()
        return self._receive(_UPDATE_TAG, weights, model, strategy)

    def _fetch_newest(self) -> None:
        """Drop the superseded update that landed, re-arm, and wait for the newest: the sender sends it once it
        reads the answer ``superseded, armed``."""
        channel = self._group_channel
        self._data_plane(lambda: channel.receive(self._wire, _UPDATE_TAG), "receiving weights")
        self._data_plane(lambda: channel.arm(self._wire, _UPDATE_TAG), "re-arming the receive")
        self._store.set(self._key("out"), _SUPERSEDED)
        asked = time.monotonic()
        if not self._data_plane(lambda: channel.wait_landed(self._timeout), "waiting for the newest update"):
            raise TransportTimeout(f"Worker rank {self._rank} dropped a superseded update and the newest one did not come")
        took = time.monotonic() - asked  # smoothed: one slow fetch (a trainer busy elsewhere) moves it a quarter
        self._fetch_s = took if self._fetch_s is None else 0.75 * self._fetch_s + 0.25 * took

    def _superseded(self) -> bool:
        """Whether the update that landed since this worker last looked was superseded meanwhile (a store round
        trip; one that landed while it waited here is as fresh as can be).

        Not asked without a ``latest_key``, nor when the last look is more recent than fetching the newest takes
        (at least :data:`_FRESH_S`): the update is then at most that stale, and a fetch would block the worker
        longer than the staleness it removes. The version is read before the receive is confirmed: the header
        comes first, and a wrong guess only costs a resend.
        """
        if self._latest_key is None or time.monotonic() - self._looked_at < max(_FRESH_S, self._fetch_s or 0.0):
            return False
        return int(self._store.add(self._latest_key, 0)) > read_header(self._wire)[0]

    def _can_arm(self, applied_elsewhere: bool) -> bool:
        """Whether the landing buffer may take the next update in the background: it must be the transport's own
        (the caller was handed the model's or its own weights, not it) and in host memory on the group channel."""
        return (
            applied_elsewhere
            and self._channel is self._group_channel
            and not self._lands_always
            and wire_storage(self._wire).is_cpu
        )

    def _stage(self, weights: Any, version: int) -> TensorDictBase:
        """The wire buffer to send ``weights`` from, stamped ``version``: ``weights`` itself if it is one we can send."""
        sendable = is_wire_buffer(weights) and (self._staging is None or any(weights is staged for staged in self._staging.buffers))
        if sendable and read_header(weights)[0] == version:
            return weights  # staged already (a scheme's pinned buffer): nothing to rewrite
        wire = weights if sendable else self._wire
        with self._channel.writing(wire):  # shared memory: no worker is copying from it meanwhile
            if is_wire_buffer(weights) and wire is not weights:
                wire_storage(wire).copy_(wire_storage(weights))  # the worker can only read our shared files
            elif wire is not weights:
                WeightStrategy().apply_weights(wire[WEIGHTS_KEY], _extract(weights))
            wire[VERSION_KEY].fill_(version)
            if self._checksum and wire is not weights:
                wire[CHECKSUM_KEY].fill_(weights_checksum(wire))
        return wire

    def _receive(self, tag: int, weights: Any, model: Any, strategy: Optional[WeightStrategy]) -> TensorDictBase:
        into_model = weights is None and model is not None and (strategy is None or type(strategy) is WeightStrategy)
        # Landing in our own buffer costs nothing extra when the policy then takes that buffer over (a swap).
        swap = into_model and self._targets.bind(model, self._wire, self._schema)
        source = self._data_plane(lambda: self._channel.receive(self._wire, tag, swap or self._lands_always), "receiving weights")
        version, stamp = read_header(source)
        if stamp and stamp != weights_checksum(source):
            self._channel.release()
            self._acknowledge(version, refused=True)
            raise TransportError(f"Worker rank {self._rank}: update {version} failed its checksum and was not applied")
        if self._aborted:
            raise TransportAborted(f"transport of worker rank {self._rank} was aborted")
        if into_model:
            landing = self._targets.apply(source, swap)
            self._wire = landing if landing is not None else self._wire
            received = self._targets.weights
        else:
            if source is not self._wire:
                wire_storage(self._wire).copy_(wire_storage(source))
            received = self._wire[WEIGHTS_KEY]
            strategy = strategy or WeightStrategy()
            if weights is not None:
                strategy.apply_weights(weights, received)
                received = weights
            if model is not None:
                strategy.apply_weights(model, received)
        self._version = version  # applied: from here on the policy is this version, acked or not
        armed = self._can_arm(into_model or weights is not None)
        try:
            self._channel.release()
            # The ack may announce the receive before it is posted: a gloo send waits for its receive anyway.
            self._acknowledge(version, armed=armed)
            if armed:
                self._group_channel.arm(self._wire, _UPDATE_TAG)
                self._looked_at = time.monotonic()
        except RuntimeError as err:
            raise TransportError(f"Worker rank {self._rank}: update {version} was applied but could not be acknowledged: {err}") from err
        return received

    def _acknowledge(self, version: int, refused: bool = False, armed: bool = False) -> None:
        if self._channel.name == SharedMemoryChannel.name:
            self._channel.acknowledge(REFUSED if refused else version)
        else:
            self._store.set(self._key("out"), b"checksum mismatch" if refused else _ACK_ARMED if armed else _ACK)

    def _shared_channel(self) -> SharedMemoryChannel:
        return SharedMemoryChannel(self._staging, self._rank, self._timeout, aborted=lambda: self._aborted)

    def _data_plane(self, operation, what: str):
        try:
            return operation()
        except ChannelError as err:
            raise TransportError(f"Worker rank {self._rank}: {what} failed: {err}") from err

    def _wait_key(self, name: str, timeout: Optional[float], what: str) -> bytes:
        """``name``'s value once set; without ``timeout``, up to the store client's own (one round trip)."""
        try:
            return await_key(self._store, self._key(name), f"{what} (worker rank {self._rank})", timeout)
        except StoreTimeout as err:
            raise TransportTimeout(str(err)) from err


class _ModuleTargets:
    """The module's tensors in schema order, re-read only when the module's layout changed.

    With ``flatten``, a CPU policy made of plain tensors is moved into a wire buffer of its own once
    (:class:`~fabric_weightsync.flat.FlatWeights`): an update that landed in the transport's private buffer (off
    a process group, or copied out of shared memory) is then applied by a swap of storage, not a copy.
    """

    def __init__(self, flatten: bool) -> None:
        self._flatten = flatten
        self._model: Optional[nn.Module] = None
        self._tensors: list[torch.Tensor] = []
        self._probe: Optional[LayoutProbe] = None
        self._flat: Optional[FlatWeights] = None
        self._sources: dict[int, tuple[TensorDictBase, list[torch.Tensor]]] = {}
        self.weights: Optional[TensorDictBase] = None

    def bind(self, model: nn.Module, wire: TensorDictBase, schema: WeightSchema) -> bool:
        """Follow ``model``'s current layout; returns whether an update that landed in a private buffer like
        ``wire`` is applied by taking that buffer over (a swap) rather than by a copy."""
        if model is not self._model or not self._probe.unchanged():
            self._bind(model, wire, schema)
        return self._flat is not None and wire_storage(wire).is_cpu  # flat weights are host weights

    def apply(self, source: TensorDictBase, swap: bool) -> Optional[TensorDictBase]:
        """Write ``source``'s weights into the model last bound; with ``swap`` (``source`` landed privately), take
        its storage over and return the former one, the buffer to land the next update in."""
        if swap:
            return self._flat.swap(source)
        cached = self._sources.get(id(source))
        if cached is None or cached[0] is not source:  # landing buffers are few and long-lived: list them once
            cached = self._sources[id(source)] = (source, list(source[WEIGHTS_KEY].values()))
        with torch.no_grad():
            torch._foreach_copy_(self._tensors, cached[1])
        return None

    def _bind(self, model: nn.Module, source: TensorDictBase, schema: WeightSchema) -> None:
        module = unwrap(model)
        targets = named_weights(module)
        names = [name for name, _, _ in schema.entries]
        if len(targets) != len(names) or any(name not in targets for name in names):
            WeightStrategy().apply_weights(model, source[WEIGHTS_KEY])  # raises the precise mismatch
        self._model, self._tensors = model, [targets[name] for name in names]
        self.weights = TensorDict(dict(zip(names, self._tensors)))  # what a receive into the model returns
        on_cpu = all(tensor.device.type == "cpu" for tensor in self._tensors)
        self._flat = FlatWeights.adopt(module, schema, self._tensors) if self._flatten and on_cpu else None
        self._probe = self._flat.probe if self._flat is not None else LayoutProbe(module, schema, self._tensors)


def _as_wire_buffer(weights: Any, backend: str) -> TensorDictBase:
    """The landing/staging buffer: host memory unless nccl moves it (gloo and shared memory read host memory)."""
    if is_wire_buffer(weights) and has_wire_storage(weights):
        return weights
    weights = _extract(weights)
    device = None if backend == "nccl" else torch.device("cpu")
    return make_wire_buffer(weights, device=device)


def _extract(weights: Any) -> Any:
    return weights if isinstance(weights, (TensorDictBase, dict)) else WeightStrategy().extract_weights(weights)
