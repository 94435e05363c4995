"""The experience path, end to end: real Fabric launches (fork), real worker processes, real gloo groups.

Workers build every batch from (worker id, sequence number, policy version), so a trainer can rebuild what it
should have received and compare every byte. Trainers and workers write what they saw to JSON files; the
assertions run here, in the test process.
"""

import functools
import gc
import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.fabric import Fabric

from conftest import clean_env, free_port
from _experience_workers import (
    batch_seq,
    checking_worker,
    episode_worker,
    failing_worker,
    make_batch,
    make_policy,
    reconnecting_worker,
    streaming_worker,
)
from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerFailedError
from fabric_weightsync.experience import ExperienceError, ExperienceRoutes, ExperienceSchema
from tensordict import NonTensorData, TensorDict


@pytest.fixture(autouse=True)
def fresh_master_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each launch gets its own rendezvous port; the launcher writes MASTER_PORT into os.environ.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


SHUTDOWN_TIMEOUT = 20.0


def launch(train_fn: Callable, worker_fn: Callable, *, devices: int, workers: int, **train_kwargs: Any) -> tuple[Any, float]:
    """One fork launch with weight sync; returns training rank 0's result and when the launch returned
    (``time.time()``, to compare with the ``ended`` the training functions record)."""
    # The children inherit this process's garbage: a store server or process group left in a reference cycle by an
    # earlier test would be destroyed by a child's collection, which aborts on the threads the child does not have.
    gc.collect()
    strategy = WeightSyncStrategy(worker_fn, inference_workers=workers, start_method="fork", shutdown_timeout=SHUTDOWN_TIMEOUT)
    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[WeightSyncCallback()])
    result = fabric.launch(functools.partial(train_fn, **train_kwargs))
    return result, time.time()


def assert_prompt_end(out_dir: Path, returned_at: float, what: str) -> None:
    """The end of training, from rank 0's training function returning (its record's ``ended``) to the launch
    returning, took seconds. The bound is the feature: a shutdown that waited on a worker would wait out
    SHUTDOWN_TIMEOUT; it takes a second or two, and half the timeout leaves room for a loaded machine."""
    took = returned_at - read_json(out_dir / "rank0.json")["ended"]
    print(f"\nthe launch ended {took:.2f}s after rank 0's training function returned")
    assert took < SHUTDOWN_TIMEOUT / 2, f"the launch ended {took:.1f}s after training did: {what}"


def setup_model(fabric: Fabric) -> tuple[Any, Any]:
    torch.set_num_threads(1)
    model, optimizer = fabric.setup(make_policy(), torch.optim.SGD(make_policy().parameters(), lr=0.1))
    return model, optimizer


def optimizer_step(fabric: Fabric, model: Any, optimizer: Any) -> None:
    loss = model(torch.randn(4, 2)).pow(2).sum()
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def write_json(path: Path, record: Any) -> None:
    path.write_text(json.dumps(record))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------- content, versions, routing
def train_and_check_content(fabric: Fabric, out_dir: str, updates: int) -> None:
    model, optimizer = setup_model(fabric)
    stream = fabric.strategy.experience(capacity=3)
    taken = []
    for _ in range(updates):
        for batch in stream.get(2):  # the same number on both ranks: DDP steps stay in lockstep
            expected = make_batch(batch.worker_id, batch_seq(batch.data), batch.version)
            equal = set(batch.data.keys(True, True)) == set(expected.keys(True, True)) and all(
                batch.data.get(key).dtype == expected.get(key).dtype and torch.equal(batch.data.get(key), expected.get(key))
                for key in expected.keys(True, True)
            )
            taken.append(
                {
                    "worker": batch.worker_id,
                    "seq": batch_seq(batch.data),
                    "version": batch.version,
                    "policy_version": fabric.strategy.policy_version,
                    "equal": bool(equal),
                    "batch_size": list(batch.data.batch_size),
                }
            )
        optimizer_step(fabric, model, optimizer)
    record = {"taken": taken, "in_use_max": stream.capacity, "ended": time.time()}
    write_json(Path(out_dir, f"rank{fabric.global_rank}.json"), record)


