"""``DistributedTransport`` between real processes: this test process is the sender (pair rank 0) and hosts the
TCPStore on a free port; worker peers (tests/scripts/transport_peers.py) run in separate processes and record
what they received. Weights are compared exactly, versions included.

Peers are forked from a forkserver that imported the package once per session: a fresh ``spawn`` per peer would
re-import Lightning (seconds each) without testing anything more.
"""

import glob
import multiprocessing
import multiprocessing.forkserver
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from tensordict import TensorDict

from conftest import SCRIPTS_DIR
from fabric_weightsync import DistributedTransport, SchemaMismatchError, make_wire_buffer
from fabric_weightsync.channels import new_pair_group

sys.path.insert(0, str(SCRIPTS_DIR))
import transport_peers as peers  # noqa: E402

TIMEOUT = peers.TIMEOUT
CHANNELS = ["group", "shm", "auto"]
EXPECTED_CHANNEL = {"group": "group", "shm": "shm", "auto": "shm"}  # every peer here shares this host


@pytest.fixture(scope="session")
def forkserver():
    """Started before any test's leftover baseline is taken, so the long-lived server is not a leftover."""
    # The server imports preloads before it sees our sys.path, so preload the installed package (the heavy part);
    # each peer then imports transport_peers itself.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["fabric_weightsync"])
    multiprocessing.forkserver.ensure_running()
    # Wait out the preload here, or the first test's connect timeout would pay for it on a loaded machine.
    mp.start_processes(abs, nprocs=1, start_method="forkserver")


@pytest.fixture
def start_peers(forkserver, tmp_path):
    """Starts ``fn(index, port, out_dir, *args)`` in ``nprocs`` processes; kills any still running at teardown."""
    contexts = []

    def start(fn, nprocs, port, *args):
        context = mp.start_processes(fn, args=(port, str(tmp_path), *args), nprocs=nprocs, join=False, start_method="forkserver")
        contexts.append(context)
        return context

    yield start
    for context in contexts:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def finish(context, timeout: float = 60.0) -> None:
    """Join the peers; a peer's exception fails the test with the peer's traceback."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            pytest.fail(f"peers still running after {timeout:.0f}s")


def results(tmp_path, index: int = 0) -> dict:
    return torch.load(tmp_path / f"peer{index}.pt")


def sender(control_store, model, **kwargs) -> DistributedTransport:
    # Each transport gets its own client: one store client serialises its calls and the transport blocks on it.
    return DistributedTransport(weights_buffer=model, store=peers.client(control_store.port), rank=kwargs.pop("rank", 1), timeout=TIMEOUT, **kwargs)


def perturb(model, amount: float) -> dict:
    """Changes every weight and buffer (so each version is distinct) and returns the new exact values."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.add_(amount if value.is_floating_point() else 1)
    return peers.snapshot(model)


def assert_equal_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), f"{name} differs"


def shm_files() -> set:
    return set(glob.glob("/dev/shm/fabric_weightsync-*"))


