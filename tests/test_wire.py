"""The wire buffer and its layout codec, shared by weight updates and experience batches, in-process."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from fabric_weightsync import WeightSchema, WireBuffer, make_wire_buffer
from fabric_weightsync.experience import ExperienceSchema
from fabric_weightsync.weights import named_weights
from fabric_weightsync.wire import ALIGN, Layout, dtype_of


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_layout_aligns_every_entry_after_the_header():
    layout = Layout(("version", "checksum"), (("a", (3,), "float32"), ("b", (1,), "int8"), ("c", (2, 2), "torch.float64")))
    assert layout.data_offset == 16
    assert all(offset % ALIGN == 0 for offset in layout.offsets)
    assert layout.offsets == (16, 32, 48) and layout.nbytes == 80
    views = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(3,), (1,), (2, 2)]
    assert [v.dtype for v in views] == [torch.float32, torch.int8, torch.float64]


def test_a_storage_of_the_wrong_size_is_refused_naming_both_sizes():
    layout = Layout(("version",), (("a", (3,), "float32"),))
    with pytest.raises(ValueError, match=f"{layout.nbytes} uint8 bytes"):
        WireBuffer(layout, torch.zeros(layout.nbytes + 1, dtype=torch.uint8))


def test_unknown_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        dtype_of("float99")
    with pytest.raises(ValueError, match="unknown dtype 'Tensor'"):
        dtype_of("Tensor")  # an attribute of torch, but not a dtype


def test_header_words_and_checksum():
    wire = make_wire_buffer(make_model())
    assert (wire.version, wire.checksum) == (0, 0)
    wire.version, wire.checksum = 7, 11
    assert (wire.word(0), wire.word(1)) == (7, 11)
    assert wire.storage[:16].view(torch.int64).tolist() == [7, 11], "the header lives in the storage itself"
    crc = wire.compute_checksum()
    assert crc != 0 and crc == wire.compute_checksum()
    wire.version = 8
    assert wire.compute_checksum() == crc, "the header is not covered"
    wire.tensors[0].add_(1)
    assert wire.compute_checksum() != crc


def test_weight_wire_buffer_is_one_storage_holding_a_copy_in_schema_order():
    model = make_model()
    wire = make_wire_buffer(model)
    base = wire.storage.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in wire.tensors)
    assert list(wire.weights.keys()) == sorted(named_weights(model))
    assert WeightSchema.of(wire) == WeightSchema.of(model) and wire.layout == WeightSchema.of(model).layout
    for name, value in named_weights(model).items():
        assert torch.equal(wire.weights[name], value)
        assert wire.weights[name].data_ptr() != value.data_ptr(), "a copy, not a view of the module"
    other = WireBuffer.allocate(wire.layout)
    other.copy_from(wire)
    assert torch.equal(other.storage, wire.storage)


def test_experience_batches_use_the_same_codec_and_unpack_without_a_copy():
    batch = TensorDict({"obs": torch.randn(5, 3), "next": {"done": torch.ones(5, dtype=torch.bool)}}, batch_size=[5])
    schema = ExperienceSchema.of(batch)
    wire = schema.wire()
    for view, path in zip(wire.tensors, schema.paths):
        view.copy_(batch.get(path))
    wire.set_word(0, 42)
    wire.set_word(1, 3)
    received = schema.unpack(wire.storage)
    assert (received.version, received.worker_id) == (42, 3)
    assert (received.data == batch).all() and received.data.batch_size == batch.batch_size
    assert received.data["obs"].untyped_storage().data_ptr() == wire.storage.untyped_storage().data_ptr()