@pytest.mark.timeout(60)
def test_batches_arrive_intact_with_versions_and_route_by_worker_id(tmp_path: Path) -> None:
    """2 training ranks, 4 workers: worker i reaches rank i % 2, byte for byte, in order, tagged with its version."""
    _, returned_at = launch(
        train_and_check_content,
        functools.partial(streaming_worker, out_dir=str(tmp_path), limit=12),
        devices=2,
        workers=4,
        out_dir=str(tmp_path),
        updates=12,
    )
    for rank in (0, 1):
        taken = read_json(tmp_path / f"rank{rank}.json")["taken"]
        assert len(taken) == 24
        assert {t["worker"] for t in taken} == {rank, rank + 2}, f"rank {rank} should hear exactly workers {rank}, {rank + 2}"
        assert all(t["equal"] for t in taken), f"rank {rank}: a batch differs from what its worker sent: {taken}"
        assert all(t["batch_size"] == [5, 3] for t in taken)
        for worker in (rank, rank + 2):
            mine = [t for t in taken if t["worker"] == worker]
            # FIFO per worker, nothing lost or duplicated.
            assert [t["seq"] for t in mine] == list(range(12))
            versions = [t["version"] for t in mine]
            assert versions == sorted(versions), f"worker {worker}: versions went back: {versions}"
            assert all(t["version"] <= t["policy_version"] for t in mine)
            sent = dict(map(tuple, read_json(tmp_path / f"worker{worker}.json")["sent"]))
            # The tag is the version the worker's policy had when it built the batch.
            assert all(sent[t["seq"]] == t["version"] for t in mine)
        assert max(t["version"] for t in taken) >= 1, "weights pushed after each step should reach the workers"
    assert_prompt_end(tmp_path, returned_at, "shutdown waited on a worker")


