"""Experience batches on the wire: their schema, the batch a training rank receives, and the path's errors.

A batch travels as one :class:`~fabric_weightsync.wire.WireBuffer`: header ``(version, worker_id)``, then every
leaf of the ``TensorDict`` in sorted key order. Nothing is pickled: the first batch's schema (keys, shapes,
dtypes, batch size) goes through the store as JSON and both ends build their buffers from it.
"""

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Union

import torch
from tensordict import TensorDict, TensorDictBase, is_leaf_nontensor, is_non_tensor

from fabric_weightsync.weights import SchemaMismatchError
from fabric_weightsync.wire import Layout, WireBuffer, describe_mismatch, dtype_of

EXPERIENCE_HEADER = ("version", "worker_id")
"""Header words of a batch: the policy version it was collected with, and the worker that sent it."""

Path = tuple[str, ...]


class ExperienceError(RuntimeError):
    """The experience path failed: no workers for this rank, a worker lost, or a transfer that did not complete."""


class ExperienceTimeout(ExperienceError):
    """A wait on the experience path ran out of time."""


class ExperienceSchemaError(ExperienceError, SchemaMismatchError):
    """A batch's keys, shapes or dtypes differ from the first batch that worker sent."""


@dataclass
class ExperienceBatch:
    """One batch of experience as a training rank receives it.

    Attributes:
        data: the ``TensorDict`` the worker sent (on CPU; its leaves share one buffer, owned by this batch).
        worker_id: the worker that collected it.
        version: the policy version it was collected with (the trainer's optimizer-step count).
    """

    data: TensorDict
    worker_id: int
    version: int


@dataclass(frozen=True)
class ExperienceRoutes:
    """Which training ranks each worker sends to: a node's workers send to that node's training ranks only, and
    there worker ``w`` and rank ``r`` are linked when ``w % m == r % m`` (node-local indices), with
    ``m = min(workers, training ranks)`` of a node.

    With at least as many workers as ranks, a worker sends to one rank only. With fewer, each rank hears exactly
    one worker, and a worker sends each batch to whichever of its ranks has room: every rank is fed, and ranks that
    take the same number of batches per update get them at the same pace.
    """

    num_workers: int
    num_training_ranks: int
    num_nodes: int = 1

    @property
    def _per_node(self) -> tuple[int, int, int]:
        """Workers and training ranks per node, and the period that links them."""
        workers, ranks = self.num_workers // self.num_nodes, self.num_training_ranks // self.num_nodes
        return workers, ranks, max(1, min(workers, ranks))

    def ranks_of(self, worker_id: int) -> list[int]:
        """The training ranks ``worker_id`` sends to."""
        workers, ranks, period = self._per_node
        node, local = divmod(worker_id, workers)
        return [node * ranks + r for r in range(ranks) if r % period == local % period]

    def workers_of(self, rank: int) -> list[int]:
        """The workers training rank ``rank`` receives from."""
        workers, ranks, period = self._per_node
        node, local = divmod(rank, ranks)
        return [node * workers + w for w in range(workers) if w % period == local % period]


def _display(path: Path) -> str:
    return repr(path[0]) if len(path) == 1 else repr(path)


@dataclass(frozen=True)
class ExperienceSchema:
    """Batch size, and key path, shape and dtype of every leaf in sorted key order: the layout of a message."""

    batch_size: tuple[int, ...]
    entries: tuple[tuple[Path, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, batch: TensorDictBase) -> "ExperienceSchema":
        """The schema of ``batch``; raises ``TypeError`` for leaves that are not tensors (they would need pickle)."""
        entries = []
        # Non-tensor leaves are listed too (by default they are skipped), so they fail loudly instead of vanishing.
        for key, value in batch.items(include_nested=True, leaves_only=True, is_leaf=is_leaf_nontensor):
            path = (key,) if isinstance(key, str) else tuple(key)
            if is_non_tensor(value) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Experience leaf {_display(path)} is a {type(value).__name__}, not a tensor: only tensors can be"
                    " sent (encode strings or objects as tensors)"
                )
            entries.append((path, tuple(value.shape), str(value.dtype).removeprefix("torch.")))
        return cls(tuple(batch.batch_size), tuple(sorted(entries)))

    @property
    def paths(self) -> list[Path]:
        return [path for path, _, _ in self.entries]

    @cached_property
    def layout(self) -> Layout:
        return Layout(EXPERIENCE_HEADER, self.entries)

    def to_json(self) -> str:
        return json.dumps({"batch_size": list(self.batch_size), "entries": [[list(p), list(s), d] for p, s, d in self.entries]})

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "ExperienceSchema":
        """The schema :meth:`to_json` wrote; ``ValueError`` for anything else."""
        try:
            raw = json.loads(text)
            schema = cls(
                tuple(int(n) for n in raw["batch_size"]),
                tuple((tuple(str(k) for k in p), tuple(int(n) for n in s), str(d)) for p, s, d in raw["entries"]),
            )
            for _, _, dtype in schema.entries:
                dtype_of(dtype)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not an experience schema: {err}") from err
        return schema

    def mismatch(self, other: "ExperienceSchema") -> Optional[str]:
        """What differs in ``other`` (a later batch) from this (the first batch), naming each key; ``None`` if equal."""
        if self == other:
            return None
        as_map = lambda schema: {p: (s, d) for p, s, d in schema.entries}  # noqa: E731
        problems = [] if self.batch_size == other.batch_size else [
            f"batch_size: first batch {list(self.batch_size)}, this batch {list(other.batch_size)}"
        ]  # fmt: skip
        keys = describe_mismatch(as_map(self), as_map(other), "first batch", "this batch", show_key=_display)
        return "; ".join(problems + ([keys] if keys else []))

    def wire(self) -> WireBuffer:
        """A zeroed host buffer of this layout, the same bytes layout on both ends."""
        return WireBuffer.allocate(self.layout)

    def unpack(self, storage: torch.Tensor) -> ExperienceBatch:
        """The batch a received ``storage`` holds, its leaves viewing that storage (no copy)."""
        wire = WireBuffer(self.layout, storage)
        data = TensorDict({}, batch_size=self.batch_size)
        for path, view in zip(self.paths, wire.tensors):
            data.set(path, view)
        return ExperienceBatch(data=data, worker_id=wire.word(1), version=wire.word(0))
