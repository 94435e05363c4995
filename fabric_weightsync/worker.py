"""The inference-worker side: what ``worker_fn`` receives, the collector-side callback, and the process body."""

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.rank_zero import rank_zero_only
from tensordict import TensorDictBase
from torch import nn

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.environment import ProcessLayout
from fabric_weightsync.experience import ExperienceRoutes
from fabric_weightsync.experience_sender import ExperienceSender
from fabric_weightsync.messages import MessageReader
from fabric_weightsync.protocol import STOP_KEY, TrainingEnded, WorkerKeys, worker_keys
from fabric_weightsync.transport import DistributedTransport, TransportError
from fabric_weightsync.weights import WeightStrategy
from fabric_weightsync.worker_logs import WorkerLogSender

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.5
"""Seconds between a worker's heartbeats."""

TRAINER_LOST_TIMEOUT = 10.0
"""Seconds of failed store calls after which a worker decides training rank 0 is gone and exits."""

EXIT_TRAINER_LOST = 75
"""Exit code of a worker that lost training rank 0."""

LATE_REPORT_TIMEOUT_S = 2.0
"""Seconds a worker that found training over tries to tell rank 0 it exited."""

LOG_CLOSE_TIMEOUT_S = 5.0
"""Seconds an exiting worker gives training rank 0 to take the metric records it still holds."""

UPDATE_WAIT_SLICE_S = 0.1
"""``wait_for_update`` waits in slices this long, so it notices the end of training."""

WORKER_SEED_STRIDE = 1000
"""Worker ``i``'s seed is ``base_seed + WORKER_SEED_STRIDE * (i + 1)`` (:meth:`WorkerContext.seed_everything`)."""


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

    def __init__(self, policy: nn.Module, strategy: WeightStrategy, context: "WorkerContext", flatten_weights: bool = True) -> None:
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


