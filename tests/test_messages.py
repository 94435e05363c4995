"""Trainer-to-worker messages: ``fabric.strategy.publish(...)`` on the trainer, ``ctx.messages`` on the worker.

Values are checked where they are published (naming the key), travel as JSON through the control store, and a
worker never raises on what it reads. The end-to-end test is a real fork launch.
"""

import functools
import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import nn

from fabric_weightsync import WeightSyncCallback
from fabric_weightsync.auth import ControlStore, as_control_store
from fabric_weightsync.messages import MAX_MESSAGES_BYTES, MAX_STRING_CHARS, MAX_TENSOR_ELEMENTS, MessagePublisher, MessageReader
from fabric_weightsync.protocol import MESSAGES_KEY, SLOW_POLL_S, poll_until

ROLLOUTS = 3


# ---------------------------------------------------------------------------------------------------- values

def unsigned(store: dist.Store) -> ControlStore:
    """The control store as the library holds it, without a run's credentials (values stay as written)."""
    return as_control_store(store, 10.0)


def landed(store: dist.Store) -> None:
    """Wait until the server applied what ``store`` wrote: a TCPStore ``set`` gets no reply, so another client may
    look before it arrives; a ``get`` on the writer's own connection is answered only after its earlier writes."""
    store.get(MESSAGES_KEY)


def test_values_come_back_as_they_were_published(control_store, store_client) -> None:
    publisher, reader = MessagePublisher(unsigned(control_store)), MessageReader(unsigned(store_client()), worker_id=0)
    assert reader.read() == {}, "nothing published yet"
    schedule = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    publisher.publish({"budget_reached": False, "epsilon": 0.1, "phase": "warmup", "seed": 7, "nothing": None, "schedule": schedule})
    publisher.publish({"budget_reached": True, "mask": torch.tensor([True, False])})  # merged; latest wins per key
    landed(control_store)
    got = reader.read()
    assert {k: v for k, v in got.items() if not isinstance(v, torch.Tensor)} == {
        "budget_reached": True, "epsilon": 0.1, "phase": "warmup", "seed": 7, "nothing": None,
    }  # fmt: skip
    assert got["schedule"].dtype == torch.float16 and torch.equal(got["schedule"], schedule)
    assert torch.equal(got["mask"], torch.tensor([True, False]))
    assert type(got["seed"]) is int and type(got["budget_reached"]) is bool


@pytest.mark.parametrize(
    "value, error, needle",
    [
        (object(), TypeError, "'bad' is a object; messages carry None, bools, ints, floats, strings and small tensors"),
        ([1, 2], TypeError, "'bad' is a list"),
        (torch.zeros(MAX_TENSOR_ELEMENTS + 1), ValueError, f"'bad' is a tensor of {MAX_TENSOR_ELEMENTS + 1} elements"),
        (torch.zeros(2, dtype=torch.complex64), TypeError, "'bad' is a torch.complex64"),
        ("x" * (MAX_STRING_CHARS + 1), ValueError, f"'bad' is a string of {MAX_STRING_CHARS + 1} characters"),
    ],
)
def test_a_value_messages_cannot_carry_is_refused_naming_its_key(control_store, store_client, value, error, needle) -> None:
    publisher = MessagePublisher(unsigned(control_store))
    publisher.publish({"fine": 1})
    with pytest.raises(error) as raised:
        publisher.publish({"also_fine": 2, "bad": value})
    assert needle in str(raised.value)
    landed(control_store)
    assert MessageReader(unsigned(store_client()), 0).read() == {"fine": 1}, "a refused publish publishes nothing"


def test_messages_too_big_together_are_refused_naming_the_keys(control_store) -> None:
    publisher = MessagePublisher(unsigned(control_store))
    third = torch.full((MAX_TENSOR_ELEMENTS,), 1 / 3)  # about 20 characters of JSON per element
    publisher.publish({"a": third, "b": third})
    with pytest.raises(ValueError, match=f"with 'c', 'd' the messages take .* bytes of JSON; at most {MAX_MESSAGES_BYTES}"):
        publisher.publish({"c": third, "d": third})