def send_two_updates(control_store, start_peers, channel: str, peer, *args) -> list:
    """Connect ``peer`` (``peer(index, port, out_dir, *args)``), send two distinct updates of a policy, close;
    returns the weights sent: initial, first, second."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peer, 1, control_store.port, *args)
    transport.setup_connection_and_weights_on_sender()
    expected = [peers.snapshot(model), perturb(model, 0.5)]
    transport.send_weights(model)
    expected.append(perturb(model, 0.25))
    transport.send_weights(model)
    finish(context)
    transport.close()
    return expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", CHANNELS)
def test_send_weights_and_receive_weights(control_store, start_peers, tmp_path, channel):
    """Synchronous sends of a module, a TensorDict and a state_dict; implicit (last + 1) and explicit versions."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peers.receive_updates, 1, control_store.port, 4)
    transport.setup_connection_and_weights_on_sender()
    assert transport.channel == EXPECTED_CHANNEL[channel]
    expected = [(0, peers.snapshot(model))]

    expected.append((1, perturb(model, 0.5)))
    transport.send_weights(model)  # version defaults to last + 1
    expected.append((2, perturb(model, 0.25)))
    transport.send_weights(TensorDict.from_module(model))
    expected.append((7, perturb(model, -1.0)))
    transport.send_weights(model.state_dict(), version=7)
    assert transport.version == 7
    expected.append((8, perturb(model, 2.0)))
    transport.send_weights(model)
    assert transport.version == 8
    finish(context)
    transport.close()

    got = results(tmp_path)
    assert [version for version, _ in got["seen"]] == [0, 1, 2, 7, 8]
    for (_, weights), (_, want) in zip(got["seen"], expected):
        assert_equal_weights(weights, want)
    assert got["kept_identity"], "received weights must land in the policy's own tensor objects"
    assert got["channel"] == EXPECTED_CHANNEL[channel], "the sender chooses the data plane, the receiver follows"
    assert all(len(home) == 1 for home in got["homes"]), "a flattened policy lives in one storage"
    # Each update is applied by swapping storage with the landing buffer: two homes, alternating.
    homes = [home.pop() for home in got["homes"]]
    assert len(set(homes)) == 2 and all(a != b for a, b in zip(homes, homes[1:])), homes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_policy_tensors_replaced_between_updates(control_store, start_peers, tmp_path, channel):
    """A worker that swaps its policy's tensors for new ones between two updates gets the second one in them."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peers.receive_around_a_reload, 1, control_store.port)
    transport.setup_connection_and_weights_on_sender()
    perturb(model, 0.5)
    transport.send_weights(model)
    want = perturb(model, 0.25)
    transport.send_weights(model)
    finish(context)
    transport.close()
    got = results(tmp_path)
    assert got["seen"][0][0] == 2
    assert_equal_weights(got["seen"][0][1], want)
    assert got["kept_identity"], "the policy's new tensors were updated, not replaced"
    assert len(got["homes"][0]) == 1, "the new tensors were flattened in turn"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_a_wire_buffer_given_by_the_receiver_stays_its_landing_area(control_store, start_peers, tmp_path, channel):
    """A worker that passes its own wire buffer reads every update there; its policy is updated in place."""
    expected = send_two_updates(control_store, start_peers, channel, peers.receive_into_a_given_buffer, 2)[1:]
    got = results(tmp_path)
    assert got["still_ours"], "the transport kept landing in the caller's buffer"
    for (_, weights), want in zip(got["seen"], expected):
        assert_equal_weights(weights, want)
    assert_equal_weights(got["policy"], expected[-1])
    assert got["homes"][0] == got["before"], "the policy was not moved into the caller's buffer"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_receiver_that_does_not_flatten_keeps_the_policy_memory(control_store, start_peers, tmp_path, channel):
    """``flatten_weights=False``: every update is copied into the policy's tensors where they always were."""
    expected = send_two_updates(control_store, start_peers, channel, peers.receive_updates, 2, False)
    got = results(tmp_path)
    for (_, weights), want in zip(got["seen"], expected):
        assert_equal_weights(weights, want)
    assert all(home == got["before"] for home in got["homes"]), "the policy's tensors never moved"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_send_weights_from_a_wire_buffer(control_store, start_peers, tmp_path, channel):
    """A caller-made wire buffer is sent as is, with the version given."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peers.receive_updates, 1, control_store.port, 1)
    try:
        transport.setup_connection_and_weights_on_sender()
        expected = perturb(model, 0.5)
        transport.send_weights(make_wire_buffer(model), version=3)
        finish(context)
    finally:
        transport.close()
    version, weights = results(tmp_path)["seen"][-1]
    assert version == 3
    assert_equal_weights(weights, expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_setup_connection_with_given_initial_weights(control_store, start_peers, tmp_path, channel):
    """``setup_connection_and_weights_on_sender(weights)`` sends those weights, not the transport's copy."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peers.receive_updates, 1, control_store.port, 1)
    try:
        initial = perturb(model, 0.5)  # the transport copied the model before this
        transport.setup_connection_and_weights_on_sender(weights=model)
        later = perturb(model, 0.5)
        transport.send_weights(model)
        finish(context)
    finally:
        transport.close()
    seen = results(tmp_path)["seen"]
    assert [version for version, _ in seen] == [0, 1]
    assert_equal_weights(seen[0][1], initial)
    assert_equal_weights(seen[1][1], later)


