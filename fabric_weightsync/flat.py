"""A module's weights re-homed into one storage laid out like the wire: staging or applying an update is one copy.

A module's parameters and buffers normally live in as many allocations as there are tensors; copying them into
a staging buffer then costs one kernel launch (or one loop iteration of ``_foreach_copy_``) per tensor, which is
what dominates the push of a small policy. :class:`FlatWeights` moves each tensor's data into a slice of a single
storage with exactly the wire buffer's layout (``p.data = slice``: the ``Parameter`` objects, and so the
optimizer's and DDP's references to them, stay the same), after which a push copies one contiguous byte range.

On a worker the same move makes the policy's storage a wire buffer itself: an update received into a private
landing buffer is applied by pointing the tensors at it (:meth:`FlatWeights.swap`, no byte copied), and the
policy's former storage becomes the next landing buffer.

Only plain tensors are moved: strided, contiguous, owning their whole storage, not shared with another process
and all on one device. Anything else (a view of another tensor, a channels-last weight, a tensor subclass, a
``share_memory()`` module) keeps its memory and is copied tensor by tensor.
"""

import ctypes
from typing import Callable, Optional

import torch
from tensordict import TensorDict
from torch import nn

from fabric_weightsync.weights import LayoutProbe, WeightSchema, WeightStrategy, named_weights, unwrap
from fabric_weightsync.wire import WireBuffer

STREAM_CHUNK_BYTES = 4 << 20
"""Chunk of a reported staging copy: a reader copying behind the writer trails it by about one chunk."""


class FlatWeights:
    """``module``'s weights living in one wire-layout storage; :meth:`stage_into` copies them in one go."""

    def __init__(self, module: nn.Module, schema: WeightSchema, wire: WireBuffer, sources: list[torch.Tensor]) -> None:
        self.wire = wire
        """The wire buffer whose storage the weights live in (its header is not theirs)."""
        self._sources = sources
        self._addresses: dict[int, tuple[WireBuffer, list[int]]] = {}
        self._chunk_lists: dict[int, tuple[WireBuffer, list[tuple[torch.Tensor, torch.Tensor, int]]]] = {}
        self.probe = LayoutProbe(module, schema, sources, pin_addresses=True)
        """Whether every weight still is the same tensor at its place in :attr:`wire` (checked at every push)."""

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
        wire = WireBuffer.allocate(schema.layout, sources[0].device)
        with torch.no_grad():
            for tensor, view in zip(sources, wire.tensors):
                view.copy_(tensor)
                tensor.data = view
        if wire.storage.device.type == "cpu":
            _trim_heap()
        return cls(module, schema, wire, sources)

    @property
    def streams(self) -> bool:
        """Whether :meth:`stage_into` can report progress: host weights of more than one chunk."""
        return self.wire.storage.device.type == "cpu" and self.wire.data.numel() > STREAM_CHUNK_BYTES

    def stage_into(self, wire: WireBuffer, report: Optional[Callable[[int], None]] = None) -> None:
        """Copy every weight into ``wire`` (a wire buffer of the same schema) as one contiguous copy.

        With ``report``, the copy goes in chunks of :data:`STREAM_CHUNK_BYTES` and ``report(end)`` follows each
        one: the first ``end`` bytes of ``wire``'s storage are then written.
        """
        if report is None:
            wire.data.copy_(self.wire.data)  # raw bytes, outside autograd: no no_grad() needed
            return
        for destination, source, end in self._chunks_of(wire):
            destination.copy_(source)
            report(end)

    def swap(self, landed: WireBuffer) -> WireBuffer:
        """Point every weight at its slice of ``landed`` (same schema, same device); returns the former wire.

        No byte is copied, and the tensors stay the same objects. Nothing may hold the former wire's memory for
        the weights' sake afterwards: it is free to be written, typically by the next update.
        """
        list(map(_set_data, self._sources, landed.tensors))
        former, self.wire = self.wire, landed
        self.probe.addresses = self._addresses_of(landed)
        return former

    def _addresses_of(self, wire: WireBuffer) -> list[int]:
        cached = self._addresses.get(id(wire))  # buffers are few and long-lived: read each one's once
        if cached is None or cached[0] is not wire:
            cached = self._addresses[id(wire)] = (wire, list(map(torch.Tensor.data_ptr, wire.tensors)))
        return cached[1]

    def _chunks_of(self, wire: WireBuffer) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(destination, source, end offset in the storage) per chunk of ``wire``'s weights, sliced once."""
        cached = self._chunk_lists.get(id(wire))
        if cached is None or cached[0] is not wire:
            destination, source, start = wire.data, self.wire.data, wire.layout.data_offset
            step = STREAM_CHUNK_BYTES
            chunks = [
                (destination[at : at + step], source[at : at + step], start + min(at + step, destination.numel()))
                for at in range(0, destination.numel(), step)
            ]
            cached = self._chunk_lists[id(wire)] = (wire, chunks)
        return cached[1]


