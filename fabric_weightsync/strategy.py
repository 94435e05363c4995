"""``WeightSyncStrategy``: DDP over the training processes, plus inference workers launched next to them."""

import atexit
import copy
import functools
import importlib
import logging
import os
import sys
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.connector import _is_using_cli
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from fabric_weightsync.control import ControlPlane
from fabric_weightsync.environment import ProcessLayout, TrainingWorldEnvironment
from fabric_weightsync.experience import ExperienceRoutes
from fabric_weightsync.experience_stream import ExperienceStream
from fabric_weightsync.health import FAILURE_POLICIES, FailurePolicy, WorkerFailedError
from fabric_weightsync.launchers import TrainingCrash, WeightSyncScriptLauncher, WeightSyncSpawnLauncher
from fabric_weightsync.messages import MessagePublisher
from fabric_weightsync.relay import Relay
from fabric_weightsync.protocol import END_GRACE_S, SLOW_POLL_S, poll_until, worker_keys
from fabric_weightsync.scheme import TRANSPORTS, WeightSyncScheme, split_transport
from fabric_weightsync.transport import DEFAULT_TIMEOUT
from fabric_weightsync.worker import WorkerContext
from fabric_weightsync.worker_process import WorkerSpec
from fabric_weightsync.worker_logs import WorkerLogCollector

WorkerFn = Callable[[WorkerContext], Any]

log = logging.getLogger(__name__)

EXPERIENCE_CLOSE_S = 2.0
"""Seconds a training rank gives its experience receivers to finish at shutdown."""

WORKER_FN_ENV = "FABRIC_WEIGHTSYNC_WORKER_FN"
WORKERS_ENV = "FABRIC_WEIGHTSYNC_INFERENCE_WORKERS"
START_METHODS = ("popen", "spawn", "fork", "forkserver")


