"""Asynchronous RL with Lightning Fabric: inference workers as extra ranks, policy weights pushed after each step."""

from lightning.fabric.strategies import STRATEGY_REGISTRY

from fabric_weightsync.callbacks import WeightSyncCallback
from fabric_weightsync.experience import (
    ExperienceBatch,
    ExperienceError,
    ExperienceRoutes,
    ExperienceSchemaError,
    ExperienceTimeout,
)
from fabric_weightsync.experience_stream import ExperienceStream
from fabric_weightsync.health import WorkerFailedError
from fabric_weightsync.replicas import ReplicaMismatchError
from fabric_weightsync.scheme import WeightSyncScheme
from fabric_weightsync.strategy import WeightSyncStrategy
from fabric_weightsync.transport import DistributedTransport, TransportError
from fabric_weightsync.weights import SchemaMismatchError, WeightSchema, WeightStrategy, make_wire_buffer
from fabric_weightsync.wire import WireBuffer
from fabric_weightsync.receiver import WeightReceiver
from fabric_weightsync.worker import WorkerContext

WeightSyncStrategy.register_strategies(STRATEGY_REGISTRY)

__all__ = [
    "DistributedTransport",
    "ExperienceBatch",
    "ExperienceError",
    "ExperienceRoutes",
    "ExperienceSchemaError",
    "ExperienceStream",
    "ExperienceTimeout",
    "ReplicaMismatchError",
    "SchemaMismatchError",
    "TransportError",
    "WeightReceiver",
    "WeightSchema",
    "WeightStrategy",
    "WeightSyncCallback",
    "WeightSyncScheme",
    "WeightSyncStrategy",
    "WireBuffer",
    "WorkerContext",
    "WorkerFailedError",
    "make_wire_buffer",
]
