"""The wire buffer: one storage holding a few int64 header words, then every tensor of a layout at an aligned offset.

Both ends of a transfer derive the same :class:`Layout` from the same schema, so a message is one storage whose
bytes mean the same thing on either side: nothing is pickled, and an update or an experience batch travels as
one send and lands with one copy. Weights use the header ``(version, checksum)``, experience ``(version,
worker_id)``.
"""

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Hashable, Optional, Union

import torch
from tensordict import TensorDict

ALIGN = 16
"""Byte alignment of every tensor in the storage (keeps vectorised copies and dtype views legal)."""

Entry = tuple[Hashable, tuple[int, ...], str]
"""One tensor of a layout: its key, shape and dtype name (``"float32"`` or ``"torch.float32"``)."""


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a schema names; raises ``ValueError`` for anything else."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def itemsize(name: str) -> int:
    return torch.empty((), dtype=dtype_of(name)).element_size()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class Layout:
    """Where each entry lives in one storage: ``header`` int64 words first, then every entry at an aligned offset.

    Args:
        header: names of the int64 header words.
        entries: ``(key, shape, dtype)`` of every tensor, in storage order.
    """

    header: tuple[str, ...]
    entries: tuple[Entry, ...]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of every entry."""
        offsets, offset = [], 8 * len(self.header)
        for _, shape, dtype in self.entries:
            offset = _aligned(offset)
            offsets.append(offset)
            offset += torch.Size(shape).numel() * itemsize(dtype)
        return tuple(offsets)

    @cached_property
    def data_offset(self) -> int:
        """Where the tensors' bytes start: everything from here to the end belongs to them."""
        return _aligned(8 * len(self.header))

    @cached_property
    def nbytes(self) -> int:
        if not self.entries:
            return self.data_offset
        _, shape, dtype = self.entries[-1]
        return _aligned(self.offsets[-1] + torch.Size(shape).numel() * itemsize(dtype))

    def views(self, storage: torch.Tensor) -> list[torch.Tensor]:
        """Every entry as a view of ``storage`` (a flat uint8 tensor of :attr:`nbytes` bytes)."""
        views = []
        for offset, (_, shape, dtype) in zip(self.offsets, self.entries):
            nbytes = torch.Size(shape).numel() * itemsize(dtype)
            views.append(storage[offset : offset + nbytes].view(dtype_of(dtype)).view(shape))
        return views


def describe_mismatch(
    mine: dict, theirs: dict, mine_name: str, theirs_name: str, show_key: Callable[[Any], str] = repr
) -> Optional[str]:
    """Every differing key of two ``{key: (shape, dtype)}`` maps, with both shapes and dtypes; ``None`` if equal."""
    if mine == theirs:
        return None

    def show(entry: tuple) -> str:
        return f"shape {list(entry[0])}, {entry[1]}"

    problems = [f"key {show_key(key)} only on the {mine_name}: {show(mine[key])}" for key in mine.keys() - theirs.keys()]
    problems += [f"key {show_key(key)} only on the {theirs_name}: {show(theirs[key])}" for key in theirs.keys() - mine.keys()]
    problems += [
        f"key {show_key(key)}: {mine_name} has {show(mine[key])} but {theirs_name} has {show(theirs[key])}"
        for key in mine.keys() & theirs.keys()
        if mine[key] != theirs[key]
    ]
    return "; ".join(sorted(problems))


class WireBuffer:
    """One message: a flat byte storage laid out by a :class:`Layout`, with its header words and tensor views.

    Args:
        layout: what the storage holds.
        storage: a flat ``uint8`` tensor of ``layout.nbytes`` bytes (host, GPU or a mapped file).
        path: the shared-memory file behind ``storage``, if it is one.
    """

    def __init__(self, layout: Layout, storage: torch.Tensor, path: Optional[str] = None) -> None:
        if storage.dtype != torch.uint8 or storage.dim() != 1 or storage.numel() != layout.nbytes:
            raise ValueError(f"a wire buffer of this layout needs {layout.nbytes} uint8 bytes, got {tuple(storage.shape)} {storage.dtype}")
        self.layout = layout
        self.storage = storage
        self.path = path
        self.tensors = layout.views(storage)
        """Every entry's view, in layout order."""
        words = storage[: 8 * len(layout.header)].view(torch.int64)
        # Read and written on every update: a memoryview word is far cheaper than a tensor op.
        self._words: Union[memoryview, torch.Tensor] = memoryview(words.numpy()) if storage.is_cpu else words

    @classmethod
    def allocate(cls, layout: Layout, device: Union[str, torch.device, None] = None) -> "WireBuffer":
        """A zeroed buffer of ``layout`` on ``device`` (host by default)."""
        return cls(layout, torch.zeros(layout.nbytes, dtype=torch.uint8, device=device))

    @cached_property
    def weights(self) -> TensorDict:
        """The entries as a ``TensorDict`` of views keyed by their names (for weight layouts)."""
        return TensorDict(dict(zip((key for key, _, _ in self.layout.entries), self.tensors)), device=self.storage.device)

    @cached_property
    def data(self) -> torch.Tensor:
        """The tensors' byte range of the storage (the header excluded)."""
        return self.storage[self.layout.data_offset :]

    def word(self, index: int) -> int:
        """Header word ``index``."""
        return int(self._words[index])

    def set_word(self, index: int, value: int) -> None:
        self._words[index] = value

    @property
    def version(self) -> int:
        """Header word 0: the version of what the buffer holds."""
        return int(self._words[0])

    @version.setter
    def version(self, value: int) -> None:
        self._words[0] = value

    @property
    def checksum(self) -> int:
        """Header word 1 of a weight buffer: the stamped CRC32 (0: none)."""
        return int(self._words[1])

    @checksum.setter
    def checksum(self, value: int) -> None:
        self._words[1] = value

    def compute_checksum(self) -> int:
        """CRC32 of the tensors' bytes in layout order (the header is not covered), as a non-zero int64."""
        crc = 0
        for tensor in self.tensors:
            crc = zlib.crc32(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy(), crc)  # reshape: a 0-dim view fails
        return crc + 1

    def copy_from(self, other: "WireBuffer") -> None:
        """Copy every byte of ``other`` (same layout) into this buffer."""
        self.storage.copy_(other.storage)

    def __repr__(self) -> str:
        return f"WireBuffer({len(self.tensors)} tensors, {self.layout.nbytes} bytes, {self.storage.device}, version {self.version})"
