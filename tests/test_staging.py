"""Rank 0's side of a push, in-process: the flattened trainer weights and the shared-memory staging's locks.

Real files in /dev/shm, real ``flock`` locks and a real control store on loopback; a second ``SharedStaging.open``
of the same files is an independent reader exactly as a worker process is (flock locks belong to the open file).
"""

import threading
import time

import pytest
import torch
from torch import nn

from fabric_weightsync import SchemaMismatchError, WeightSchema, WeightSyncScheme
from fabric_weightsync.channels import SharedMemoryChannel, SharedStaging
from fabric_weightsync.control import ControlPlane
from fabric_weightsync import flat as flat_module
from fabric_weightsync import scheme as scheme_module
from fabric_weightsync.flat import FlatWeights
from fabric_weightsync.weights import WEIGHTS_KEY, make_wire_buffer, named_weights, read_header, weights_offset


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings buffers, one of them int64: the flat storage holds mixed dtypes.
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def sources(model: nn.Module) -> tuple[WeightSchema, list[torch.Tensor]]:
    named = named_weights(model)
    schema = WeightSchema.of(named)
    return schema, [named[name] for name, _, _ in schema.entries]


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def staged_state(wire, schema: WeightSchema) -> dict:
    return {name: wire[WEIGHTS_KEY][name].clone() for name, _, _ in schema.entries}


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{name} differs"


# ---------------------------------------------------------------------- FlatWeights
def test_flat_weights_live_in_one_storage_with_the_wire_layout():
    model = make_model()
    before = state(model)
    params = list(model.parameters())
    schema, tensors = sources(model)
    flat = FlatWeights.adopt(model, schema, tensors)
    assert flat is not None
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params)), "same Parameter objects"
    base = flat.storage.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in named_weights(model).values()), "one storage holds every weight"
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} changed when it moved"
    wire = make_wire_buffer(make_model(seed=1))
    flat.stage_into(wire)  # one copy lands every weight where a wire buffer of this schema has it
    assert_same(staged_state(wire, schema), before)
    assert flat.probe.unchanged()


def test_flat_weights_swap_in_a_landed_buffer():
    """A worker's side: applying a landed wire buffer moves the weights into it; the former home is returned."""
    model = make_model()
    params = list(model.parameters())
    schema, tensors = sources(model)
    flat = FlatWeights.adopt(model, schema, tensors)
    home = flat.wire
    landed = make_wire_buffer(make_model(seed=1))
    want = staged_state(landed, schema)
    assert flat.swap(landed) is home
    assert flat.wire is landed and flat.probe.unchanged(), "the probe follows the weights to their new home"
    assert all(a is b for a, b in zip(model.parameters(), params)), "same Parameter objects"
    base = flat.storage.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in named_weights(model).values())
    assert_same(state(model), want)
    with torch.no_grad():
        home[WEIGHTS_KEY].apply_(lambda t: t.fill_(3))  # the next update lands in the former home
    assert flat.swap(home) is landed
    assert all(t.untyped_storage().data_ptr() == home["weights"][name].untyped_storage().data_ptr() for name, t in named_weights(model).items())
    assert all((t == 3).all() for t in named_weights(model).values())


def test_flat_weights_stage_in_chunks_and_report_each(monkeypatch):
    """A reported staging copy writes the storage front to back and reports every prefix it completed."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    model = make_model()
    schema, tensors = sources(model)
    flat = FlatWeights.adopt(model, schema, tensors)
    assert flat.streams, "more than one chunk of host weights"
    wire = make_wire_buffer(make_model(seed=1))
    storage, reported = wire._fws_storage, []

    def report(end: int) -> None:  # everything before `end` is already the trainer's, nothing after it yet
        assert torch.equal(storage[weights_offset() : end], flat.storage[weights_offset() : end])
        reported.append(end)

    flat.stage_into(wire, report)
    assert reported == sorted(reported) and reported[-1] == storage.numel() and len(reported) > 1
    assert_same(staged_state(wire, schema), state(model))


def test_flat_weights_already_in_a_wire_layout_are_taken_where_they_are():
    """A second adoption (a worker that reconnects with its flattened policy) moves nothing and still swaps."""
    model = make_model()
    schema, tensors = sources(model)
    first = FlatWeights.adopt(model, schema, tensors)
    addresses = [t.data_ptr() for t in tensors]
    again = FlatWeights.adopt(model, schema, tensors)
    assert again is not None and again.storage.data_ptr() == first.storage.data_ptr()
    assert [t.data_ptr() for t in tensors] == addresses and again.probe.unchanged()
    landed = make_wire_buffer(make_model(seed=3))
    want = staged_state(landed, schema)
    again.swap(landed)
    assert_same(state(model), want)


def test_flat_weights_still_train():
    """The optimizer and autograd keep working on the moved parameters, and the flat storage sees every step."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    flat = FlatWeights.adopt(model, *sources(model))
    wire = make_wire_buffer(model)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        flat.stage_into(wire)
        assert_same(staged_state(wire, sources(model)[0]), state(model))