@pytest.mark.timeout(60)
def test_close_removes_the_shared_memory_file(control_store, start_peers, tmp_path):
    model = peers.make_policy(seed=0)
    before = shm_files()
    transport = sender(control_store, model, channel="shm")
    context = start_peers(peers.receive_updates, 1, control_store.port, 1)
    transport.setup_connection_and_weights_on_sender()
    transport.send_weights(model)
    finish(context)
    transport.close()
    # The file is named after the transport's rank; other runs on this host may add files meanwhile, so a leak
    # can only be asserted on those with our suffix (a concurrent run's file could make this fail, never pass).
    assert not [path for path in shm_files() - before if path.endswith("-1")]


@pytest.mark.timeout(60)
def test_receive_weights_returns_none_when_nothing_is_sent(control_store, start_peers, tmp_path):
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model)
    wait_s = 0.5
    context = start_peers(peers.receive_after_empty_polls, 1, control_store.port, wait_s)
    transport.setup_connection_and_weights_on_sender()
    control_store.wait([peers.POLLED_KEY], timedelta(seconds=TIMEOUT))  # both empty receives are over
    expected = perturb(model, 0.5)
    transport.send_weights(model)
    finish(context)
    transport.close()

    got = results(tmp_path)
    assert got["waited"] is None and got["polled"] is None
    assert wait_s <= got["waited_s"] < wait_s + 5.0, "receive_weights(timeout) must wait about that long, then give up"
    # The bound is the feature: one poll is a store round trip; a receive that waited would take TIMEOUT (20 s).
    assert got["polled_s"] < 5.0, "receive_weights(0) polls once"
    assert got["unchanged"] and got["version_after_polls"] == 0
    # A timed-out receive leaves the transport usable.
    assert got["got_update"] and got["version"] == 1
    assert_equal_weights(got["weights"], expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_send_weights_async_and_wait_ack_to_two_workers(control_store, start_peers, tmp_path, channel):
    model = peers.make_policy(seed=0)
    transports = [sender(control_store, model, rank=rank, sync=False, channel=channel) for rank in (1, 2)]
    context = start_peers(peers.receive_updates, 2, control_store.port, 3)
    expected = [peers.snapshot(model)]
    for transport in transports:
        transport.setup_connection_and_weights_on_sender()
    for version in (1, 2, 3):
        for transport in transports:
            transport.send_weights_async(model)
        expected.append(peers.snapshot(model))
        # In flight to both workers: changing the model now must not change what they receive.
        perturb(model, 1.5)
        for transport in transports:
            transport.wait_ack()
            assert transport.version == version
    finish(context)
    for transport in transports:
        transport.close()

    for index in (0, 1):
        got = results(tmp_path, index)
        assert [version for version, _ in got["seen"]] == [0, 1, 2, 3], f"worker {index}"
        for (_, weights), want in zip(got["seen"], expected):
            assert_equal_weights(weights, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_send_weights_async_twice_without_wait_ack(control_store, start_peers, tmp_path, channel):
    """A second async send first finishes the one in flight: restaging must not rewrite a buffer being read."""
    model = peers.make_policy(seed=0)
    transport = sender(control_store, model, sync=False, channel=channel)
    context = start_peers(peers.receive_updates, 1, control_store.port, 2)
    transport.setup_connection_and_weights_on_sender()
    expected = [peers.snapshot(model), perturb(model, 0.5)]
    transport.send_weights_async(model)
    expected.append(perturb(model, 0.25))
    transport.send_weights_async(model)  # no wait_ack in between
    transport.wait_ack()
    finish(context)
    transport.close()

    got = results(tmp_path)
    assert [version for version, _ in got["seen"]] == [0, 1, 2]
    for (_, weights), want in zip(got["seen"], expected):
        assert_equal_weights(weights, want)


@pytest.mark.timeout(60)
def test_send_and_receive_initial_weights_on_a_given_group(control_store, start_peers, tmp_path):
    """The initial-weights pair without the connect handshake, on a pair group passed as ``group=``."""
    model = peers.make_policy(seed=0)
    perturb(model, 0.5)
    context = start_peers(peers.receive_initial, 1, control_store.port, "test/initial")
    client = peers.client(control_store.port)
    group = new_pair_group(client, "test/initial", 0, "gloo", TIMEOUT)  # rendezvous with the peer's side
    transport = DistributedTransport(weights_buffer=model, store=client, rank=1, group=group, timeout=TIMEOUT)
    transport.send_initial_weights(model)
    assert transport.version == 0
    finish(context)
    transport.close()

    got = results(tmp_path)
    assert got["version"] == 0
    assert_equal_weights(got["received"], peers.snapshot(model))
    assert got["policy_untouched"], "receive_initial_weights returns the weights; applying them is the caller's call"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "hidden, dtype, fragments",
    [
        (8, "float32", ["'0.weight'", "[16, 4]", "[8, 4]"]),
        (16, "float64", ["'0.weight'", "torch.float32", "torch.float64"]),
    ],
    ids=["shape", "dtype"],
)
def test_schema_mismatch_raises_on_both_sides(control_store, start_peers, tmp_path, hidden, dtype, fragments):
    model = peers.make_policy(hidden=16, seed=0)
    transport = sender(control_store, model)
    context = start_peers(peers.connect_with_policy, 1, control_store.port, hidden, dtype)
    with pytest.raises(SchemaMismatchError) as trainer_error:
        transport.setup_connection_and_weights_on_sender()
    finish(context)
    transport.close()

    worker_error = results(tmp_path)["error"]
    assert worker_error is not None, "the worker must be told, not left waiting"
    for message in (str(trainer_error.value), worker_error):
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} missing from: {message}"
    assert results(tmp_path)["policy_untouched"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("channel", ["group", "shm"])  # shm lands in the mapped file first: another code path
def test_receive_weights_into_buffer_and_with_strategy(control_store, start_peers, tmp_path, channel):
    model = peers.make_policy(seed=0)
    own_initial = peers.snapshot(peers.make_policy(seed=100))  # what the peer's policy starts as
    transport = sender(control_store, model, channel=channel)
    context = start_peers(peers.receive_into_buffers, 1, control_store.port)
    transport.setup_connection_and_weights_on_sender()
    expected = [peers.snapshot(model)]
    for amount in (0.5, 0.25, 2.0):
        expected.append(perturb(model, amount))
        transport.send_weights(model)
    finish(context)
    transport.close()

    got = results(tmp_path)
    assert_equal_weights(got["initial_buffer"], expected[0])
    assert_equal_weights(got["policy_after_connect"], own_initial)  # no model= given: the policy is not touched

    first = got["first"]
    assert first["is_buffer"], "receive_weights(weights=buf) returns buf, filled in"
    assert first["version"] == 1
    assert_equal_weights(first["buffer"], expected[1])
    assert_equal_weights(first["policy"], own_initial)

    second = got["second"]
    assert not second["returned_none"] and second["version"] == 2
    assert_equal_weights(second["policy"], expected[2])  # model= with a state_dict WeightStrategy

    third = got["third"]
    assert third["version"] == 3
    assert_equal_weights(third["buffer"], expected[3])
    assert_equal_weights(third["policy"], expected[3])


@pytest.mark.timeout(60)
def test_abort_after_close_leaves_the_next_connection_alone(control_store):
    """A failure declared for a connection that already closed must not abort, or leave keys for, the next one.

    (Rank 0's link can be opening this rank's next connection by the time the failure reaches the old one.)
    """
    model = peers.make_policy(seed=0)
    client = peers.client(control_store.port)
    old = sender(control_store, model)
    old.close()
    old.abort(client)
    assert not client.check(["NODE_1_ready"]) and not client.check(["NODE_1_out"])
    new = sender(control_store, model)
    new.abort(client)  # an open transport still wakes whoever waits on it
    assert client.get("NODE_1_ready") == b"abort" and client.get("NODE_1_out") == b"abort"
    new.close()
