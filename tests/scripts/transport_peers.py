"""Worker-side peers of tests/test_transport.py, run in separate processes (torch.multiprocessing).

The test process plays the sender (training rank 0, pair rank 0) and hosts the TCPStore; peer ``index`` plays
the worker of transport rank ``index + 1``. Each peer saves what it observed to ``out_dir/peer{index}.pt``
(versions, weights, errors) for the test to compare exactly; expected errors are recorded, not raised.
"""

import operator
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import nn

from fabric_weightsync import DistributedTransport, SchemaMismatchError, WeightStrategy, make_wire_buffer
from fabric_weightsync.channels import new_pair_group

torch.set_num_threads(1)

TIMEOUT = 20.0
POLLED_KEY = "test/polled"


def make_policy(hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.BatchNorm1d(2))


def client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT))


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save(out_dir: str, index: int, **result) -> None:
    torch.save(result, Path(out_dir) / f"peer{index}.pt")


def _receiver(port: int, index: int, policy: nn.Module, channel_hint: str = "group", **kwargs) -> DistributedTransport:
    # The receiver's channel argument is ignored by design (the sender decides); passing it checks that it is.
    return DistributedTransport(weights_buffer=policy, store=client(port), rank=index + 1, timeout=TIMEOUT, channel=channel_hint, **kwargs)


def storages(module: nn.Module) -> set:
    """Where the module's weights live: one address per distinct storage."""
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


def receive_updates(index: int, port: int, out_dir: str, updates: int, flatten: bool = True) -> None:
    """Connect, then take ``updates`` updates with ``receive_weights(model=...)``, recording each one and where
    the policy's weights lived after it."""
    policy = make_policy(seed=100 + index)
    tensors = [*policy.parameters(), *policy.buffers()]
    before = storages(policy)
    transport = _receiver(port, index, policy, flatten_weights=flatten)
    transport.setup_connection_and_weights_on_receiver(worker_idx=index, model=policy)
    seen, homes = [(transport.version, snapshot(policy))], [storages(policy)]
    for _ in range(updates):
        assert transport.receive_weights(TIMEOUT, model=policy) is not None, "an update was expected"
        seen.append((transport.version, snapshot(policy)))
        homes.append(storages(policy))
    kept = all(map(operator.is_, tensors, [*policy.parameters(), *policy.buffers()]))
    _save(out_dir, index, seen=seen, kept_identity=kept, channel=transport.channel, before=before, homes=homes)


def receive_after_empty_polls(index: int, port: int, out_dir: str, wait_s: float) -> None:
    """Nothing is sent yet: ``receive_weights(wait_s)`` and ``receive_weights(0)`` return None without side effects."""
    policy = make_policy(seed=100 + index)
    transport = _receiver(port, index, policy)
    transport.setup_connection_and_weights_on_receiver(worker_idx=index, model=policy)
    before = snapshot(policy)
    start = time.monotonic()
    waited = transport.receive_weights(wait_s, model=policy)
    waited_s = time.monotonic() - start
    start = time.monotonic()
    polled = transport.receive_weights(0, model=policy)
    polled_s = time.monotonic() - start
    unchanged = all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    version_after_polls = transport.version
    client(port).set(POLLED_KEY, b"1")
    got = transport.receive_weights(TIMEOUT, model=policy)
    _save(
        out_dir, index,
        waited=waited, waited_s=waited_s, polled=polled, polled_s=polled_s, unchanged=unchanged,
        version_after_polls=version_after_polls, got_update=got is not None, version=transport.version,
        weights=snapshot(policy),
    )  # fmt: skip


def receive_initial(index: int, port: int, out_dir: str, group_name: str) -> None:
    """``receive_initial_weights`` on a pair group built by hand (passed as ``group=``), no connect handshake."""
    policy = make_policy(seed=100 + index)
    before = snapshot(policy)
    store = client(port)
    group = new_pair_group(store, group_name, 1, "gloo", TIMEOUT)
    transport = DistributedTransport(weights_buffer=policy, store=store, rank=index + 1, group=group, timeout=TIMEOUT)
    received = transport.receive_initial_weights()
    _save(
        out_dir, index,
        received={k: v.clone() for k, v in received.flatten_keys(".").items()}, version=transport.version,
        policy_untouched=all(torch.equal(v, before[k]) for k, v in policy.state_dict().items()),
    )  # fmt: skip


