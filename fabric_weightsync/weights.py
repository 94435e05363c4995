"""How weights are taken from a module, laid out for the wire, checked and applied.

Both ends build the same *wire buffer* from their own module: one ``TensorDict`` of views into a single
storage, holding every parameter and buffer under its flat name, in sorted order, plus the version (and
optional checksum) of the update. Two modules with the same :class:`WeightSchema` therefore have byte-identical layouts, so an update
travels as one message and lands with one copy.
"""

import hashlib
import json
import operator
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

VERSION_KEY = "version"
WEIGHTS_KEY = "weights"
CHECKSUM_KEY = "checksum"
EXTERNAL_STORAGE_ATTR = "_fws_storage"
HEADER_WORDS_ATTR = "_fws_header"


class SchemaMismatchError(RuntimeError):
    """The trainer's and a worker's weights differ in names, shapes or dtypes."""


def named_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` by flat name, as ``state_dict`` names them (without wrappers)."""
    module = unwrap(module)
    named = dict(module.named_parameters())
    named.update((name, buf) for name, buf in module.named_buffers() if buf is not None)
    return named


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module under Fabric's and DDP's wrappers, so names match the worker's plain policy."""
    while True:
        inner = getattr(module, "_forward_module", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


@dataclass(frozen=True)
class WeightSchema:
    """Names, shapes and dtypes of a set of weights, compared before any byte of weights moves."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, weights: Union[nn.Module, TensorDictBase, dict[str, torch.Tensor]]) -> "WeightSchema":
        if isinstance(weights, nn.Module):
            weights = named_weights(weights)
        elif isinstance(weights, TensorDictBase):
            weights = dict(weights.flatten_keys(".").items())
        return cls(tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(weights.items())))

    @property
    def nbytes(self) -> int:
        return sum(
            torch.Size(shape).numel() * torch.empty((), dtype=_dtype(dtype)).element_size()
            for _, shape, dtype in self.entries
        )

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps([[name, list(shape), dtype] for name, shape, dtype in self.entries])

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "WeightSchema":
        return cls(tuple((name, tuple(shape), dtype) for name, shape, dtype in json.loads(text)))

    def mismatch(self, other: "WeightSchema", mine: str = "trainer", theirs: str = "worker") -> Optional[str]:
        """A message naming every differing key with both shapes and dtypes, or ``None`` when they match."""
        if self.digest() == other.digest():
            return None
        a = {name: (shape, dtype) for name, shape, dtype in self.entries}
        b = {name: (shape, dtype) for name, shape, dtype in other.entries}
        problems = [f"key {name!r} only on the {mine}: shape {list(a[name][0])}, {a[name][1]}" for name in a.keys() - b.keys()]
        problems += [f"key {name!r} only on the {theirs}: shape {list(b[name][0])}, {b[name][1]}" for name in b.keys() - a.keys()]
        problems += [
            f"key {name!r}: {mine} has shape {list(a[name][0])}, {a[name][1]} but {theirs} has shape"
            f" {list(b[name][0])}, {b[name][1]}"
            for name in sorted(a.keys() & b.keys())
            if a[name] != b[name]
        ]
        return "; ".join(sorted(problems))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


_HEADER = (VERSION_KEY, CHECKSUM_KEY)
_HEADER_BYTES = 8 * len(_HEADER)  # one int64 each
_ALIGN = 16


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def weights_offset() -> int:
    """Where the weights start in a wire buffer: everything from here to its end is the weights' bytes."""
    return _aligned(_HEADER_BYTES)


def wire_nbytes(schema: WeightSchema) -> int:
    """Bytes of a wire buffer: an int64 header (version, checksum), then every weight at an aligned offset."""
    offset = _HEADER_BYTES
    for _, shape, dtype in schema.entries:
        offset = _aligned(offset) + torch.Size(shape).numel() * torch.empty((), dtype=_dtype(dtype)).element_size()
    return _aligned(offset)


def wire_views(schema: WeightSchema, storage: torch.Tensor) -> TensorDict:
    """The wire buffer laid over ``storage`` (``wire_nbytes(schema)`` bytes): a ``TensorDict`` of views.

    The layout depends on the schema alone, so two processes with the same schema agree byte for byte, and
    the same function lays the buffer over host memory, GPU memory or a shared-memory file.
    """
    def view(offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return storage[offset : offset + nbytes].view(dtype).view(shape)

    header = {key: view(8 * i, (), torch.int64) for i, key in enumerate(_HEADER)}
    weights, offset = {}, _HEADER_BYTES
    for name, shape, dtype in schema.entries:
        offset = _aligned(offset)
        weights[name] = view(offset, shape, _dtype(dtype))
        offset += weights[name].numel() * weights[name].element_size()
    wire = TensorDict({WEIGHTS_KEY: TensorDict(weights, device=storage.device), **header}, device=storage.device)
    setattr(wire, EXTERNAL_STORAGE_ATTR, storage)
    if storage.device.type == "cpu":  # read and written on every update: no tensor op for two words
        setattr(wire, HEADER_WORDS_ATTR, memoryview(storage[:_HEADER_BYTES].view(torch.int64).numpy()))
    return wire


def make_wire_buffer(
    weights: Union[nn.Module, TensorDictBase, dict[str, torch.Tensor]], device: Optional[torch.device] = None
) -> TensorDict:
    """A ``{weights: {flat_name: tensor}, version, checksum}`` buffer over ONE storage, holding a copy of ``weights``.

    ``version`` and ``checksum`` (0 unless checksums are on) ride in the same storage as the weights, so one
    message carries an update and its identity. The storage is allocated once and each tensor copied into its
    slice (``TensorDict.consolidate`` pads odd-sized tensors by concatenation, which briefly doubles memory).
    ``device`` defaults to that of the weights.
    """
    if isinstance(weights, nn.Module):
        weights = named_weights(weights)
    elif isinstance(weights, TensorDictBase):
        weights = dict(weights.flatten_keys(".").items())
    schema = WeightSchema.of(weights)
    if device is None:
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
    wire = wire_views(schema, torch.zeros(wire_nbytes(schema), dtype=torch.uint8, device=device))
    with torch.no_grad():
        names = [name for name, _, _ in schema.entries]
        torch._foreach_copy_([wire[WEIGHTS_KEY][n] for n in names], [weights[n].detach() for n in names])
    return wire


def header_words(wire: TensorDictBase) -> Optional[memoryview]:
    """The (version, checksum) words of a host wire buffer as a memoryview: ~50 ns a read or write, where a
    tensor op costs microseconds (tens when cold). ``None`` for a GPU buffer."""
    return getattr(wire, HEADER_WORDS_ATTR, None)


def read_header(wire: TensorDictBase) -> tuple[int, int]:
    """(version, checksum) of a wire buffer."""
    words = header_words(wire)
    if words is None:
        version, checksum = wire_storage(wire)[:_HEADER_BYTES].view(torch.int64).tolist()
        return version, checksum
    return words[0], words[1]


def is_wire_buffer(weights: object) -> bool:
    return isinstance(weights, TensorDictBase) and set(weights.keys()) == {WEIGHTS_KEY, VERSION_KEY, CHECKSUM_KEY}


def weights_checksum(wire: TensorDictBase) -> int:
    """CRC32 of the weights' bytes in schema order (the header is not covered), as a non-zero int64."""
    crc = 0
    for tensor in wire[WEIGHTS_KEY].values():
        crc = zlib.crc32(tensor.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return crc + 1


def wire_storage(wire: TensorDictBase) -> torch.Tensor:
    """The single flat byte tensor behind a wire buffer: the one message of an update."""
    return getattr(wire, EXTERNAL_STORAGE_ATTR)


def has_wire_storage(wire: TensorDictBase) -> bool:
    return getattr(wire, EXTERNAL_STORAGE_ATTR, None) is not None


class LayoutProbe:
    """A check of "same tensors, same shapes" cheap enough for every push (no walk of named_parameters).

    It remembers, for each weight, the dict that holds it (a module's ``_parameters`` or ``_buffers``) and every
    parent/child edge leading to that module, so replacing a parameter, a buffer or a whole submodule, or
    reshaping a tensor (``p.data = ...``), is seen. With ``pin_addresses`` it compares where each tensor's data
    lives instead of its shape, which also catches data that moved (``p.data = other``, ``module.half()``) when
    something else reads that memory; only an in-place view op (``p.t_()``) could reshape a tensor in place.
    The checks run as ``map`` over prebuilt lists: about 0.2 us per weight, paid by every push.
    """

    def __init__(self, module: nn.Module, schema: WeightSchema, sources: list[torch.Tensor], pin_addresses: bool = False) -> None:
        self.sources = list(sources)
        self.shapes = [torch.Size(shape) for _, shape, _ in schema.entries]
        self.tables: list[dict] = []
        self.attrs: list[str] = []
        edges: dict[tuple[int, str], tuple[dict, str, nn.Module]] = {}
        for name, _, _ in schema.entries:
            owner = module
            *path, attr = name.split(".")
            for child_name in path:
                child = owner._modules[child_name]
                edges[(id(owner), child_name)] = (owner._modules, child_name, child)
                owner = child
            self.tables.append(owner._parameters if attr in owner._parameters else owner._buffers)
            self.attrs.append(attr)
        self.edge_tables, self.edge_names, self.edge_children = (list(column) for column in zip(*edges.values())) if edges else ([], [], [])
        self.addresses = list(map(torch.Tensor.data_ptr, self.sources)) if pin_addresses else None

    def unchanged(self) -> bool:
        return (
            all(map(operator.is_, map(dict.get, self.edge_tables, self.edge_names), self.edge_children))
            and all(map(operator.is_, map(dict.get, self.tables, self.attrs), self.sources))
            and (
                list(map(_shape_of, self.sources)) == self.shapes
                if self.addresses is None
                else list(map(torch.Tensor.data_ptr, self.sources)) == self.addresses
            )
        )


_shape_of = operator.attrgetter("shape")


class WeightStrategy:
    """Extracts weights from a model and applies them to one, as TorchRL's ``WeightStrategy`` does.

    Args:
        extract_as: ``"tensordict"`` returns ``TensorDict.from_module(model)`` (leaves are the live
            parameters), ``"state_dict"`` returns ``model.state_dict()``.
    """

    def __init__(self, extract_as: Literal["tensordict", "state_dict"] = "tensordict") -> None:
        if extract_as not in ("tensordict", "state_dict"):
            raise ValueError(f"extract_as must be 'tensordict' or 'state_dict', got {extract_as!r}")
        self.extract_as = extract_as

    def extract_weights(self, model: Any) -> Union[TensorDictBase, dict[str, torch.Tensor]]:
        if isinstance(model, TensorDictBase):
            return model if self.extract_as == "tensordict" else dict(model.flatten_keys(".").items())
        model = unwrap(model)
        if self.extract_as == "tensordict":
            return TensorDict.from_module(model)
        return model.state_dict()

    def apply_weights(
        self, destination: Any, weights: Union[TensorDictBase, dict[str, torch.Tensor]], inplace: bool = True
    ) -> None:
        """Writes ``weights`` into ``destination`` (a module or a ``TensorDict``).

        Accepts nested or flat (``"layer.weight"``) keys and the wire buffer itself. With ``inplace=True`` the
        values are copied into the existing tensors, all or nothing: every name and shape is checked before
        the first copy. With ``inplace=False`` the module's tensors are replaced by those of ``weights``.
        """
        flat = _flat_weights(weights)
        if isinstance(destination, TensorDictBase):
            targets = dict(destination.flatten_keys(".").items())
        else:
            destination = unwrap(destination)
            targets = named_weights(destination)
        problem = WeightSchema.of(targets).mismatch(WeightSchema.of(flat), "destination", "weights")
        if problem:
            raise SchemaMismatchError(f"Cannot apply weights: {problem}")
        if inplace or isinstance(destination, TensorDictBase):
            names = sorted(targets)
            with torch.no_grad():
                torch._foreach_copy_([targets[n] for n in names], [flat[n] for n in names])
        else:
            TensorDict(flat).unflatten_keys(".").to_module(destination)


def _flat_weights(weights: Union[TensorDictBase, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if isinstance(weights, TensorDictBase):
        if is_wire_buffer(weights):
            weights = weights[WEIGHTS_KEY]
        return dict(weights.flatten_keys(".").items())
    return dict(weights)
