"""A module's weights re-homed into one storage laid out like the wire: staging or applying an update is one copy.

A module's parameters and buffers normally live in as many allocations as there are tensors; copying them into
a staging buffer then costs one kernel launch (or one loop iteration of ``_foreach_copy_``) per tensor, which is
what dominates the push of a small policy. :class:`FlatWeights` moves each tensor's data into a slice of a single
storage with exactly the wire buffer's layout (``p.data = slice``: the ``Parameter`` objects, and so the
optimizer's and DDP's references to them, stay the same), after which a push copies one contiguous byte range.

On a worker the same move makes the policy's storage a wire buffer itself: an update received into a private
landing buffer is applied by pointing the tensors at it (:meth:`FlatWeights.swap`, about 0.3 us per tensor
instead of a copy of every byte), and the policy's former storage becomes the next landing buffer.

Only plain tensors are moved: strided, contiguous, owning their whole storage, not shared with another process
and all on one device. Anything else (a view of another tensor, a channels-last weight, a tensor subclass, a
``share_memory()`` module) keeps its memory and the scheme copies tensor by tensor, as before.
"""

import ctypes
from typing import Callable, NamedTuple, Optional

import torch
from tensordict import TensorDictBase
from torch import nn

from fabric_weightsync.weights import WEIGHTS_KEY, LayoutProbe, WeightSchema, weights_offset, wire_nbytes, wire_storage, wire_views


class FlatWeights:
    """``module``'s weights living in one wire-layout storage; :meth:`stage_into` copies them in one go."""

    def __init__(self, module: nn.Module, schema: WeightSchema, wire: TensorDictBase, sources: list[torch.Tensor]) -> None:
        self.wire = wire
        """The wire buffer whose storage the weights live in (its header is not theirs)."""
        self._sources = sources
        self._span = slice(weights_offset(), wire_storage(wire).numel())
        self._weights_bytes = wire_storage(wire)[self._span]
        self._layouts: dict[int, _Layout] = {}
        self._chunk_lists: dict[int, tuple[TensorDictBase, list[tuple[torch.Tensor, torch.Tensor, int]]]] = {}
        self.probe = LayoutProbe(module, schema, sources, pin_addresses=True)
        """Whether every weight still is the same tensor at its place in :attr:`wire` (a few us per push)."""

    @property
    def storage(self) -> torch.Tensor:
        return wire_storage(self.wire)

    @classmethod
    def adopt(cls, module: nn.Module, schema: WeightSchema, sources: list[torch.Tensor]) -> Optional["FlatWeights"]:
        """Move ``sources`` (``module``'s weights in schema order) into one storage; ``None`` if they can't be.

        Weights that already share one storage in the wire layout (moved by an earlier adoption, e.g. before a
        worker reconnected) are taken where they are.
        """
        if not sources or len({t.device for t in sources}) != 1:
            return None
        wire = _wire_holding(schema, sources)
        if wire is not None:
            return cls(module, schema, wire, sources)
        if not all(map(_is_plain, sources)):
            return None
        storage = torch.empty(wire_nbytes(schema), dtype=torch.uint8, device=sources[0].device)
        storage[: weights_offset()].zero_()
        wire = wire_views(schema, storage)
        with torch.no_grad():
            for tensor, view in zip(sources, wire[WEIGHTS_KEY].values()):
                view.copy_(tensor)
                tensor.data = view
        if storage.device.type == "cpu":
            _trim_heap()
        return cls(module, schema, wire, sources)

    @property
    def streams(self) -> bool:
        """Whether :meth:`stage_into` can report progress: host weights of more than one chunk."""
        return self.storage.device.type == "cpu" and self._weights_bytes.numel() > STREAM_CHUNK_BYTES

    def stage_into(self, wire: TensorDictBase, report: Optional[Callable[[int], None]] = None) -> None:
        """Copy every weight into ``wire`` (a wire buffer of the same schema) as one contiguous copy.

        With ``report``, the copy goes in chunks of :data:`STREAM_CHUNK_BYTES` and ``report(end)`` follows each
        one: the first ``end`` bytes of ``wire``'s storage are then written (about 3 us per 4 MB chunk).
        """
        if report is None:
            self._weights_of(wire).copy_(self._weights_bytes)  # raw bytes, outside autograd: no no_grad() needed
            return
        for destination, source, end in self._chunks_of(wire):
            destination.copy_(source)
            report(end)

    def swap(self, landed: TensorDictBase) -> TensorDictBase:
        """Point every weight at its slice of ``landed`` (same schema, same device); returns the former wire.

        No byte is copied, and the tensors stay the same objects. Nothing may hold the former wire's memory
        for the weights' sake afterwards: it is free to be written, typically by the next update.
        """
        layout = self._layout_of(landed)
        list(map(_set_data, self._sources, layout.views))
        former, self.wire, self._weights_bytes = self.wire, landed, layout.weights_bytes
        self.probe.addresses = layout.addresses
        return former

    def _chunks_of(self, wire: TensorDictBase) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(destination, source, end offset in the storage) per chunk of ``wire``'s weights, sliced once."""
        cached = self._chunk_lists.get(id(wire))
        if cached is None or cached[0] is not wire:
            destination, start = self._weights_of(wire), self._span.start
            chunks = [
                (destination[at : at + STREAM_CHUNK_BYTES], self._weights_bytes[at : at + STREAM_CHUNK_BYTES], start + min(at + STREAM_CHUNK_BYTES, destination.numel()))
                for at in range(0, destination.numel(), STREAM_CHUNK_BYTES)
            ]
            cached = self._chunk_lists[id(wire)] = (wire, chunks)
        return cached[1]

    def _weights_of(self, wire: TensorDictBase) -> torch.Tensor:
        return self._layout_of(wire).weights_bytes

    def _layout_of(self, wire: TensorDictBase) -> "_Layout":
        """What a push or a swap needs of ``wire``, read once per buffer (buffers are few and long-lived): tensor
        indexing and ``data_ptr`` calls cost a few us per push otherwise."""
        cached = self._layouts.get(id(wire))
        if cached is None or cached.wire is not wire:
            views = list(wire[WEIGHTS_KEY].values())
            cached = _Layout(wire, wire_storage(wire)[self._span], views, list(map(torch.Tensor.data_ptr, views)))
            self._layouts[id(wire)] = cached
        return cached


