"""How weights are named, described, taken from a module and applied to one.

Both ends describe their module's weights by a :class:`WeightSchema` (flat names in sorted order, shapes, dtypes)
and lay them out as a :class:`~fabric_weightsync.wire.WireBuffer` with the header ``(version, checksum)``: two
modules with the same schema have byte-identical layouts, so an update travels as one message.
"""

import hashlib
import json
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Optional, Union

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from fabric_weightsync.wire import Layout, WireBuffer, describe_mismatch, itemsize

WEIGHT_HEADER = ("version", "checksum")
"""Header words of a weight update: the trainer's version, and a CRC32 of the weights (0: none)."""


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


def _named(weights: Union[nn.Module, TensorDictBase, WireBuffer, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat ``{name: tensor}`` of a module, a (nested) ``TensorDict``, a wire buffer or a dict."""
    if isinstance(weights, nn.Module):
        return named_weights(weights)
    if isinstance(weights, WireBuffer):
        weights = weights.weights
    if isinstance(weights, TensorDictBase):
        return dict(weights.flatten_keys(".").items())
    return dict(weights)


@dataclass(frozen=True)
class WeightSchema:
    """Names, shapes and dtypes of a set of weights, compared before any byte of weights moves."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, weights: Union[nn.Module, TensorDictBase, WireBuffer, dict[str, torch.Tensor]]) -> "WeightSchema":
        return cls(tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(_named(weights).items())))

    @cached_property
    def layout(self) -> Layout:
        """The wire layout of an update of these weights."""
        return Layout(WEIGHT_HEADER, self.entries)

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * itemsize(dtype) for _, shape, dtype in self.entries)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps([[name, list(shape), dtype] for name, shape, dtype in self.entries])

    @classmethod
    def from_json(cls, text: Union[str, bytes, list]) -> "WeightSchema":
        """The schema :meth:`to_json` wrote (or its parsed list); ``ValueError`` for anything else."""
        raw = json.loads(text) if isinstance(text, (str, bytes)) else text
        try:
            return cls(tuple((str(name), tuple(int(n) for n in shape), str(dtype)) for name, shape, dtype in raw))
        except (TypeError, ValueError) as err:
            raise ValueError(f"not a weight schema: {err}") from err

    def mismatch(self, other: "WeightSchema", mine: str = "trainer", theirs: str = "worker") -> Optional[str]:
        """A message naming every differing key with both shapes and dtypes, or ``None`` when they match."""
        as_map = lambda schema: {name: (shape, dtype) for name, shape, dtype in schema.entries}  # noqa: E731
        return describe_mismatch(as_map(self), as_map(other), mine, theirs)


def make_wire_buffer(
    weights: Union[nn.Module, TensorDictBase, dict[str, torch.Tensor]], device: Optional[torch.device] = None
) -> WireBuffer:
    """A :class:`~fabric_weightsync.wire.WireBuffer` holding a copy of ``weights``: version, checksum, then each weight.

    ``device`` defaults to that of the weights.
    """
    weights = _named(weights)
    schema = WeightSchema.of(weights)
    if device is None:
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
    wire = WireBuffer.allocate(schema.layout, device)
    with torch.no_grad():
        torch._foreach_copy_(wire.tensors, [weights[name].detach() for name, _, _ in schema.entries])
    return wire


class LayoutProbe:
    """A check of "same tensors, same shapes" cheap enough for every push (no walk of named_parameters).

    It remembers, for each weight, the dict that holds it (a module's ``_parameters`` or ``_buffers``) and every
    parent/child edge leading to that module, so replacing a parameter, a buffer or a whole submodule, or
    reshaping a tensor (``p.data = ...``), is seen; and how many entries every module's tables hold, so a
    parameter, buffer or submodule registered later is seen too. With ``pin_addresses`` it compares where each tensor's data
    lives instead of its shape, which also catches data that moved (``p.data = other``, ``module.half()``) when
    something else reads that memory; only an in-place view op (``p.t_()``) could reshape a tensor in place.
    The checks run as ``map`` over prebuilt lists, since every push pays for them.
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
        # Every module's tables of parameters, buffers and children: one registered later changes a count.
        self.registries = [table for m in module.modules() for table in (m._parameters, m._buffers, m._modules)]
        self.sizes = list(map(len, self.registries))

    def unchanged(self) -> bool:
        return (
            list(map(len, self.registries)) == self.sizes
            and all(map(operator.is_, map(dict.get, self.edge_tables, self.edge_names), self.edge_children))
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
        self, destination: Any, weights: Union[TensorDictBase, WireBuffer, dict[str, torch.Tensor]], inplace: bool = True
    ) -> None:
        """Writes ``weights`` into ``destination`` (a module or a ``TensorDict``).

        Accepts nested or flat (``"layer.weight"``) keys and the wire buffer itself. With ``inplace=True`` the
        values are copied into the existing tensors, all or nothing: every name and shape is checked before
        the first copy. With ``inplace=False`` the module's tensors are replaced by those of ``weights``.
        """
        flat = _named(weights)
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