class WeightSyncStrategy(DDPStrategy):
    """DDP over Fabric's ``devices`` training processes, plus ``inference_workers`` worker processes per node.

    Each worker runs ``worker_fn(ctx)`` with a :class:`~fabric_weightsync.worker.WorkerContext`; it never runs
    the code after ``fabric.launch()``. Training processes form a DDP world of their own: ``fabric.world_size``,
    gradient averaging, ``barrier``/``all_reduce`` and samplers behave as in plain DDP while workers are alive.
    Training rank 0 hosts the control store and a :class:`~fabric_weightsync.scheme.WeightSyncScheme` that
    serves the first module given to ``fabric.setup`` (or the one passed to :meth:`sync_module`).

    Launch modes: ``python train.py`` with ``fabric.launch()`` (``start_method="popen"``, the default),
    ``fabric.launch(fn)`` with ``start_method="spawn" | "fork" | "forkserver"``, ``torchrun
    --nproc-per-node=devices+inference_workers``, SLURM ``--ntasks-per-node=devices+inference_workers``, and
    Lightning's CLI ``fabric run --devices=devices`` (no ``fabric.launch()``, as the CLI requires: local rank 0 of
    each node starts its workers inside ``Fabric(...)``). On each node, local ranks ``0..devices-1`` train and
    the rest are workers.

    Registered in Fabric's strategy registry as ``"ddp_weightsync"`` (and ``"ddp_weightsync_spawn"``); those
    names read the worker function from ``FABRIC_WEIGHTSYNC_WORKER_FN`` (``"package.module:function"``) and
    the count from ``FABRIC_WEIGHTSYNC_INFERENCE_WORKERS``.

    Args:
        worker_fn: what each worker runs; a ``"module:function"`` string is imported. Give it arguments with
            ``functools.partial(fn, args=...)``. Must be picklable (module level, and so must a partial's arguments)
            with ``start_method="spawn"``.
        inference_workers: worker processes per node.
        transport: data plane of the weights: ``"auto"`` (default: shared memory for workers on training rank 0's
            host, gloo for the others), ``"shm"``, ``"gloo"`` (forced, any host) or ``"nccl"`` (CUDA, one GPU
            per process).
        worker_device: device of the workers' policies (``ctx.device``); ``"cuda"`` gives worker ``i`` of a node
            GPU ``(devices + i) % torch.cuda.device_count()``.
        sync_timeout: seconds for each blocking step of a weight transfer and of connecting (default 60).
        heartbeat_timeout: seconds without a heartbeat before a worker is declared dead (default 10).
        on_worker_failure: ``"raise"`` (default) fails training at the next push, naming the worker;
            ``"continue"`` logs it and keeps training with the survivors.
        shutdown_timeout: seconds training rank 0 waits for the final delivery and for workers to exit.
        checksum: stamp every update with a CRC32 that workers verify before applying (off by default).
        flatten_weights: on training rank 0, move the synced module's weights into one storage once, so each
            push is a single copy (the ``Parameter`` objects stay the same; see
            :class:`~fabric_weightsync.flat.FlatWeights`). Turn it off if something relies on the weights'
            memory addresses (a numpy view, a CUDA graph captured before ``fabric.setup``).
        wait_for_workers: training rank 0's ``fabric.setup`` of the synced module returns only once every worker
            holds the initial weights or is gone (failed or finished), so training starts with its workers (the
            other training ranks wait for rank 0 in their first collective). ``False``: training starts at once
            and workers join whenever they are ready.
        ready_timeout: seconds that wait may take (default: ``sync_timeout``); then ``on_worker_failure="raise"``
            raises ``TimeoutError`` naming each missing worker and how far it got, ``"continue"`` logs it and
            starts without them.
        serve_replicas: with several nodes, each node's local training rank 0 serves that node's workers. By default
            from its own DDP replica of the synced module, so no weights cross the network: under DDP every training
            rank holds the same weights after each optimizer step. ``False`` where that does not hold (weights
            changed on some ranks only): global rank 0's weights are relayed, crossing to each node once per version
            (see :mod:`~fabric_weightsync.relay`; not with ``transport="nccl"``).
        verify_replicas: when serving replicas, every N-th version each node's sender checksums the weights it pushed
            and global rank 0 compares them, raising :class:`~fabric_weightsync.ReplicaMismatchError`
            naming the node at its next push if they differ (off by default: a checksum reads all the weights, on a
            thread of each node's sender).
        **ddp_kwargs: everything :class:`~lightning.fabric.strategies.DDPStrategy` accepts.
    """

    def __init__(
        self,
        worker_fn: Union[WorkerFn, str, None] = None,
        inference_workers: Optional[int] = None,
        *,
        transport: Literal["auto", "shm", "gloo", "nccl"] = "auto",
        worker_device: Union[str, torch.device] = "cpu",
        sync_timeout: float = DEFAULT_TIMEOUT,
        heartbeat_timeout: float = 10.0,
        on_worker_failure: FailurePolicy = "raise",
        shutdown_timeout: float = 60.0,
        checksum: bool = False,
        flatten_weights: bool = True,
        wait_for_workers: bool = True,
        ready_timeout: Optional[float] = None,
        serve_replicas: bool = True,
        verify_replicas: Optional[int] = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        worker_fn = worker_fn if worker_fn is not None else os.environ.get(WORKER_FN_ENV)
        if worker_fn is None:
            raise ValueError(f"WeightSyncStrategy needs a worker_fn (or {WORKER_FN_ENV}='package.module:function')")
        if inference_workers is None:
            inference_workers = int(os.environ.get(WORKERS_ENV, "1"))
        _check_choice("transport", transport, tuple(TRANSPORTS))
        _check_choice("on_worker_failure", on_worker_failure, FAILURE_POLICIES)
        _check_choice("start_method", start_method, START_METHODS)
        if isinstance(inference_workers, bool) or not isinstance(inference_workers, int) or inference_workers < 1:
            raise ValueError(f"inference_workers must be an integer of at least 1, got {inference_workers!r}")
        self.worker_fn = _import_worker_fn(worker_fn) if isinstance(worker_fn, str) else worker_fn
        if not callable(self.worker_fn):
            raise TypeError(f"worker_fn must be a function taking a WorkerContext (or 'module:function'), got {worker_fn!r}")
        if verify_replicas is not None and (isinstance(verify_replicas, bool) or not isinstance(verify_replicas, int) or verify_replicas < 1):
            raise ValueError(f"verify_replicas must be an integer of at least 1 (check every N-th version) or None, got {verify_replicas!r}")
        if start_method in ("spawn", "forkserver"):
            _check_picklable(self.worker_fn, start_method)
        super().__init__(start_method=start_method, **ddp_kwargs)
        self.inference_workers = inference_workers
        self.transport = transport
        self.worker_device = torch.device(worker_device)
        self.sync_timeout = sync_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.on_worker_failure = on_worker_failure
        self.shutdown_timeout = shutdown_timeout
        self.checksum = checksum
        self.flatten_weights = flatten_weights
        self.wait_for_workers = wait_for_workers
        self.ready_timeout = sync_timeout if ready_timeout is None else ready_timeout
        self.serve_replicas = serve_replicas
        self.verify_replicas = verify_replicas
        self.crash = TrainingCrash()
        self._control: Optional[ControlPlane] = None
        self._scheme: Optional[WeightSyncScheme] = None
        self._relay: Optional[Relay] = None
        self._experience: Optional[ExperienceStream] = None
        self._publisher: Optional[MessagePublisher] = None
        self._worker_logs: Optional[WorkerLogCollector] = None
        self._log_sinks: list = []
        self._shut_down = False
        self._exit_hooked = False
        self.policy_version = 0
        """The version of the weights on this training rank: steps of the trigger optimizer (counted by
        :class:`WeightSyncCallback`), plus one for each :meth:`push` that came without a step since the previous push."""
        self._pushed_version = 0

    @property
    def layout(self) -> ProcessLayout:
        return ProcessLayout(self.num_processes, self.inference_workers, self.num_nodes)

    @property
    def scheme(self) -> Optional[WeightSyncScheme]:
        """This node's sender, on each node's local training rank 0 (``None`` on other ranks, before ``fabric.launch``,
        and on a node whose relay serves rank 0's weights). Global rank 0's lists every worker's status."""
        return self._scheme

    @property
    def serves_node(self) -> bool:
        """Whether this training rank serves its node's workers: each node's local rank 0 (on one node: rank 0)."""
        return self.local_rank == 0

    def worker_spec(self) -> WorkerSpec:
        """What launchers need to run this node's workers."""
        backend = split_transport(self.transport).backend
        return WorkerSpec(self.worker_fn, self.layout, backend, self.sync_timeout, self.worker_device)

    # ------------------------------------------------------------------ launching
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not isinstance(self.cluster_environment, TrainingWorldEnvironment):
            self.cluster_environment = TrainingWorldEnvironment(self.cluster_environment, self.layout)
        if self._start_method == "popen" or _is_using_cli():  # under fabric run, the CLI created the processes
            self._launcher = WeightSyncScriptLauncher(self.cluster_environment, self.worker_spec(), self.shutdown_timeout, self.crash)
        else:
            self._launcher = WeightSyncSpawnLauncher(self, self._start_method, self.worker_spec(), self.shutdown_timeout, self.with_shutdown)

    @override
    def setup_environment(self) -> None:
        if _is_using_cli():  # fabric run: Fabric(...) calls this instead of launching, so workers branch off here
            self._launcher.start_cli_workers()
        super().setup_environment()
        if self.global_rank == 0:
            self._control = ControlPlane.serve(self._main_address(), self.cluster_environment.main_port, self.sync_timeout)
        if self.serves_node:
            self._scheme = self._new_scheme()
            self.crash.install()
        if not self._exit_hooked:  # one hook, whose steps run in a fixed order (see _at_exit)
            self._exit_hooked = True
            atexit.register(self._at_exit)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        wrapped = super().setup_module(module)
        if self._scheme is not None and self._scheme.module is None:
            self._serve(module)
        return wrapped

    def _new_scheme(self) -> WeightSyncScheme:
        """This node's sender of its workers (global rank 0's also mirrors the other nodes' workers and serves their
        relays when replicas are not served)."""
        layout, node = self.layout, self.node_rank
        others = range(1, layout.num_nodes) if node == 0 else range(0)
        if not self.serve_replicas and others and split_transport(self.transport).backend == "nccl":
            raise ValueError("serve_replicas=False relays rank 0's weights through host memory: use transport='auto' or 'gloo'")
        return WeightSyncScheme(
            self.control_plane(),
            layout.num_workers,
            transport=self.transport,
            timeout=self.sync_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            # Global rank 0 applies the failure policy for every worker; a node sender reports its workers there.
            on_worker_failure=self.on_worker_failure if self.global_rank == 0 else "continue",
            checksum=self.checksum,
            flatten_weights=self.flatten_weights,
            served=layout.node_workers(node),
            node_rank=node,
            mirrored={n: layout.node_workers(n) for n in others},
            relays=() if self.serve_replicas else others,
            verify_replicas=self.verify_replicas if self.serve_replicas else None,
            num_nodes=layout.num_nodes,
        )

    def sync_module(self, module: nn.Module) -> None:
        """Serve ``module`` instead of the first module set up (call before the workers connect)."""
        if self._scheme is not None and self._scheme.module is not module:
            if self._scheme.module is not None:
                raise RuntimeError("sync_module() must be called before the first fabric.setup() of a module")
            self._serve(module)

    def push(self) -> int:
        """Push the synced module's current weights to every worker as a new version; returns the version.

        Call it on every training rank (the same code runs everywhere): rank 0 stages the weights, one copy and no
        wait on any worker, the others only count the version. The version is :attr:`policy_version`, made one
        more than the last push's if no optimizer step came since, so it always grows. With
        ``WeightSyncCallback(every_n_steps=None)`` (or no callback) these are the only pushes during training, e.g.
        one at the end of each update of an on-policy (lockstep) loop. Raises
        :class:`~fabric_weightsync.health.WorkerFailedError` for a failed worker under ``on_worker_failure="raise"``.
        """
        version = self.policy_version = self._pushed_version = max(self.policy_version, self._pushed_version + 1)
        if self._scheme is not None:
            if self._scheme.module is None:
                raise RuntimeError("push() needs the synced module: call fabric.setup(module) first")
            self._scheme.push(version)
        return version

    def publish(self, **values: Any) -> None:
        """Send ``values`` to every worker, where ``ctx.messages`` returns the newest value of each key published.

        Latest wins per key, e.g. ``fabric.strategy.publish(budget_reached=True, epsilon=0.1)``. Values are ``None``,
        bools, ints, floats, strings and small tensors (see :mod:`~fabric_weightsync.messages` for the limits);
        anything else raises naming its key, on every training rank. Rank 0's values are the ones workers see, so
        the same code may run on every rank. Costs rank 0 one store write.
        """
        if self._publisher is None:
            if self.global_rank == 0 and self._control is None:
                raise RuntimeError("publish() works once fabric.launch() has run")
            self._publisher = MessagePublisher(self._control.store if self.global_rank == 0 else None)
        self._publisher.publish(values)

    def _serve(self, module: nn.Module) -> None:
        """Serve ``module`` (a relay node: rank 0's copy of it); global rank 0 also waits for every worker to hold it
        unless told not to."""
        if not self.serve_replicas and self.node_rank > 0:
            relay_copy = copy.deepcopy(module).cpu().requires_grad_(False)
            self._relay = Relay(self._scheme, relay_copy, self._control, self.node_rank, self.layout.num_workers, "gloo", self.sync_timeout)
            self._relay.start()
            self._scheme = None  # this rank's own weights are not what its node serves: its pushes stage nothing
            return
        self._scheme.start(module)
        if not self.wait_for_workers or self.global_rank != 0:
            return
        missing = self._scheme.wait_until_ready(self.ready_timeout)
        if not missing:
            return
        named = "; ".join(f"worker {status.worker_id}: {status.progress()}" for status in missing)
        message = (
            f"Inference workers not ready {self.ready_timeout:g}s after training rank 0 set up the synced module ({named})."
            " Pass a larger ready_timeout to WeightSyncStrategy, or wait_for_workers=False to start training without them"
        )
        if self.on_worker_failure == "raise":
            raise TimeoutError(message)
        log.warning("fabric_weightsync: %s; training starts now, they are served when they connect", message)

    @property
    def routes(self) -> ExperienceRoutes:
        """Which training ranks each worker's experience goes to (``routes.workers_of(fabric.global_rank)``: the
        workers this rank's stream receives from)."""
        layout = self.layout
        return ExperienceRoutes(layout.num_workers, layout.devices * layout.num_nodes, layout.num_nodes)

    def experience(self, **kwargs: Any) -> ExperienceStream:
        """This training rank's stream of experience batches sent by its workers (see :class:`ExperienceStream`).

        Created on first call with ``kwargs`` (``capacity``, ``max_staleness``, ``timeout``); later calls return
        the same stream. ``capacity`` (batches held on this rank, default two per worker of the rank) bounds the
        memory and how far workers get ahead before they block in ``ctx.send``.
        """
        if self._experience is None:
            self._experience = ExperienceStream(
                rank=self.global_rank,
                routes=self.routes,
                open_store=self.control_plane().client,
                policy_version=lambda: self.policy_version,
                on_worker_failure=self.on_worker_failure,
                sync_timeout=self.sync_timeout,
                **kwargs,
            )
        return self._experience

    def log_worker_metrics_to(self, loggers: list) -> None:
        """On training rank 0, write what workers log (``ctx.log_dict``) to ``loggers``: after each optimizer step
        (:meth:`forward_worker_logs`) and at the end of training. ``WeightSyncCallback`` passes Fabric's loggers at
        ``fabric.setup``. Other ranks ignore it."""
        if self._control is None or self.global_rank != 0:
            return
        self._log_sinks = loggers  # Fabric's own list: loggers added to it later are written to too
        if self._worker_logs is None:
            self._worker_logs = WorkerLogCollector(self._control.client, self.layout.num_workers)

    def forward_worker_logs(self) -> None:
        """Write the worker metrics received so far to the loggers (training rank 0; a no-op elsewhere)."""
        if self._worker_logs is not None:
            self._worker_logs.forward(self._log_sinks)

    def control_plane(self) -> ControlPlane:
        """The control plane: hosted on training rank 0, joined on demand by every other process."""
        if self._control is None:
            self._control = ControlPlane.join(self._main_address(), self.cluster_environment.main_port, self.sync_timeout)
        return self._control

    # ------------------------------------------------------------------ shutdown
    def with_shutdown(self, function: Callable) -> Callable:
        """``function`` followed by :meth:`shutdown` (spawn mode: the training function's end is training's end)."""

        @functools.wraps(function)
        def train_then_shut_down(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except BaseException:
                self.crash.crashed = True
                raise
            finally:
                self.shutdown()

        return train_then_shut_down

    def shutdown(self) -> None:
        """End of training: every sender delivers the last version to its live workers, then global rank 0 stops
        them all and waits for them; every rank stops its experience receivers.

        Runs once, at the end of the training function (spawn) or at interpreter exit (script, torchrun, SLURM).
        After a crash of the training code the final delivery is skipped and workers are stopped at once.
        """
        if self._shut_down:
            return
        self._shut_down = True
        scheme, control = self._scheme, self._control if self.global_rank == 0 else None
        if scheme is not None:
            if scheme.module is not None and not self.crash.crashed:
                if not scheme.flush(self.shutdown_timeout):
                    log.warning("fabric_weightsync: some workers did not take the final version in time")
            scheme.close()
        if self._relay is not None:
            self._relay.close(0.0 if self.crash.crashed else self.shutdown_timeout)
        if scheme is not None and control is not None:
            control.request_stop()
            # Workers deliver their last metrics before they report their exit: keep writing them to make room.
            _wait_for_exits(control, scheme, self.shutdown_timeout, meanwhile=self.forward_worker_logs)
            self._close_worker_logs(control)
            control.close()
        # A daemon thread still inside a store call when the interpreter finalizes aborts the process.
        if self._experience is not None:
            self._experience.close(wait=EXPERIENCE_CLOSE_S)
        if scheme is not None and control is not None and not self.crash.crashed:
            scheme.report_late_failures()
            scheme.raise_if_failed()  # a failure after the last push must still fail the run

    def _at_exit(self) -> None:
        """At interpreter exit: :meth:`shutdown`, then wait for this node's children; only ``os._exit`` can still make
        the exit code non-zero here, which a worker failure after the last push must do."""
        failure = None
        try:
            self.shutdown()
        except WorkerFailedError as err:
            failure = err
        if isinstance(self._launcher, WeightSyncScriptLauncher):
            self._launcher.join_children()
        if failure is not None:
            print(f"[fabric_weightsync] {failure}", file=sys.stderr, flush=True)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(1)

    def _close_worker_logs(self, control: ControlPlane) -> None:
        """Write the workers' last metrics (they delivered them before exiting); with nowhere to write them, say so."""
        if self._worker_logs is not None:
            try:
                self._worker_logs.close(self._log_sinks)
            except Exception as err:  # noqa: BLE001 - a failing logger must not stop the rest of the shutdown
                rank_zero_warn(f"fabric_weightsync: writing the workers' last metrics to the loggers failed: {err!r}")
            return
        left = WorkerLogCollector(control.client, self.layout.num_workers, start=False)
        if left.collect():
            rank_zero_warn(
                "fabric_weightsync: workers logged metrics (ctx.log_dict) that were not written anywhere: training rank 0"
                " writes them to Fabric's loggers with WeightSyncCallback, after fabric.setup"
            )

    # ------------------------------------------------------------------ helpers
    def _main_address(self) -> str:
        return self.cluster_environment.main_address

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("ddp_weightsync", "popen"), ("ddp_weightsync_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"DDP plus inference workers with weight sync, start_method={start_method!r}",
                start_method=start_method,
            )


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_picklable(worker_fn: Callable, start_method: str) -> None:
    """A spawned worker receives ``worker_fn`` pickled (by multiprocessing): say so now, not after every process started."""
    try:
        ForkingPickler.dumps(worker_fn)  # what spawn does with it; nothing here is ever unpickled
    except Exception as err:  # noqa: BLE001 - PicklingError, or whatever the object's reducer raises
        raise ValueError(
            f"worker_fn {getattr(worker_fn, '__qualname__', worker_fn)!r} cannot be sent to a worker started with"
            f" start_method={start_method!r} ({err}): define it at module level (importable), pass"
            " 'package.module:function', or use start_method='fork'"
        ) from err


def _wait_for_exits(control: ControlPlane, scheme: WeightSyncScheme, timeout: float, meanwhile: Callable[[], None]) -> None:
    """Wait for the exit report of every live worker, calling ``meanwhile`` between looks; a worker that failed
    gets a short grace too (one refused at connect still has to read why from this rank's store)."""
    live = [worker_keys(status.rank).exit for status in scheme.workers if status.alive]
    failed = [worker_keys(status.rank).exit for status in scheme.workers if not status.alive]
    if not live and not failed:
        return
    client = control.client()
    grace_ends = time.monotonic() + min(END_GRACE_S, timeout)

    def exited() -> bool:
        meanwhile()
        return client.check(live) and (time.monotonic() >= grace_ends or client.check(failed))

    try:
        if poll_until(exited, timeout, max_pause=SLOW_POLL_S):
            return
    except Exception:  # noqa: BLE001 - the store is unreachable; nothing left to wait for
        pass
    rank_zero_info("fabric_weightsync: some workers did not exit in time after the stop request")


def _import_worker_fn(path: str) -> WorkerFn:
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"worker_fn {path!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)
