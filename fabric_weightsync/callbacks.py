"""``WeightSyncCallback``: the trainer-side Fabric callback that pushes the policy after optimizer steps."""

from typing import Any, Optional

from lightning.fabric.strategies import Strategy
from torch.optim import Optimizer

from fabric_weightsync.strategy import WeightSyncStrategy


class WeightSyncCallback:
    """Pushes the synced module's weights to every inference worker after optimizer steps.

    Fabric calls :meth:`on_after_optimizer_step` after every ``optimizer.step()``. Each step of the trigger
    optimizer adds one to the version (:attr:`WeightSyncStrategy.policy_version`); every ``every_n_steps``-th,
    training rank 0 stages the weights (one copy, no waiting on any worker), and it writes the metrics workers
    logged since (``ctx.log_dict``) to Fabric's loggers. The run's end (``fabric.call("on_train_end")``, or
    automatically when the training code finishes) delivers the last version to every live worker.

    Args:
        every_n_steps: push every n-th step of the trigger optimizer; the final version is always delivered.
            ``None``: never after a step, only when the training code calls ``fabric.strategy.push()``, e.g. once
            per update of an on-policy (lockstep) loop, whose workers then never collect with a half-updated policy.
        optimizer: the optimizer whose steps count and trigger pushes (raw or as returned by
            ``fabric.setup``; or set :attr:`trigger_optimizer` later). Default: the first optimizer that steps,
            so with several optimizers (e.g. actor and critic) there is still one push per training step.
    """

    def __init__(self, every_n_steps: Optional[int] = 1, optimizer: Optional[Optimizer] = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an integer of at least 1, or None (push only on push()), got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.step = 0
        self._trigger = _unwrap(optimizer) if optimizer is not None else None
        self._strategy: Optional[WeightSyncStrategy] = None

    @property
    def trigger_optimizer(self) -> Optional[Optimizer]:
        """The optimizer whose steps count; settable once it exists (``Fabric`` needs the callback before)."""
        return self._trigger

    @trigger_optimizer.setter
    def trigger_optimizer(self, optimizer: Optimizer) -> None:
        self._trigger = _unwrap(optimizer)

    def on_after_setup(self, fabric: Any, module: Any) -> None:
        """Training rank 0 writes what workers log (``ctx.log_dict``) to this Fabric's loggers."""
        if isinstance(fabric.strategy, WeightSyncStrategy):
            fabric.strategy.log_worker_metrics_to(fabric.loggers)

    def on_after_optimizer_step(self, strategy: Strategy, optimizer: Optimizer) -> None:
        if not isinstance(strategy, WeightSyncStrategy):
            raise TypeError(f"WeightSyncCallback needs Fabric(strategy=WeightSyncStrategy(...)), got {type(strategy).__name__}")
        self._strategy = strategy
        optimizer = _unwrap(optimizer)
        if self._trigger is None:
            self._trigger = optimizer
        if optimizer is not self._trigger:
            return
        self.step += 1
        strategy.policy_version += 1
        strategy.forward_worker_logs()
        scheme = strategy.scheme
        if scheme is not None and scheme.module is None:
            return  # nothing is synced yet
        if self.every_n_steps is not None and self.step % self.every_n_steps == 0:
            strategy.push()
        elif scheme is not None:
            scheme.note(strategy.policy_version)

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        """Deliver the last version now, and write the worker metrics received so far (both also done
        automatically when training ends)."""
        strategy = self._strategy
        if strategy is not None:
            strategy.forward_worker_logs()
        scheme = strategy.scheme if strategy is not None else None
        if scheme is not None and scheme.module is not None:
            scheme.note(strategy.policy_version)
            scheme.flush()


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)
