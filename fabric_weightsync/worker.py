"""What ``worker_fn`` receives: :class:`WorkerContext`, a worker's identity and its ways to the trainer."""

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from lightning.fabric.utilities.seed import seed_everything
from tensordict import TensorDictBase
from torch import nn

from fabric_weightsync.control import ControlPlane
from fabric_weightsync.experience import ExperienceRoutes
from fabric_weightsync.experience_sender import ExperienceSender
from fabric_weightsync.messages import MessageReader
from fabric_weightsync.protocol import worker_keys
from fabric_weightsync.receiver import WeightReceiver
from fabric_weightsync.weights import WeightStrategy
from fabric_weightsync.worker_logs import WorkerLogSender

WORKER_SEED_STRIDE = 1000
"""Worker ``i``'s seed is ``base_seed + WORKER_SEED_STRIDE * (i + 1)`` (:meth:`WorkerContext.seed_everything`)."""


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