@pytest.mark.timeout(90)
def test_script_mode_exit_leaves_no_thread_polling_the_store(tmp_path: Path) -> None:
    """``python train.py`` mode: rank 0's shutdown runs at interpreter exit. Its experience receivers and links,
    whose workers have exited, must have finished by then, not be left polling the store: a daemon thread inside
    a store call when the interpreter finalizes aborts the process ("terminate called without an active
    exception")."""
    script = Path(__file__).parent / "scripts" / "experience_exit.py"
    result = subprocess.run([sys.executable, str(script)], env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    left = re.search(r"^THREADS_AFTER_SHUTDOWN (\S+)$", result.stdout, re.MULTILINE)
    assert left and left.group(1) == "none", result.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------- back-pressure
def train_slowly(fabric: Fabric, out_dir: str, takes: int, capacity: int, pause: float) -> None:
    model, optimizer = setup_model(fabric)
    stream = fabric.strategy.experience(capacity=capacity)
    samples = []
    for taken in range(1, takes + 1):
        time.sleep(pause)  # a slow learner: the workers are far faster
        next(stream)
        samples.append({"received": stream.received, "taken": taken, "in_use": stream.in_use, "queued": stream.queued})
        optimizer_step(fabric, model, optimizer)
    write_json(Path(out_dir, "rank0.json"), {"samples": samples, "received": stream.received, "ended": time.time()})


@pytest.mark.timeout(60)
def test_slow_trainer_blocks_workers_and_bounds_the_queue(tmp_path: Path) -> None:
    """capacity=2 and a trainer taking 5 batches/s: workers block in send, the queue never exceeds 2, and workers
    blocked in send at the end of training return cleanly (no error, no shutdown wait)."""
    capacity, takes, pause = 2, 8, 0.2
    _, returned_at = launch(
        train_slowly,
        functools.partial(streaming_worker, out_dir=str(tmp_path)),
        devices=1,
        workers=2,
        out_dir=str(tmp_path),
        takes=takes,
        capacity=capacity,
        pause=pause,
    )
    trainer = read_json(tmp_path / "rank0.json")
    for sample in trainer["samples"]:
        assert sample["in_use"] <= capacity and sample["queued"] <= capacity, sample
        assert sample["received"] - sample["taken"] <= capacity, sample
    workers = [read_json(tmp_path / f"worker{i}.json") for i in (0, 1)]
    sent = sum(len(w["sent"]) for w in workers)
    # Unblocked, each worker would have sent hundreds of these tiny batches in 1.6 s.
    assert sent <= takes + capacity, f"{sent} batches sent for {takes} taken with capacity {capacity}"
    # Sends that completed after the trainer wrote its record were still received (into free slots).
    assert trainer["received"] <= sent
    waits = [d for w in workers for d in w["durations"]]
    assert max(waits) > pause / 2, f"workers never blocked in send: {waits}"
    assert all(w["stopped_in_send"] for w in workers), "a worker blocked in send must return False at the end"
    assert_prompt_end(tmp_path, returned_at, "the end of training waited on blocked workers")


# ---------------------------------------------------------------------------------------------------- staleness
def train_with_staleness(fabric: Fabric, out_dir: str, takes: int, max_staleness: int, steps_per_take: int) -> None:
    model, optimizer = setup_model(fabric)
    stream = fabric.strategy.experience(capacity=6, max_staleness=max_staleness)
    lags = []
    for batch in stream:  # the iterator form
        lags.append(fabric.strategy.policy_version - batch.version)
        for _ in range(steps_per_take):
            optimizer_step(fabric, model, optimizer)
        if len(lags) == takes:
            break
    write_json(
        Path(out_dir, "rank0.json"),
        {"lags": lags, "dropped": stream.dropped, "received": stream.received, "queued": stream.queued},
    )


@pytest.mark.timeout(60)
def test_batches_older_than_max_staleness_are_dropped_and_counted(tmp_path: Path) -> None:
    _, _ = launch(
        train_with_staleness,
        functools.partial(streaming_worker, out_dir=str(tmp_path)),
        devices=1,
        workers=1,
        out_dir=str(tmp_path),
        takes=10,
        max_staleness=2,
        steps_per_take=4,
    )
    trainer = read_json(tmp_path / "rank0.json")
    assert len(trainer["lags"]) == 10
    assert all(0 <= lag <= 2 for lag in trainer["lags"]), trainer["lags"]
    assert trainer["dropped"] > 0, "a queue of 6 batches and 4 steps per take must leave stale batches"
    assert trainer["received"] == len(trainer["lags"]) + trainer["dropped"] + trainer["queued"]


# ---------------------------------------------------------------------------------------------------- errors
def train_for_checks(fabric: Fabric, out_dir: str) -> None:
    model, optimizer = setup_model(fabric)
    stream = fabric.strategy.experience(capacity=1)
    fabric.strategy.control_plane().client().wait(["test/go"], timedelta(seconds=30))
    batches = stream.get(2, timeout=30)
    record = {
        "taken": [
            {
                "seq": batch_seq(b.data),
                "version": b.version,
                "equal": all(
                    torch.equal(b.data.get(k), make_batch(0, batch_seq(b.data), 0).get(k))
                    for k in ("obs", "action", ("next", "done"))
                ),
            }
            for b in batches
        ]
    }
    optimizer_step(fabric, model, optimizer)
    write_json(Path(out_dir, f"rank{fabric.global_rank}.json"), record)


@pytest.mark.timeout(60)
def test_schema_mismatch_and_timeout(tmp_path: Path) -> None:
    """A batch unlike the worker's first is refused in send() naming the key; nothing reaches the trainer.
    A send with no room times out with a clear error, and leaves the path usable."""
    launch(
        train_for_checks,
        functools.partial(checking_worker, out_dir=str(tmp_path)),
        devices=1,
        workers=1,
        out_dir=str(tmp_path),
    )
    worker = read_json(tmp_path / "worker0.json")
    errors = worker["errors"]
    assert worker["first"] is True
    assert "'obs'" in errors["shape"] and "[5, 3, 4], float32" in errors["shape"] and "[5, 3, 5], float32" in errors["shape"]
    assert "'action'" in errors["dtype"] and "int64" in errors["dtype"] and "int32" in errors["dtype"]
    assert "'logprob'" in errors["missing"] and "only on the first batch" in errors["missing"]
    assert "('next', 'extra')" in errors["extra"]
    assert worker["timeout_error"] is not None and "training rank 0" in worker["timeout_error"]
    assert 0.4 < worker["timeout_waited"] < 5
    assert worker["after_timeout"] is True, "a send that timed out waiting for room must leave the path usable"

    taken = read_json(tmp_path / "rank0.json")["taken"]
    # Only the first batch and the one after the timeout arrived: refused batches never left the worker.
    assert [t["seq"] for t in taken] == [0, 2]
    assert taken[0]["version"] == 1234, "an explicit version= must be the tag"
    assert all(t["equal"] for t in taken)


# ---------------------------------------------------------------------------------------------------- fewer workers than ranks
def train_on_shared_worker(fabric: Fabric, out_dir: str, updates: int, per_update: int) -> None:
    """Each rank takes ``per_update`` batches of padded episodes per DDP update and unpads them."""
    model, optimizer = setup_model(fabric)
    stream = fabric.strategy.experience(capacity=2)
    taken = []
    for _ in range(updates):
        for batch in stream.get(per_update):
            data = batch.data
            finished = data[data["length"] > 0]  # the pattern for variable-length data: drop the padding rows
            episodes = [finished["reward"][i, : int(n)].tolist() for i, n in enumerate(finished["length"])]
            taken.append({"worker": batch.worker_id, "seq": int(data["seq"][0]), "episodes": episodes})
        optimizer_step(fabric, model, optimizer)  # a DDP all-reduce: both ranks must get here every update
    record = {"taken": taken, "workers": stream.worker_ids, "policy_version": fabric.strategy.policy_version}
    write_json(Path(out_dir, f"rank{fabric.global_rank}.json"), record)


@pytest.mark.timeout(90)
def test_one_worker_feeds_two_training_ranks(tmp_path: Path) -> None:
    """2 training ranks and 1 worker: each rank hears the worker, takes the same number of batches per update
    (DDP stays in lockstep), and between them they get every batch the worker sent, once, in order per rank.
    The batches carry a varying number of episodes of varying length, padded to a fixed capacity."""
    updates, per_update = 6, 2
    launch(
        train_on_shared_worker,
        functools.partial(episode_worker, out_dir=str(tmp_path)),
        devices=2,
        workers=1,
        out_dir=str(tmp_path),
        updates=updates,
        per_update=per_update,
    )
    ranks = [read_json(tmp_path / f"rank{rank}.json") for rank in (0, 1)]
    worker = read_json(tmp_path / "worker0.json")
    for rank, record in enumerate(ranks):
        assert record["workers"] == [0], f"rank {rank} should receive from worker 0"
        assert len(record["taken"]) == updates * per_update
        seqs = [t["seq"] for t in record["taken"]]
        assert seqs == sorted(seqs), f"rank {rank}: one worker's batches arrive in order: {seqs}"
        assert record["policy_version"] == updates
    seqs = sorted(t["seq"] for record in ranks for t in record["taken"])
    assert len(seqs) == len(set(seqs)), "no batch may reach two ranks"
    # Every batch taken is one the worker sent, unpadded to exactly its episodes.
    sent = {seq: episodes for seq, episodes in worker["sent"]}
    for record in ranks:
        for t in record["taken"]:
            assert t["episodes"] == sent[t["seq"]], f"batch {t['seq']} differs from what the worker sent"
    assert {len(sent[s]) for s in seqs} != {len(sent[seqs[0]])}, "the episode count should vary between batches"
    # The worker handed its batches to both ranks (those sent after the ranks stopped taking may be anywhere).
    assert all(worker["sent_to"][str(rank)] >= updates * per_update for rank in (0, 1)), worker["sent_to"]


def train_until_worker_fails(fabric: Fabric, out_dir: str, **stream_kwargs: Any) -> None:
    setup_model(fabric)
    stream = fabric.strategy.experience(**stream_kwargs)
    record: dict[str, Any] = {}
    try:
        stream.get(10, timeout=30)
        record["error"] = None
    except (WorkerFailedError, ExperienceError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
    write_json(Path(out_dir, "rank0.json"), record)


@pytest.mark.timeout(60)
def test_worker_failure_reaches_the_waiting_trainer(tmp_path: Path) -> None:
    """A trainer blocked in get() learns of the failure at once, not at its next push; the run then fails."""
    # The strategy fails the run at shutdown too, for a failure it saw after the last push.
    with pytest.raises(Exception, match="injected failure in worker 0"):
        launch(
            train_until_worker_fails,
            functools.partial(failing_worker, out_dir=str(tmp_path)),
            devices=1,
            workers=1,
            out_dir=str(tmp_path),
        )
    error = read_json(tmp_path / "rank0.json")["error"]
    assert error is not None and error.startswith("WorkerFailedError")
    assert "injected failure in worker 0" in error


@pytest.mark.timeout(60)
def test_batches_over_max_batch_bytes_are_refused_before_any_buffer(tmp_path: Path) -> None:
    """The training rank checks a worker's declared batch size before allocating for it, and the refusal names the
    worker, the size and the setting on both sides."""
    # The worker raises too (its send was refused). The training function takes the first WorkerFailedError; the
    # run fails at shutdown as well if that one came from the stream and the worker's own report is read after.
    try:
        launch(
            train_until_worker_fails,
            functools.partial(streaming_worker, out_dir=str(tmp_path), limit=1),
            devices=1,
            workers=1,
            out_dir=str(tmp_path),
            max_batch_bytes=100,
        )
    except Exception as err:  # noqa: BLE001 - whichever way it failed, it must say why
        assert "max_batch_bytes=100" in str(err), err
    error = read_json(tmp_path / "rank0.json")["error"]
    assert error is not None and "worker 0 declares batches of" in error and "max_batch_bytes=100" in error, error


def train_across_reconnect(fabric: Fabric, out_dir: str) -> None:
    setup_model(fabric)
    stream = fabric.strategy.experience()
    batches = stream.get(4, timeout=30)
    record = {"seqs": [batch_seq(b.data) for b in batches], "dropped": stream.dropped, "ended": time.time()}
    write_json(Path(out_dir, "rank0.json"), record)


@pytest.mark.timeout(60)
def test_a_worker_that_reconnects_is_received_from_again(tmp_path: Path) -> None:
    """A new connection under the same worker id (a replacement process) gets a fresh group; nothing is lost and
    the old connection's end is not reported as a failure."""
    worker = functools.partial(reconnecting_worker, out_dir=str(tmp_path))
    _, returned_at = launch(train_across_reconnect, worker, devices=1, workers=1, out_dir=str(tmp_path))
    assert read_json(tmp_path / "rank0.json")["seqs"] == [0, 1, 2, 3]
    assert_prompt_end(tmp_path, returned_at, "shutdown waited on the old connection or the new one")


# ---------------------------------------------------------------------------------------------------- schema, in process
def test_schema_round_trips_as_json_and_both_ends_agree_on_the_layout() -> None:
    batch = make_batch(3, 7, 11)
    batch["scalar"] = torch.zeros(5, 3, dtype=torch.float16)
    batch["empty"] = torch.zeros(5, 3, 0)
    schema = ExperienceSchema.of(batch)
    assert ExperienceSchema.from_json(schema.to_json()) == schema
    # What the worker stages and what the trainer unpacks from the same bytes must be the same batch.
    wire = schema.wire()
    for view, path in zip(wire.tensors, schema.paths):
        view.copy_(batch.get(path))
    wire.set_word(0, 11)
    wire.set_word(1, 3)
    received = ExperienceSchema.from_json(schema.to_json()).unpack(wire.storage.clone())
    assert (received.worker_id, received.version) == (3, 11)
    assert received.data.batch_size == batch.batch_size
    for path in schema.paths:
        assert received.data.get(path).dtype == batch.get(path).dtype
        assert torch.equal(received.data.get(path), batch.get(path)), path


def test_non_tensor_leaves_are_refused_not_dropped() -> None:
    batch = TensorDict({"obs": torch.zeros(3), ("info", "name"): NonTensorData("cartpole")}, batch_size=[])
    with pytest.raises(TypeError, match=r"\('info', 'name'\) is a NonTensorData"):
        ExperienceSchema.of(batch)


@pytest.mark.parametrize("workers, ranks, nodes", [(2, 2, 2), (4, 2, 2), (1, 3, 2), (3, 1, 3), (2, 4, 1)])
def test_routes_keep_experience_on_its_node(workers, ranks, nodes):
    """Per node: every worker sends to a training rank of its own node, and every rank hears a worker of it."""
    routes = ExperienceRoutes(workers * nodes, ranks * nodes, nodes)
    for worker in range(workers * nodes):
        assert routes.ranks_of(worker) and {r // ranks for r in routes.ranks_of(worker)} == {worker // workers}
    for rank in range(ranks * nodes):
        assert routes.workers_of(rank) and {w // workers for w in routes.workers_of(rank)} == {rank // ranks}
        assert all(rank in routes.ranks_of(w) for w in routes.workers_of(rank))
