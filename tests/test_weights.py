"""``WeightStrategy`` (extract/apply) and ``WeightSchema`` (comparison and its messages), in-process."""

import json

import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from fabric_weightsync import SchemaMismatchError, WeightSchema, WeightStrategy, make_wire_buffer


def make_model(hidden: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings buffers, one of them int64: weights are more than float parameters.
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))


def values(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_values(module: nn.Module, expected: dict) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{name} differs"


def changed(module: nn.Module, amount: float) -> dict:
    """State of ``module`` with every float value moved by ``amount`` and every int one by 1."""
    return {k: v + (amount if v.is_floating_point() else 1) for k, v in values(module).items()}


def nested(flat: dict) -> TensorDict:
    return TensorDict(flat).unflatten_keys(".")


# ---------------------------------------------------------------------- extract_weights
def test_extract_as_tensordict_gives_live_tensors():
    model = make_model()
    weights = WeightStrategy(extract_as="tensordict").extract_weights(model)
    assert isinstance(weights, TensorDictBase)
    assert set(weights.flatten_keys(".").keys()) == set(model.state_dict().keys())
    # Live: the leaves are the module's tensors, not copies.
    assert weights["0", "weight"] is model[0].weight
    assert weights["1", "running_mean"].data_ptr() == model[1].running_mean.data_ptr()


def test_extract_as_state_dict():
    model = make_model()
    weights = WeightStrategy(extract_as="state_dict").extract_weights(model)
    assert isinstance(weights, dict)
    assert list(weights) == list(model.state_dict())
    assert weights["1.num_batches_tracked"].dtype == torch.int64


def test_extract_sees_through_wrappers():
    model = make_model()
    wrapped = nn.DataParallel(model)  # a ``.module`` wrapper, as DDP and Fabric's are
    weights = WeightStrategy(extract_as="state_dict").extract_weights(wrapped)
    assert list(weights) == list(model.state_dict()), "names must not carry the wrapper's 'module.' prefix"
    assert WeightSchema.of(wrapped) == WeightSchema.of(model)


def test_extract_from_a_tensordict():
    td = TensorDict.from_module(make_model())
    assert WeightStrategy("tensordict").extract_weights(td) is td
    flat = WeightStrategy("state_dict").extract_weights(td)
    assert set(flat) == set(make_model().state_dict())


def test_extract_as_rejects_unknown_modes():
    with pytest.raises(ValueError, match="extract_as"):
        WeightStrategy(extract_as="numpy")


# ---------------------------------------------------------------------- apply_weights
@pytest.mark.parametrize(
    "form",
    ["module_state_dict", "flat_tensordict", "nested_tensordict", "extracted_tensordict", "wire_buffer"],
)
def test_apply_inplace_copies_into_the_same_tensors(form):
    source = make_model(seed=1)
    target = make_model(seed=2)
    expected = values(source)
    weights = {
        "module_state_dict": lambda: source.state_dict(),
        "flat_tensordict": lambda: TensorDict(source.state_dict()),
        "nested_tensordict": lambda: nested(source.state_dict()),
        "extracted_tensordict": lambda: WeightStrategy("tensordict").extract_weights(source),
        "wire_buffer": lambda: make_wire_buffer(source),
    }[form]()
    identity = {k: v.data_ptr() for k, v in target.state_dict().items()}
    WeightStrategy().apply_weights(target, weights, inplace=True)
    assert_values(target, expected)
    assert identity == {k: v.data_ptr() for k, v in target.state_dict().items()}, "inplace must keep the tensors"
    assert isinstance(target[0].weight, nn.Parameter)
    # A copy, not an alias: the source moving on does not move the target.
    with torch.no_grad():
        source[0].weight.add_(1.0)
    assert torch.equal(target[0].weight, expected["0.weight"])


def test_apply_inplace_into_a_tensordict_destination():
    source = make_model(seed=1)
    destination = TensorDict.from_module(make_model(seed=2)).clone()
    WeightStrategy().apply_weights(destination, source.state_dict())
    for name, value in values(source).items():
        assert torch.equal(destination.flatten_keys(".")[name], value), name


def test_apply_not_inplace_replaces_the_tensors():
    source = make_model(seed=1)
    weights = TensorDict(values(source))
    target = make_model(seed=2)
    WeightStrategy().apply_weights(target, weights, inplace=False)
    assert_values(target, values(source))
    # Replaced: the module now holds the given tensors themselves.
    assert target[0].weight.data_ptr() == weights["0.weight"].data_ptr()
    assert target[1].running_var.data_ptr() == weights["1.running_var"].data_ptr()


def test_apply_with_state_dict_strategy():
    source = make_model(seed=1)
    target = make_model(seed=2)
    strategy = WeightStrategy(extract_as="state_dict")
    strategy.apply_weights(target, strategy.extract_weights(source))
    assert_values(target, values(source))


BAD_WEIGHTS = {
    # The bad key sorts last, so a copy in name order would already have written every other tensor.
    "bad_shape": lambda good: {**good, "2.weight": torch.zeros(2, 5)},
    "bad_dtype": lambda good: {**good, "2.weight": good["2.weight"].double()},
    "missing_key": lambda good: {k: v for k, v in good.items() if k != "2.weight"},
    "extra_key": lambda good: {**good, "3.weight": torch.zeros(1)},
}


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("problem", list(BAD_WEIGHTS))
def test_apply_is_all_or_nothing(problem, inplace):
    target = make_model(seed=2)
    before = values(target)
    weights = TensorDict(BAD_WEIGHTS[problem](changed(target, 1.0)))
    with pytest.raises(SchemaMismatchError, match="2.weight|3.weight"):
        WeightStrategy().apply_weights(target, weights, inplace=inplace)
    assert_values(target, before)


def test_apply_error_names_key_and_both_shapes():
    target = make_model(hidden=3)
    with pytest.raises(SchemaMismatchError) as err:
        WeightStrategy().apply_weights(target, make_model(hidden=5).state_dict())
    message = str(err.value)
    assert "'0.weight'" in message and "[3, 4]" in message and "[5, 4]" in message


# ---------------------------------------------------------------------- WeightSchema
def test_schema_is_the_same_for_every_form():
    model = make_model()
    schema = WeightSchema.of(model)
    assert WeightSchema.of(model.state_dict()) == schema
    assert WeightSchema.of(TensorDict.from_module(model)) == schema
    assert WeightSchema.of(make_model(seed=5)) == schema, "values do not matter, only names, shapes and dtypes"
    assert schema.mismatch(WeightSchema.of(make_model(seed=5))) is None
    names = [name for name, _, _ in schema.entries]
    assert names == sorted(names) == sorted(model.state_dict())


def test_schema_json_round_trip_and_digest():
    schema = WeightSchema.of(make_model())
    text = schema.to_json()
    json.loads(text)  # plain JSON: it travels through the store
    assert WeightSchema.from_json(text) == schema
    assert WeightSchema.from_json(text.encode()) == schema
    assert WeightSchema.from_json(text).digest() == schema.digest()
    assert WeightSchema.of(make_model(hidden=4)).digest() != schema.digest()


def test_schema_nbytes():
    model = make_model()
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert WeightSchema.of(model).nbytes == expected


def test_schema_mismatch_names_shapes_and_dtypes():
    trainer = WeightSchema.of(make_model(hidden=3))
    worker = WeightSchema.of(make_model(hidden=5))
    message = trainer.mismatch(worker)
    assert "key '0.weight': trainer has shape [3, 4], torch.float32 but worker has shape [5, 4], torch.float32" in message
    assert "key '2.weight': trainer has shape [2, 3]" in message and "worker has shape [2, 5]" in message
    assert "'2.bias'" not in message, "matching keys are not reported"
    double = WeightSchema.of(make_model(hidden=3).double())
    assert "torch.float64" in trainer.mismatch(double) and "torch.float32" in trainer.mismatch(double)
    assert "'1.num_batches_tracked'" not in trainer.mismatch(double), ".double() leaves int buffers alone"


def test_schema_mismatch_names_keys_on_one_side_only():
    trainer = WeightSchema.of({"a": torch.zeros(2), "shared": torch.zeros(1)})
    worker = WeightSchema.of({"b": torch.zeros(3, dtype=torch.float16), "shared": torch.zeros(1)})
    message = trainer.mismatch(worker)
    assert "key 'a' only on the trainer: shape [2], torch.float32" in message
    assert "key 'b' only on the worker: shape [3], torch.float16" in message
    assert "'shared'" not in message
    # The labels are the caller's: apply_weights speaks of destination and weights.
    assert "only on the mine" in trainer.mismatch(worker, "mine", "theirs")