@pytest.mark.parametrize(
    "change",
    ["move data", "replace parameter", "replace submodule", "half precision"],
)
def test_flat_probe_sees_weights_that_left_the_storage(change):
    model = make_model()
    flat = FlatWeights.adopt(model, *sources(model))
    with torch.no_grad():
        if change == "move data":
            model[0].weight.data = model[0].weight.detach().clone()
        elif change == "replace parameter":
            model[2].bias = nn.Parameter(torch.zeros(3))
        elif change == "replace submodule":
            model[2] = nn.Linear(5, 3)
        else:
            model[0].half()
    assert not flat.probe.unchanged(), f"{change} must be detected: the flat storage no longer holds those weights"


def test_tensors_that_cannot_move_keep_their_memory():
    """A weight that aliases other memory (here: a view of a bigger tensor) must not be moved: flattening is skipped."""
    model = make_model()
    backing = torch.zeros(100)
    with torch.no_grad():
        model[2].bias.data = backing[:3]
    assert FlatWeights.adopt(model, *sources(model)) is None
    shared = make_model().share_memory()
    assert FlatWeights.adopt(shared, *sources(shared)) is None


# ---------------------------------------------------------------------- the scheme's push
@pytest.fixture
def control(control_store):
    """Rank 0's control plane, bootstrapped from the store this test hosts."""
    yield ControlPlane.serve("127.0.0.1", control_store.port, 30.0)


@pytest.fixture
def scheme_of(control):
    """A started scheme (no worker ever connects); closed at teardown, which removes its staging files."""
    schemes = []

    def start(model: nn.Module, workers: int = 1, **kwargs) -> WeightSyncScheme:
        scheme = WeightSyncScheme(control, workers, **kwargs)
        scheme.start(model)
        schemes.append(scheme)
        return scheme

    yield start
    for scheme in schemes:
        scheme.close()


def published(scheme: WeightSyncScheme) -> tuple[int, dict]:
    """(version, weights) of the scheme's newest publication, as a worker mapping the files sees it."""
    staging = scheme._staging
    reader = SharedStaging.open(staging.schema, staging.paths, staging.board_path)
    try:
        _, index, version = reader.published()
        return version, staged_state(reader.buffers[index], staging.schema)
    finally:
        reader.close()


@pytest.mark.timeout(30)
def test_push_stages_the_moved_weights_and_follows_them_when_they_move_again(scheme_of):
    model = make_model()
    scheme = scheme_of(model, transport="shm")
    assert scheme._flat is not None, "plain CPU weights are flattened by default"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert scheme.push(1)
    version, weights = published(scheme)
    assert version == 1
    assert_same(weights, state(model))

    with torch.no_grad():  # the user moves a weight's data elsewhere: the next push must follow it, not stage stale bytes
        model[0].weight.data = torch.full_like(model[0].weight, 7.0)
    assert scheme.push(2)
    version, weights = published(scheme)
    assert version == 2 and torch.equal(weights["0.weight"], torch.full((5, 4), 7.0))
    assert scheme._layout_probe.unchanged(), "the moved weight was flattened again"

    model[2].weight = nn.Parameter(torch.zeros(4, 5))  # a different shape: workers cannot take it
    with pytest.raises(SchemaMismatchError, match=r"'2.weight'.*\[3, 5\].*\[4, 5\]"):
        scheme.push(3)


