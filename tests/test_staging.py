"""Rank 0's side of a push, in-process and without threads: the flattened trainer weights and the staging's
double buffer with its shared-memory locks.

Real files in /dev/shm and real ``flock`` locks; a second ``SharedStaging.open`` of the same files is an
independent reader exactly as a worker process is (flock locks belong to the open file).
"""

import threading

import pytest
import torch
from torch import nn

import fabric_weightsync.flat as flat_module
import fabric_weightsync.staging as staging_module
from fabric_weightsync import SchemaMismatchError, WeightSchema, make_wire_buffer
from fabric_weightsync.channels import Endpoint, SharedStaging, channel_named
from fabric_weightsync.flat import FlatWeights
from fabric_weightsync.staging import Staging
from fabric_weightsync.weights import named_weights


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
    return {name: wire.weights[name].clone() for name, _, _ in schema.entries}


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
    base = flat.wire.storage.untyped_storage().data_ptr()
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
    base = flat.wire.storage.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in named_weights(model).values())
    assert_same(state(model), want)
    with torch.no_grad():
        home.weights.apply_(lambda t: t.fill_(3))  # the next update lands in the former home
    assert flat.swap(home) is landed
    assert all(t.untyped_storage().data_ptr() == home.weights[name].untyped_storage().data_ptr() for name, t in named_weights(model).items())
    assert all((t == 3).all() for t in named_weights(model).values())


def test_flat_weights_stage_in_chunks_and_report_each(monkeypatch):
    """A reported staging copy writes the storage front to back and reports every prefix it completed."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    model = make_model()
    schema, tensors = sources(model)
    flat = FlatWeights.adopt(model, schema, tensors)
    assert flat.streams, "more than one chunk of host weights"
    wire = make_wire_buffer(make_model(seed=1))
    storage, start, reported = wire.storage, wire.layout.data_offset, []

    def report(end: int) -> None:  # everything before `end` is already the trainer's, nothing after it yet
        assert torch.equal(storage[start:end], flat.wire.storage[start:end])
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
    assert again is not None and again.wire.storage.data_ptr() == first.wire.storage.data_ptr()
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


# ---------------------------------------------------------------------- the staging's double buffer
@pytest.fixture
def staging_of():
    """A started staging (no worker ever reads it through a transport); closed at teardown, removing its files."""
    stagings = []

    def start(model: nn.Module, workers: int = 1, shared: bool = True, flatten: bool = True) -> Staging:
        staging = Staging(model, workers=workers, shared=shared, device=torch.device("cpu"), checksum=False, flatten=flatten)
        staging.start(0)
        stagings.append(staging)
        return staging

    yield start
    for staging in stagings:
        staging.close()


def published(staging: Staging) -> tuple[int, dict]:
    """(version, weights) of the newest publication, as a worker mapping the files sees it."""
    shared = staging.shared
    reader = SharedStaging.open(shared.schema, shared.paths, shared.board_path)
    try:
        _, index, version = reader.published()
        return version, staged_state(reader.buffers[index], shared.schema)
    finally:
        reader.close()


def weights_share_one_storage(model: nn.Module) -> bool:
    return len({t.untyped_storage().data_ptr() for t in named_weights(model).values()}) == 1


def test_stage_copies_the_moved_weights_and_follows_them_when_they_move_again(staging_of):
    model = make_model()
    staging = staging_of(model)
    assert weights_share_one_storage(model), "plain CPU weights are flattened by default"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert staging.stage(1) and staging.latest_version == 1
    version, weights = published(staging)
    assert version == 1
    assert_same(weights, state(model))

    with torch.no_grad():  # the user moves a weight's data elsewhere: the next push must follow it, not stage stale bytes
        model[0].weight.data = torch.full_like(model[0].weight, 7.0)
    assert staging.stage(2)
    version, weights = published(staging)
    assert version == 2 and torch.equal(weights["0.weight"], torch.full((5, 4), 7.0))
    with torch.no_grad():  # and keeps following it (the layout check was rebuilt for the new tensor)
        model[0].weight.fill_(8.0)
    assert staging.stage(3) and torch.equal(published(staging)[1]["0.weight"], torch.full((5, 4), 8.0))

    model[2].weight = nn.Parameter(torch.zeros(4, 5))  # a different shape: workers cannot take it
    with pytest.raises(SchemaMismatchError, match=r"'2.weight'.*\[3, 5\].*\[4, 5\]"):
        staging.stage(4)


@pytest.mark.timeout(30)
def test_a_worker_copies_behind_a_streamed_push(staging_of, monkeypatch):
    """Big shared-memory staging is published before it is written: a worker that polls meanwhile copies behind
    the trainer, chunk by chunk, and lands exactly the pushed weights."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    monkeypatch.setattr(staging_module, "available_cores", lambda: 8)  # a core for the worker, whatever the host
    model = make_model()
    staging = staging_of(model)
    assert staging.streams, "flat host weights of several chunks on shared memory"
    shared = staging.shared
    worker_started = threading.Event()
    report = shared.filled

    def gated_report(index: int, nbytes: int) -> None:  # the trainer holds its first data chunk until the worker looks
        report(index, nbytes)
        if nbytes > shared.schema.layout.data_offset and not worker_started.is_set():
            assert worker_started.wait(10), "the worker never saw the publication"

    monkeypatch.setattr(shared, "filled", gated_report)
    endpoint = Endpoint(store=None, rank=1, timeout=10.0, aborted=lambda: False)
    channel = channel_named("shm").for_receiver(endpoint, {"files": shared.paths, "board": shared.board_path}, shared.schema)
    reader = channel.staging
    landing = make_wire_buffer(make_model(seed=5))
    seen = {}

    def worker() -> None:
        assert channel.take_notice(10.0)
        seen["fill at start"] = reader.fill_of(reader.published()[1])
        worker_started.set()
        seen["landed"] = channel.receive(landing, 0, land=True)

    thread = threading.Thread(target=worker)
    thread.start()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    try:
        assert staging.stage(1)
        thread.join(10)
        assert seen["landed"] is landing
        assert seen["fill at start"] < reader.nbytes, "the worker started while the trainer was still writing"
        assert landing.version == 1
        assert_same(staged_state(landing, shared.schema), state(model))
        newest = reader.published()[1]
        assert reader.try_lock(newest), "the worker let go of the buffer once its copy was done"
        reader.unlock(newest)
    finally:
        channel.close()