def test_a_bad_value_in_the_store_is_ignored_with_a_warning(control_store, store_client, caplog) -> None:
    reader = MessageReader(unsigned(store_client()), worker_id=3)
    MessagePublisher(unsigned(control_store)).publish({"epsilon": 0.5})
    landed(control_store)
    assert reader.read() == {"epsilon": 0.5}
    with caplog.at_level(logging.WARNING, logger="fabric_weightsync.messages"):
        control_store.set(MESSAGES_KEY, b"{not json")
        landed(control_store)
        assert reader.read() == {"epsilon": 0.5}, "the last good values stand"
        control_store.set(MESSAGES_KEY, json.dumps({"epsilon": 0.25, "t": {"dtype": "nope", "shape": [1], "data": [1]}}).encode())
        landed(control_store)
        assert reader.read() == {"epsilon": 0.25}, "only the bad key is skipped"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings
    assert f"worker 3 ignores store key {MESSAGES_KEY!r}" in warnings[0]
    assert "worker 3 ignores message 't'" in warnings[1] and "unknown dtype 'nope'" in warnings[1]


def test_a_reader_keeps_the_last_values_once_the_store_is_gone() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=2))
    reader = MessageReader(unsigned(client), worker_id=0)
    MessagePublisher(unsigned(server)).publish({"phase": "eval"})
    landed(server)
    assert reader.read() == {"phase": "eval"}
    del server  # training rank 0 died with its store
    assert reader.read() == {"phase": "eval"}


# ---------------------------------------------------------------------------------------------------- end to end
def make_policy() -> nn.Module:
    return nn.Linear(4, 2)


def budget_worker(ctx, out_dir: str) -> None:
    """Collect, send, wait for the next version, and stop when the trainer says the budget is spent."""
    torch.set_num_threads(1)
    receiver = ctx.connect(make_policy())
    rollouts, reason, seen = 0, "training ended", {}
    while not ctx.stop_requested:
        seen = ctx.messages
        if seen.get("budget_reached"):
            reason = "budget reached"
            break
        version = receiver.version
        rollouts += 1
        if not ctx.send({"obs": torch.randn(8, 4)}, version=version):
            break
        receiver.wait_for_version(version + 1, timeout=60)
    record = {"rollouts": rollouts, "reason": reason, "epsilon": seen.get("epsilon"), "schedule": seen["schedule"].tolist()}
    Path(out_dir, f"worker{ctx.worker_id}.json").write_text(json.dumps(record))


def train_on_a_budget(fabric: Fabric, out_dir: str) -> None:
    torch.set_num_threads(1)
    policy = make_policy()
    model, optimizer = fabric.setup(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    fabric.strategy.publish(epsilon=0.3, schedule=torch.tensor([1.0, 0.5]))
    stream, scheme = fabric.strategy.experience(), fabric.strategy.scheme
    for update in range(ROLLOUTS):
        batches = stream.get(len(stream.worker_ids))
        fabric.backward(model(torch.cat([b.data["obs"] for b in batches])).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        if update == ROLLOUTS - 1:
            fabric.strategy.publish(budget_reached=True, epsilon=0.0)  # before the push that wakes the workers
        fabric.strategy.push()
    # Training ends only once the workers left on their own: a stop they saw at its end would prove nothing.
    left = poll_until(lambda: not any(w.alive for w in scheme.workers), 60, max_pause=SLOW_POLL_S)
    Path(out_dir, "rank0.json").write_text(json.dumps({"workers_left": left}))


@pytest.mark.timeout(90)
def test_workers_stop_on_the_trainers_budget_message_without_an_extra_rollout(tmp_path: Path, launch_fabric) -> None:
    launch_fabric(
        functools.partial(train_on_a_budget, out_dir=str(tmp_path)),
        functools.partial(budget_worker, out_dir=str(tmp_path)),
        workers=2,
        callbacks=[WeightSyncCallback(every_n_steps=None)],
    )
    assert json.loads((tmp_path / "rank0.json").read_text())["workers_left"], "the workers did not stop on the message"
    for worker_id in (0, 1):
        worker = json.loads((tmp_path / f"worker{worker_id}.json").read_text())
        assert worker == {"rollouts": ROLLOUTS, "reason": "budget reached", "epsilon": 0.0, "schedule": [1.0, 0.5]}, worker