@pytest.mark.timeout(30)
def test_a_worker_copies_behind_a_streamed_push(scheme_of, monkeypatch):
    """Big shared-memory staging is published before it is written: a worker that polls meanwhile copies behind
    the trainer, chunk by chunk, and lands exactly the pushed weights."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    monkeypatch.setattr(scheme_module, "_available_cores", lambda: 8)  # a core for the worker, whatever the host
    model = make_model()
    scheme = scheme_of(model, transport="shm")
    assert scheme._streams, "flat host weights of several chunks on shared memory"
    staging = scheme._staging
    report = staging.filled
    worker_started = threading.Event()

    def slow_report(index: int, nbytes: int) -> None:
        """A slow trainer: once the buffer is published, it writes the next chunk only after the worker started
        copying, so the worker's copy must overlap the trainer's write."""
        report(index, nbytes)
        if staging.published()[1] == index and not worker_started.wait(10):
            worker_started.set()  # the worker never came: let the push end, the assertions below say why

    monkeypatch.setattr(staging, "filled", slow_report)
    reader = SharedStaging.open(staging.schema, staging.paths, staging.board_path)
    channel = SharedMemoryChannel(reader, rank=1, timeout=10.0, aborted=lambda: False)
    landing = make_wire_buffer(make_model(seed=5))
    seen = {}

    def worker() -> None:
        assert channel.take_notice(10.0)
        _, index, _ = reader.published()
        seen["fill at start"] = reader.fill_of(index)
        worker_started.set()
        seen["landed"] = channel.receive(landing, 0, land=True)

    thread = threading.Thread(target=worker)
    thread.start()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    try:
        assert scheme.push(1)
        thread.join(10)
        assert seen["landed"] is landing
        assert seen["fill at start"] < reader.nbytes, "the worker started while the trainer was still writing"
        assert read_header(landing)[0] == 1
        assert_same(staged_state(landing, staging.schema), state(model))
        assert reader.try_lock(scheme._latest), "the worker let go of the buffer once its copy was done"
        reader.unlock(scheme._latest)
    finally:
        reader.close()


@pytest.mark.timeout(30)
def test_a_streamed_push_interrupted_between_chunks_still_completes_its_publication(scheme_of, monkeypatch):
    """Workers may be copying a streamed update already: a KeyboardInterrupt mid-push must not leave it half-written."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    monkeypatch.setattr(scheme_module, "_available_cores", lambda: 8)
    model = make_model()
    scheme = scheme_of(model, transport="shm")
    staging = scheme._staging
    report, calls = staging.filled, []

    def interrupted_report(index: int, nbytes: int) -> None:
        report(index, nbytes)
        calls.append(nbytes)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(staging, "filled", interrupted_report)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        scheme.push(1)
    monkeypatch.setattr(staging, "filled", report)
    _, index, _ = staging.published()
    assert staging.fill_of(index) == staging.nbytes, "the published buffer is whole"
    version, weights = published(scheme)
    assert version == 1
    assert_same(weights, state(model))


@pytest.mark.timeout(30)
def test_flatten_weights_false_keeps_the_weights_memory(scheme_of):
    model = make_model()
    addresses = [t.data_ptr() for t in named_weights(model).values()]
    scheme = scheme_of(model, transport="gloo", flatten_weights=False)
    assert scheme._flat is None and addresses == [t.data_ptr() for t in named_weights(model).values()]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert scheme.push(1)
    assert torch.equal(scheme._buffers[scheme._latest][WEIGHTS_KEY]["0.weight"], model[0].weight)


@pytest.mark.timeout(30)
def test_push_never_waits_on_a_worker_copying_from_shared_memory(scheme_of):
    """A worker's shared lock keeps the trainer off that buffer; with both locked the push is deferred, not blocked."""
    model = make_model()
    scheme = scheme_of(model, transport="shm")  # its one worker never connects: the trainer must ask the locks
    staging = scheme._staging
    reader = SharedStaging.open(staging.schema, staging.paths, staging.board_path)
    try:
        assert scheme.push(1)
        older, newest = 1 - scheme._latest, scheme._latest
        assert reader.try_lock(older, shared=True)
        assert scheme.push(2), "the newest buffer is free: the push goes there"
        assert scheme._latest == newest and published(scheme)[0] == 2

        assert reader.try_lock(newest, shared=True)  # now a worker copies out of each buffer
        started = time.monotonic()
        assert not scheme.push(3), "both buffers are being read: the version is remembered"
        # The bound is the feature: a push that waited for the readers would wait forever (this very thread holds
        # their locks); one that does not returns in microseconds. 5 s leaves room for a loaded machine.
        assert time.monotonic() - started < 5.0, "push() must not wait for a reader"
        assert published(scheme)[0] == 2, "nothing was written under a reader"

        reader.unlock(older)
        reader.unlock(newest)
        scheme.flush(0.2)  # stages the remembered version (the worker that never connected keeps it from returning True)
        assert published(scheme)[0] == 3
    finally:
        reader.close()


@pytest.mark.timeout(30)
def test_a_dead_readers_lock_goes_with_its_process(scheme_of, tmp_path):
    """A worker killed while copying cannot leave a buffer locked: the kernel drops its flock with the process."""
    import subprocess
    import sys

    model = make_model()
    scheme = scheme_of(model, transport="shm")
    staging = scheme._staging
    assert scheme.push(1)
    script = (
        "import fcntl, os, sys, time\n"
        "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]\n"
        "[fcntl.flock(fd, fcntl.LOCK_SH) for fd in fds]\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, *staging.paths], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert not scheme.push(2), "both buffers are locked by the reader process"
        proc.kill()
        proc.wait(10)
        assert scheme.push(3), "the killed reader's locks are gone"
        assert published(scheme)[0] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