@pytest.mark.timeout(30)
def test_a_streamed_push_interrupted_between_chunks_still_completes_its_publication(staging_of, monkeypatch):
    """Workers may be copying a streamed update already: a KeyboardInterrupt mid-push must not leave it half-written."""
    monkeypatch.setattr(flat_module, "STREAM_CHUNK_BYTES", 64)
    monkeypatch.setattr(staging_module, "available_cores", lambda: 8)
    model = make_model()
    staging = staging_of(model)
    shared = staging.shared
    report, calls = shared.filled, []

    def interrupted_report(index: int, nbytes: int) -> None:
        report(index, nbytes)
        calls.append(nbytes)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(shared, "filled", interrupted_report)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        staging.stage(1)
    monkeypatch.setattr(shared, "filled", report)
    _, index, _ = shared.published()
    assert shared.fill_of(index) == shared.nbytes, "the published buffer is whole"
    version, weights = published(staging)
    assert version == 1
    assert_same(weights, state(model))


def test_flatten_false_keeps_the_weights_memory(staging_of):
    model = make_model()
    addresses = [t.data_ptr() for t in named_weights(model).values()]
    staging = staging_of(model, shared=False, flatten=False)
    assert addresses == [t.data_ptr() for t in named_weights(model).values()]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert staging.stage(1)
    with staging.pin_latest() as wire:
        assert wire.version == 1 and torch.equal(wire.weights["0.weight"], model[0].weight)


def test_stage_never_waits_on_a_worker_copying_from_shared_memory(staging_of):
    """A worker's shared lock keeps the trainer off that buffer; with both locked the version is remembered."""
    model = make_model()
    staging = staging_of(model)  # its one worker never acknowledges: the trainer must ask the locks
    shared = staging.shared
    reader = SharedStaging.open(shared.schema, shared.paths, shared.board_path)
    try:
        assert staging.stage(1)
        newest = shared.published()[1]
        older = 1 - newest
        assert reader.try_lock(older, shared=True)
        assert staging.stage(2), "the newest buffer is free: the push goes there"
        assert shared.published()[1] == newest and published(staging)[0] == 2

        assert reader.try_lock(newest, shared=True)  # now a worker copies out of each buffer
        assert not staging.stage(3), "both buffers are being read: the version is remembered"
        assert staging.pending_version == 3 and published(staging)[0] == 2, "nothing was written under a reader"

        reader.unlock(older)
        reader.unlock(newest)
        assert staging.stage(staging.pending_version) and staging.pending_version is None
        assert published(staging)[0] == 3
    finally:
        reader.close()


def test_pinned_buffers_are_never_rewritten(staging_of):
    """A buffer being sent is pinned: pushes go to the other one, and with both pinned they are remembered."""
    model = make_model()
    staging = staging_of(model, shared=False)
    with staging.pin_latest() as first:
        assert first.version == 0
        assert staging.stage(1)
        with staging.pin_latest() as second:
            assert second is not first and second.version == 1
            assert not staging.stage(2) and staging.pending_version == 2
            assert first.version == 0 and second.version == 1, "pinned buffers keep their versions"
    assert staging.stage(2) and staging.latest_version == 2


@pytest.mark.timeout(30)
def test_a_dead_readers_lock_goes_with_its_process(staging_of):
    """A worker killed while copying cannot leave a buffer locked: the kernel drops its flock with the process."""
    import subprocess
    import sys

    model = make_model()
    staging = staging_of(model)
    assert staging.stage(1)
    script = (
        "import fcntl, os, sys, time\n"
        "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]\n"
        "[fcntl.flock(fd, fcntl.LOCK_SH) for fd in fds]\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, *staging.shared.paths], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert not staging.stage(2), "both buffers are locked by the reader process"
        proc.kill()
        proc.wait(10)
        assert staging.stage(3), "the killed reader's locks are gone"
        assert published(staging)[0] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