def connect_with_policy(index: int, port: int, out_dir: str, hidden: int, dtype: str) -> None:
    """Connect a policy of width ``hidden`` and ``dtype``; a schema mismatch is recorded with its message."""
    policy = make_policy(hidden=hidden, seed=100 + index).to(getattr(torch, dtype))
    before = snapshot(policy)
    transport = _receiver(port, index, policy)
    error = None
    try:
        transport.setup_connection_and_weights_on_receiver(worker_idx=index, model=policy)
    except SchemaMismatchError as err:
        error = str(err)
    untouched = all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    _save(out_dir, index, error=error, policy_untouched=untouched)


def receive_into_buffers(index: int, port: int, out_dir: str) -> None:
    """``receive_weights(weights=buffer)`` fills and returns the buffer; ``model=`` + ``strategy=`` applies with it."""
    policy = make_policy(seed=100 + index)
    transport = _receiver(port, index, policy)
    initial_buffer = TensorDict.from_module(make_policy(seed=7)).clone()
    transport.setup_connection_and_weights_on_receiver(worker_idx=index, weights=initial_buffer)
    policy_after_connect = snapshot(policy)

    buffer = TensorDict.from_module(make_policy(seed=8)).clone()
    returned = transport.receive_weights(TIMEOUT, weights=buffer)
    first = {
        "is_buffer": returned is buffer, "version": transport.version,
        "buffer": {k: v.clone() for k, v in buffer.flatten_keys(".").items()}, "policy": snapshot(policy),
    }  # fmt: skip

    strategy = WeightStrategy(extract_as="state_dict")
    returned = transport.receive_weights(TIMEOUT, model=policy, strategy=strategy)
    second = {"returned_none": returned is None, "version": transport.version, "policy": snapshot(policy)}

    both = TensorDict.from_module(make_policy(seed=9)).clone()
    transport.receive_weights(TIMEOUT, weights=both, model=policy, strategy=WeightStrategy())
    third = {
        "version": transport.version, "buffer": {k: v.clone() for k, v in both.flatten_keys(".").items()},
        "policy": snapshot(policy),
    }  # fmt: skip
    _save(
        out_dir, index,
        initial_buffer={k: v.clone() for k, v in initial_buffer.flatten_keys(".").items()},
        policy_after_connect=policy_after_connect, first=first, second=second, third=third,
    )  # fmt: skip


def receive_around_a_reload(index: int, port: int, out_dir: str) -> None:
    """Take an update, replace every tensor of the policy (``load_state_dict(assign=True)``), take another."""
    policy = make_policy(seed=100 + index)
    transport = _receiver(port, index, policy)
    transport.setup_connection_and_weights_on_receiver(worker_idx=index, model=policy)
    assert transport.receive_weights(TIMEOUT, model=policy) is not None
    reloaded = {name: value.clone() for name, value in policy.state_dict().items()}
    policy.load_state_dict(reloaded, assign=True)
    tensors = [*policy.parameters(), *policy.buffers()]
    assert transport.receive_weights(TIMEOUT, model=policy) is not None
    kept = all(map(operator.is_, tensors, [*policy.parameters(), *policy.buffers()]))
    _save(out_dir, index, seen=[(transport.version, snapshot(policy))], kept_identity=kept, homes=[storages(policy)])


def receive_into_a_given_buffer(index: int, port: int, out_dir: str, updates: int) -> None:
    """TorchRL style: the worker hands the transport its own wire buffer and reads it after each update."""
    policy = make_policy(seed=100 + index)
    before = storages(policy)
    buffer = make_wire_buffer(policy)
    transport = DistributedTransport(weights_buffer=buffer, store=client(port), rank=index + 1, timeout=TIMEOUT)
    transport.setup_connection_and_weights_on_receiver(worker_idx=index, model=policy)
    seen = []
    for _ in range(updates):
        assert transport.receive_weights(TIMEOUT, model=policy) is not None
        seen.append((transport.version, {name: t.clone() for name, t in buffer.weights.items()}))
    _save(out_dir, index, seen=seen, policy=snapshot(policy), homes=[storages(policy)], before=before, still_ours=transport.wire_buffer is buffer)