class ModuleTargets:
    """A worker's module as the destination of updates: its tensors in schema order, re-read only when its layout
    changed.

    With ``flatten``, a CPU policy of plain tensors is moved into a wire buffer of its own once (:class:`FlatWeights`):
    an update that landed in the transport's private buffer is then applied by a swap of storage, not a copy.
    """

    def __init__(self, flatten: bool) -> None:
        self._flatten = flatten
        self._model: Optional[nn.Module] = None
        self._tensors: list[torch.Tensor] = []
        self._probe: Optional[LayoutProbe] = None
        self._flat: Optional[FlatWeights] = None
        self.weights: Optional[TensorDict] = None
        """The module's own tensors by name: what a receive into the module returns."""

    def bind(self, model: nn.Module, wire: WireBuffer, schema: WeightSchema) -> bool:
        """Follow ``model``'s current layout; returns whether an update that landed in a private buffer like ``wire``
        is applied by taking that buffer over (a swap) rather than by a copy."""
        if model is not self._model or not self._probe.unchanged():
            self._bind(model, wire, schema)
        return self._flat is not None and wire.storage.is_cpu  # flat weights are host weights

    def apply(self, source: WireBuffer, swap: bool) -> Optional[WireBuffer]:
        """Write ``source``'s weights into the module last bound; with ``swap`` (``source`` landed privately), take
        its storage over and return the former one, the buffer to land the next update in."""
        if swap:
            return self._flat.swap(source)
        with torch.no_grad():
            torch._foreach_copy_(self._tensors, source.tensors)
        return None

    def _bind(self, model: nn.Module, source: WireBuffer, schema: WeightSchema) -> None:
        module = unwrap(model)
        targets = named_weights(module)
        names = [name for name, _, _ in schema.entries]
        if len(targets) != len(names) or any(name not in targets for name in names):
            WeightStrategy().apply_weights(model, source)  # raises the precise mismatch
        self._model, self._tensors = model, [targets[name] for name in names]
        self.weights = TensorDict(dict(zip(names, self._tensors)))
        on_cpu = all(tensor.device.type == "cpu" for tensor in self._tensors)
        self._flat = FlatWeights.adopt(module, schema, self._tensors) if self._flatten and on_cpu else None
        self._probe = self._flat.probe if self._flat is not None else LayoutProbe(module, schema, self._tensors)


_set_data = torch.Tensor.data.__set__


def _trim_heap() -> None:
    """Give the old per-tensor allocations back to the OS (glibc keeps freed heap chunks otherwise).

    Tensors of a few hundred KB often come from the heap rather than their own mapping, so without this the
    process's RSS would still count the weights' old copy, although later allocations would reuse that memory.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to trim, or no way to ask
        pass


def _wire_holding(schema: WeightSchema, sources: list[torch.Tensor]) -> Optional[WireBuffer]:
    """The wire buffer laid over the one storage ``sources`` already occupy at their wire places, if they do."""
    storage = sources[0].untyped_storage()
    if storage.nbytes() != schema.layout.nbytes or any(type(t.data) is not torch.Tensor for t in sources):
        return None
    wire = WireBuffer(schema.layout, torch.empty(0, dtype=torch.uint8, device=sources[0].device).set_(storage))
    placed = all(
        t.data_ptr() == v.data_ptr() and t.dtype == v.dtype and t.shape == v.shape and t.stride() == v.stride()
        for t, v in zip(sources, wire.tensors)
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
