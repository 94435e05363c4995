"""A TorchRL weight-sync scheme whose transport is this library's: a TorchRL collector in a worker receives the
trainer's newest weights through the worker's :class:`~fabric_weightsync.receiver.WeightReceiver`.

Needs TorchRL (``pip install torchrl``); the rest of the package does not import this module.

    collector = Collector(env, policy, frames_per_batch=256, total_frames=-1,
                          weight_recv_schemes={"policy": WeightReceiverScheme(ctx)})
    for batch in collector:
        ctx.send(batch, version=...)
        collector.receive_weights()       # between batches: the newest version, applied atomically, if there is one
"""

from typing import Any, Optional

from tensordict import TensorDict, TensorDictBase
from torchrl.weight_update.weight_sync_schemes import WeightSyncScheme as TorchRLWeightSyncScheme

from fabric_weightsync.receiver import WeightReceiver
from fabric_weightsync.worker import WorkerContext


class WeightReceiverScheme(TorchRLWeightSyncScheme):
    """TorchRL's ``WeightSyncScheme`` on the receiving side, for a collector inside a fabric_weightsync worker.

    Give it to the collector as ``weight_recv_schemes={"policy": WeightReceiverScheme(ctx)}``: when the collector
    registers it, it connects the collector's policy with ``ctx.connect`` (the policy then holds the trainer's
    weights, checked against the trainer's schema), and each ``collector.receive_weights()`` applies the newest
    pending update, or nothing, without waiting. The sending side is training rank 0's
    :class:`~fabric_weightsync.scheme.WeightSyncScheme`, which the strategy runs.

    Args:
        ctx: the worker's context.
        flatten_weights: see :meth:`WorkerContext.connect`.
    """

    def __init__(self, ctx: WorkerContext, *, flatten_weights: bool = True) -> None:
        super().__init__(strategy="tensordict")
        self._ctx = ctx
        self._flatten_weights = flatten_weights
        self.receiver: Optional[WeightReceiver] = None
        """The worker's receiver, once the collector connected the scheme (``receiver.version``: the policy version)."""

    @property
    def version(self) -> int:
        """The version of the weights the policy holds (the trainer's optimizer-step count)."""
        if self.receiver is None:
            raise RuntimeError("WeightReceiverScheme is not connected yet: give it to a collector as weight_recv_schemes")
        return self.receiver.version

    def create_transport(self, **kwargs: Any) -> Any:
        """TorchRL's hook for a sending side's transports; this scheme only receives, through the worker's own
        :class:`~fabric_weightsync.transport.DistributedTransport` that ``ctx.connect`` opens."""
        raise RuntimeError(
            "WeightReceiverScheme only receives; training rank 0's sender is run by WeightSyncStrategy (give the"
            " scheme to a collector as weight_recv_schemes, not weight_sync_schemes)"
        )

    def _init_on_receiver_impl(self, model_id: str, context: Any = None, **kwargs: Any) -> None:
        self._model_id = model_id
        self.context = context
        if kwargs.get("model") is not None:
            self.model = kwargs["model"]
        self.worker_idx = kwargs.get("worker_idx")

    def _setup_connection_and_weights_on_receiver_impl(self, *, worker_idx: Optional[int] = None) -> None:
        self.receiver = self._ctx.connect(self.model, flatten_weights=self._flatten_weights)

    def receive(self, timeout: Optional[float] = None) -> Optional[TensorDictBase]:
        """Apply the newest pending update (waiting up to ``timeout`` seconds for one if given); returns the policy's
        weights if one was applied, else ``None``."""
        if self.receiver is None:
            raise RuntimeError("WeightReceiverScheme is not connected yet: give it to a collector as weight_recv_schemes")
        applied = self.receiver.wait_for_update(timeout) if timeout else self.receiver.poll()
        return TensorDict.from_module(self.model) if applied else None