@dataclass
class WorkerContext:
    """What ``worker_fn`` receives: who this worker is, how to connect its policy, and when to stop.

    Attributes:
        worker_id: ``0 .. num_workers - 1`` over all nodes.
        num_workers: inference workers in the whole run.
        global_rank: this process's rank among all launched processes (trainers and workers).
        local_rank: its rank on this node.
        node_rank: its node.
        device: where the policy should live (``cpu`` unless the strategy gives workers devices).
    """

    worker_id: int
    num_workers: int
    global_rank: int
    local_rank: int
    node_rank: int
    device: torch.device
    control: ControlPlane
    num_training_ranks: int = 1
    num_nodes: int = 1
    backend: str = "gloo"
    timeout: float = 60.0

    def __post_init__(self) -> None:
        self._stop = False
        self.training_ended = False
        """Whether this worker has seen training rank 0's stop flag (training ended normally)."""
        self.trainer_lost = False
        """Whether training rank 0 became unreachable before this worker saw it end."""
        self.evicted = False
        self._receiver: Optional[WeightReceiver] = None
        self._sender: Optional[ExperienceSender] = None
        self._messages: Optional[MessageReader] = None
        self._logs: Optional[WorkerLogSender] = None

    @property
    def rank(self) -> int:
        """This worker's transport rank (1-indexed, as in TorchRL)."""
        return self.worker_id + 1

    def connect(self, policy: nn.Module, *, strategy: Optional[WeightStrategy] = None, flatten_weights: bool = True) -> WeightReceiver:
        """Join this worker's transport and receive the initial weights: the policy then equals the trainer's.

        With ``flatten_weights`` (the default), a CPU policy's weights move once into one storage (the
        ``Parameter`` objects stay the same): an update, once in the landing buffer (received over a process
        group or copied out of shared memory), is then applied by swapping storage with it instead of a copy.
        Turn it off if something on the worker relies on the weights' addresses.

        Raises :class:`~fabric_weightsync.weights.SchemaMismatchError` naming the differing keys when the
        policy's names, shapes or dtypes differ from the trainer's module.
        """
        if self._receiver is not None:
            raise RuntimeError(f"Worker {self.worker_id} is already connected")
        self._receiver = WeightReceiver(policy, strategy or WeightStrategy(), self, flatten_weights)
        return self._receiver

    def send(self, batch: Union[TensorDictBase, Mapping[str, Any]], *, version: Optional[int] = None, timeout: Optional[float] = None) -> bool:
        """Send a batch of experience to a training rank of this worker's node (see
        :class:`~fabric_weightsync.experience.ExperienceRoutes`: one rank with at least as many workers as ranks on
        the node, else whichever of this worker's ranks has room).

        ``batch``: a ``TensorDict``, or a dict of tensors (nested dicts allowed), which arrives as a ``TensorDict``
        with ``batch_size=[]``. ``version`` defaults to the version of the policy applied now (``connect`` must
        have been called). Blocks while that rank's queue is full; returns ``False`` if training stopped before the
        batch could be delivered (see :class:`~fabric_weightsync.experience_sender.ExperienceSender`).
        """
        if self._sender is None:
            self._sender = ExperienceSender(
                self.worker_id,
                ExperienceRoutes(self.num_workers, self.num_training_ranks, self.num_nodes).ranks_of(self.worker_id),
                self.control.client(),  # its own client: this one polls while the worker waits
                self.timeout,
                stop_requested=lambda: self.stop_requested,
                idle=lambda: self._receiver is not None and self._receiver.poll(),
            )
        if version is None:
            if self._receiver is None:
                raise RuntimeError("ctx.send() needs the policy version: call ctx.connect(policy) first or pass version=")
            version = self._receiver.version
        return self._sender.send(batch, version=version, timeout=self.timeout if timeout is None else timeout)

    def log(self, name: str, value: Any, step: Optional[int] = None) -> None:
        """Log one metric to training rank 0's Fabric loggers; see :meth:`log_dict`."""
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log metrics (numbers or one-element tensors) to the loggers of training rank 0's ``Fabric``.

        Never blocks: the records are buffered and delivered by a thread, and training rank 0 writes them after
        its next optimizer step (``WeightSyncCallback``) or at the end of training. ``step`` defaults to the
        version of the policy applied here (the trainer's optimizer-step count; 0 before ``connect``). Records
        the trainer cannot keep up with are never dropped silently: see :mod:`~fabric_weightsync.worker_logs`.
        """
        if self._logs is None:
            self._logs = WorkerLogSender(self.worker_id, self.control.client())  # its own client: its thread polls
        if step is None:
            step = self._receiver.version if self._receiver is not None else 0
        self._logs.log(metrics, step)

    def close_logs(self, timeout: float) -> None:
        """Deliver what ``log_dict`` still holds (at the worker's exit)."""
        if self._logs is not None:
            self._logs.close(0.0 if self.trainer_lost else timeout)

    @property
    def messages(self) -> dict[str, Any]:
        """The newest value of every key training rank 0 published (``fabric.strategy.publish(...)``), ``{}`` before
        the first; tensors come back as tensors. Each read costs one store round trip (one small ``get``), as
        :attr:`stop_requested` does: read it once per rollout, e.g. right after ``receiver.poll()``."""
        if self._messages is None:
            self._messages = MessageReader(self.control.store, self.worker_id)
        return self._messages.read()

    def seed_everything(self, base_seed: int) -> int:
        """Seed Python's ``random``, numpy and torch in this worker; returns the seed, ``base_seed + 1000 * (worker_id + 1)``.

        Distinct for every worker and the same in every run, and apart from the ``base_seed + global_rank`` that
        training ranks usually take (``fabric.seed_everything(seed + fabric.global_rank)``).
        """
        return seed_everything(base_seed + WORKER_SEED_STRIDE * (self.worker_id + 1), verbose=False)

    @property
    def stop_requested(self) -> bool:
        """True once training has ended (the trainer delivered the final version first) or was lost."""
        if not self._stop:
            try:
                self._stop = self.training_ended = self.training_ended or self.control.stop_requested()
            except RuntimeError:  # the store died with training rank 0
                self.request_local_stop(lost=True)
        return self._stop

    def check_evicted(self) -> bool:
        """Whether rank 0 gave up on this worker, asking the store now (the heartbeat thread looks twice a second)."""
        self.evicted = self.evicted or self.control.store.check([worker_keys(self.rank).evicted])
        return self.evicted

    def request_local_stop(self, lost: bool = False) -> None:
        """Stop this worker; ``lost``: because training rank 0 is unreachable (unless it said training ended)."""
        self._stop = True
        self.trainer_lost = self.trainer_lost or (lost and not self.training_ended)


class _Heartbeat(threading.Thread):
    """Beats for the trainer's monitor, and ends this process if training rank 0 is gone for good."""

    def __init__(self, context: WorkerContext) -> None:
        super().__init__(name="fws-heartbeat", daemon=True)
        self.context = context
        self._store = context.control.client()
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop beating and wait out a beat in flight: a daemon thread still inside a store call when the
        interpreter finalizes is unwound through C++ frames, which aborts the process ("terminate called
        without an active exception") after the worker's work is done."""
        self._stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=5.0)

    def run(self) -> None:
        failing_since: Optional[float] = None
        keys = worker_keys(self.context.rank)
        while not self._stopped.wait(HEARTBEAT_INTERVAL):
            try:
                _beat(self._store, keys)
                self.context.evicted = self.context.evicted or self._store.check([keys.evicted])
                # A normal end must never read as a lost trainer, even if worker_fn never looked at the flag.
                self.context.training_ended = self.context.training_ended or self._store.check([STOP_KEY])
                failing_since = None
            except Exception:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 2 * HEARTBEAT_INTERVAL:  # one slow call is not a lost trainer
                    self.context.request_local_stop(lost=True)
                if now - failing_since > TRAINER_LOST_TIMEOUT:
                    _say(f"worker {self.context.worker_id}: training rank 0 unreachable for {TRAINER_LOST_TIMEOUT:.0f}s, exiting")
                    os._exit(EXIT_TRAINER_LOST)


def run_worker(worker_fn: Callable[[WorkerContext], object], context: WorkerContext) -> int:
    """Run ``worker_fn`` with heartbeats; report an exception to the trainer (then re-raise it) and the exit.

    Returns the process's exit code: 0, or :data:`EXIT_TRAINER_LOST` when ``worker_fn`` returned because training
    rank 0 became unreachable (a scheduler must not read that as success).
    """
    store, keys = context.control.store, worker_keys(context.rank)
    for stale in (keys.error, keys.exit, keys.evicted):  # a previous process's
        store.delete_key(stale)
    _beat(store, keys)  # once now: the monitor may look before the thread's first beat
    heartbeat = _Heartbeat(context)
    heartbeat.start()
    code = "1"
    try:
        try:
            worker_fn(context)
        except TrainingEnded as ended:
            _say(f"worker {context.worker_id}: {ended}; nothing to do, exiting")
        code = "0"
    except BaseException:
        _report(store, keys.error, traceback.format_exc())
        raise
    finally:
        context.close_logs(LOG_CLOSE_TIMEOUT_S)  # before the exit report: rank 0 takes the last records after it
        heartbeat.stop()
        _report(store, keys.exit, code)
    if context.trainer_lost:
        _say(f"worker {context.worker_id}: training rank 0 became unreachable before training ended")
        return EXIT_TRAINER_LOST
    return 0


def _beat(store: ControlStore, keys: WorkerKeys) -> None:
    """A heartbeat: a fresh timestamp, so a replayed older value reads as no beat at all."""
    store.set(keys.heartbeat, str(time.time_ns()))


def _say(message: str) -> None:
    print(f"[fabric_weightsync] {message}", file=sys.stderr, flush=True)


def _report(store, key: str, value: str) -> None:
    try:
        store.set(key, value.encode())
    except Exception:  # the trainer is gone: nobody to tell
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What a launcher needs to run this node's workers: plain values, picklable for spawned processes.

    Attributes:
        worker_fn: what each worker runs.
        layout: which local ranks are workers.
        backend: the weight groups' backend (``"gloo"`` or ``"nccl"``).
        sync_timeout: seconds for each blocking step of connecting and of a transfer.
        worker_device: the workers' device; ``cuda`` without an index gives worker ``i`` of a node GPU
            ``(devices + i) % device_count``.
    """

    worker_fn: Callable[[WorkerContext], Any]
    layout: ProcessLayout
    backend: str
    sync_timeout: float
    worker_device: Union[str, torch.device] = "cpu"

    def run(self, main_address: str, main_port: int, node_rank: int, local_rank: int) -> int:
        """Body of a worker process: join the control plane, run ``worker_fn``; returns the exit code."""
        layout = self.layout
        worker_id = layout.worker_id(node_rank, local_rank)
        try:
            control = ControlPlane.join(main_address, main_port, self.sync_timeout)
        except TrainingEnded as ended:
            _say(f"worker {worker_id}: {ended}; nothing to do, exiting")
            # Rank 0 may still wait for this worker's exit; it is not worth more than a brief try.
            self.report_exit(main_address, main_port, node_rank, local_rank, 0, timeout=LATE_REPORT_TIMEOUT_S)
            return 0
        # A worker is rank zero of its own process: Lightning loggers it creates write instead of skipping every call.
        rank_zero_only.rank = 0
        try:
            context = WorkerContext(
                worker_id=worker_id,
                num_workers=layout.num_workers,
                global_rank=layout.launch_rank(node_rank, local_rank),
                local_rank=local_rank,
                node_rank=node_rank,
                device=self.device(local_rank - layout.devices),
                control=control,
                backend=self.backend,
                timeout=self.sync_timeout,
                num_training_ranks=layout.devices * layout.num_nodes,
                num_nodes=layout.num_nodes,
            )
            return run_worker(self.worker_fn, context)
        except BaseException:
            _say(f"inference worker {worker_id} failed:\n{traceback.format_exc()}")
            return 1

    def report_exit(
        self, main_address: str, main_port: int, node_rank: int, local_rank: int, code: int, timeout: Optional[float] = None
    ) -> None:
        """Tell rank 0's monitor that a worker process of this node exited with ``code`` (a launcher saw it die, or
        it found training over); ``timeout`` defaults to the sync timeout."""
        rank = self.layout.worker_id(node_rank, local_rank) + 1
        timeout = self.sync_timeout if timeout is None else timeout
        try:
            ControlPlane.join(main_address, main_port, timeout, after_end=True).store.set(worker_keys(rank).exit, str(code).encode())
        except Exception:  # training rank 0 is gone too; nothing to tell
            pass

    def device(self, index: int) -> torch.device:
        """The device of this node's worker ``index``."""
        device = torch.device(self.worker_device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", (self.layout.devices + index) % max(1, torch.cuda.device_count()))
        return device
