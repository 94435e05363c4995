"""Trainer-to-worker messages: a small, latest-wins dict of scalars, strings and small tensors.

Training rank 0 publishes (``fabric.strategy.publish(budget_reached=True, epsilon=0.1)``); a worker reads the newest
value of every key published so far with ``ctx.messages``. The whole dict travels as one JSON value under
:data:`~fabric_weightsync.protocol.MESSAGES_KEY`: nothing is pickled, and a value JSON cannot carry, or one too big
for a control key, is refused where it is published, naming its key.

Cost on the worker: each read of ``ctx.messages`` is one store round trip (a ``get`` of that one small key, like
``ctx.stop_requested``'s ``check``); the JSON is decoded again only when it changed. Read it once per rollout, not
once per environment step.
"""

import json
import logging
from typing import Any, Optional

import torch

from fabric_weightsync.auth import ControlStore
from fabric_weightsync.protocol import MESSAGES_KEY
from fabric_weightsync.wire import dtype_of

log = logging.getLogger(__name__)

MAX_TENSOR_ELEMENTS = 1024
"""Elements of one tensor value at most: messages are for flags and schedules, weights and experience have their own paths."""
MAX_STRING_CHARS = 1024
"""Characters of one string value at most."""
MAX_MESSAGES_BYTES = 64 * 1024
"""Bytes of the JSON of all values together at most (it is rewritten whole at each publish and read whole)."""


def encode(key: str, value: Any) -> Any:
    """``value`` as JSON can carry it: ``None``, a bool, int, float or string as it is, a tensor as
    ``{"dtype", "shape", "data"}``; ``TypeError`` or ``ValueError`` naming ``key`` for anything else or anything too big."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise ValueError(f"publish(): {key!r} is a string of {len(value)} characters; a message carries at most {MAX_STRING_CHARS}")
        return value
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.is_quantized or value.layout != torch.strided:
            raise TypeError(f"publish(): {key!r} is a {value.dtype} {value.layout} tensor; messages carry dense real or bool tensors")
        if value.numel() > MAX_TENSOR_ELEMENTS:
            raise ValueError(
                f"publish(): {key!r} is a tensor of {value.numel()} elements; a message carries at most {MAX_TENSOR_ELEMENTS}"
                " (weights and experience have their own paths)"
            )
        data = value.detach().to("cpu").flatten().tolist()
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "data": data}
    raise TypeError(
        f"publish(): {key!r} is a {type(value).__name__}; messages carry None, bools, ints, floats, strings and small"
        " tensors (convert numpy values with float() or torch.as_tensor())"
    )


def decode(value: Any) -> Any:
    """The value :func:`encode` wrote; ``ValueError`` (or ``TypeError``/``KeyError``) for anything else."""
    if isinstance(value, dict):
        shape = [int(n) for n in value["shape"]]
        return torch.tensor(value["data"], dtype=dtype_of(value["dtype"])).reshape(shape)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"a {type(value).__name__} is not a message value")


class MessagePublisher:
    """The trainer's end: checks values on every training rank, and on rank 0 writes the merged dict to the store.

    Args:
        store: the control store on training rank 0; ``None`` on the other ranks, whose publishes are only checked
            (the same training code runs everywhere and rank 0's values are the ones workers see).
    """

    def __init__(self, store: Optional[ControlStore]) -> None:
        self._store = store
        self._values: dict[str, Any] = {}

    def publish(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the published dict (latest wins per key); all or nothing."""
        merged = {**self._values, **{key: encode(key, value) for key, value in values.items()}}
        text = json.dumps(merged)
        if len(text) > MAX_MESSAGES_BYTES:
            raise ValueError(
                f"publish(): with {', '.join(map(repr, values))} the messages take {len(text)} bytes of JSON; at most"
                f" {MAX_MESSAGES_BYTES} (publish fewer or smaller values)"
            )
        if self._store is not None:
            self._store.set(MESSAGES_KEY, text.encode())
        self._values = merged


class MessageReader:
    """A worker's end: the newest values, decoded again only when the store holds something new.

    A value that does not decode is skipped with one warning naming its key; if the store is gone (training rank 0
    died) the last values read are kept. Never raises.
    """

    def __init__(self, store: ControlStore, worker_id: int) -> None:
        self._store = store
        self._worker_id = worker_id
        self._raw: Optional[bytes] = None
        self._values: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            raw = self._store.read(MESSAGES_KEY)  # never blocks: unset, or not signed by this run, reads as None
        except RuntimeError:  # the store went with training rank 0: its last word stands
            return dict(self._values)
        if raw is not None and raw != self._raw:
            self._raw = raw
            self._values = self._parse(raw)
        return dict(self._values)

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            published = json.loads(raw)
            if not isinstance(published, dict):
                raise ValueError(f"a {type(published).__name__}, not an object")
        except ValueError as err:
            log.warning("fabric_weightsync: worker %d ignores store key %r: %s", self._worker_id, MESSAGES_KEY, err)
            return self._values
        values = {}
        for key, value in published.items():
            try:
                values[key] = decode(value)
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                log.warning("fabric_weightsync: worker %d ignores message %r (store key %r): %s", self._worker_id, key, MESSAGES_KEY, err)
        return values