class _Layout(NamedTuple):
    wire: TensorDictBase
    weights_bytes: torch.Tensor
    """The weights' byte range of the wire's storage (its header excluded)."""
    views: list[torch.Tensor]
    """The weights' views in schema order."""
    addresses: list[int]


_set_data = torch.Tensor.data.__set__

STREAM_CHUNK_BYTES = 4 << 20
"""Chunk of a reported staging copy: a reader copying behind the writer trails it by about one chunk."""


def _trim_heap() -> None:
    """Give the old per-tensor allocations back to the OS (glibc keeps freed heap chunks otherwise).

    Tensors of a few hundred KB often come from the heap rather than their own mapping (glibc raises its mmap
    threshold once a big block was freed), so without this the process's RSS would still count the weights'
    old copy, although later allocations (the optimizer's state) would reuse that memory.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to trim, or no way to ask
        pass


def _wire_holding(schema: WeightSchema, sources: list[torch.Tensor]) -> Optional[TensorDictBase]:
    """The wire buffer laid over the one storage ``sources`` already occupy at their wire places, if they do."""
    storage = sources[0].untyped_storage()
    if storage.nbytes() != wire_nbytes(schema) or any(type(t.data) is not torch.Tensor for t in sources):
        return None
    wire = wire_views(schema, torch.empty(0, dtype=torch.uint8, device=sources[0].device).set_(storage))
    placed = all(
        t.data_ptr() == v.data_ptr() and t.dtype == v.dtype and t.shape == v.shape and t.stride() == v.stride()
        for t, v in zip(sources, wire[WEIGHTS_KEY].values())
    )
    return wire if placed else None


def _is_plain(tensor: torch.Tensor) -> bool:
    data = tensor.data
    return (
        type(data) is torch.Tensor
        and data.layout == torch.strided
        and data.device.type != "meta"
        and data.is_contiguous()
        and data.storage_offset() == 0
        and data.untyped_storage().nbytes() == data.numel() * data.element_size()
        and not (data.device.type == "cpu" and data.is_shared())  # CUDA tensors always report shared
    )
