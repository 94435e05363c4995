"""Logging from workers, end to end: real Fabric launches (script mode, fork), real worker processes, a real CSVLogger.

Metrics a worker logs with ``ctx.log``/``ctx.log_dict`` must land in training rank 0's loggers, those logged after
the last optimizer step included; a worker's own Lightning logger must write its files; and when the trainer cannot
keep up, the worker keeps its newest records and the count of the dropped ones reaches both ends.
"""

import csv
import functools
import gc
import json
import logging
from datetime import timedelta
from pathlib import Path
import sys
from typing import Callable

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger

import fabric_weightsync.worker_logs as worker_logs
from conftest import SCRIPTS_DIR, clean_env, free_port, run_processes
from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy


@pytest.fixture(autouse=True)
def fresh_master_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def launch(train_fn: Callable, worker_fn: Callable, out_dir: Path, *, devices: int, workers: int) -> None:
    """One fork launch with a CSVLogger under ``out_dir/trainer``."""
    gc.collect()  # see test_experience.launch: children must not collect an earlier test's store
    strategy = WeightSyncStrategy(worker_fn, inference_workers=workers, start_method="fork", shutdown_timeout=20)
    logger = CSVLogger(root_dir=str(out_dir), name="trainer", flush_logs_every_n_steps=1000)
    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[WeightSyncCallback()], loggers=logger)
    fabric.launch(train_fn)


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict], name: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name, "") != ""]


class Messages(logging.Handler):
    """Keeps the library's log messages of this process, to write them out for the test to read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("fabric_weightsync").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def steps(fabric: Fabric, count: int) -> None:
    torch.set_num_threads(1)
    model, optimizer = fabric.setup(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    for _ in range(count):
        fabric.backward(model(torch.randn(4, 2)).pow(2).sum())
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------------- forwarded and own loggers
RECORDS = 40


@pytest.mark.timeout(120)
def test_worker_metrics_reach_the_trainers_logger_and_a_workers_own_logger_writes(tmp_path: Path) -> None:
    """Script mode, so the workers' LOCAL_RANK is 2 and 3: Lightning's rank-zero guard must not eat their logs."""
    workers = 2
    script = SCRIPTS_DIR / "logging_train.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--workers", workers, "--records", RECORDS]
    run = run_processes([list(map(str, cmd))], [clean_env(MASTER_PORT=free_port())], tmp_path, timeout=100)
    assert run.returncode == 0 and not run.leftovers, run.describe()
    (path,) = tmp_path.glob("trainer/version_*/metrics.csv")  # one file: training rank 1 writes none
    rows = read_csv(path)
    assert column(rows, "trainer/loss") == [(3, 0.5)]
    for w in range(workers):
        assert column(rows, f"worker{w}/value") == [(k, float(k)) for k in range(RECORDS)], f"worker {w}"
        assert column(rows, f"worker{w}/square") == [(k, float(k * k)) for k in range(RECORDS)], f"worker {w}"
        ((step, version),) = column(rows, f"worker{w}/version")
        assert step == version, "ctx.log's default step is the worker's policy version"
        assert column(rows, f"worker{w}/final") == [(RECORDS, 1.0)], "a record logged at the worker's end is written"
        (own,) = tmp_path.glob(f"worker{w}/version_*/metrics.csv")
        assert column(read_csv(own), "own") == [(0, 1.0)], "a Lightning logger made in a worker must write"


# ---------------------------------------------------------------------------------------------------- a trainer that cannot keep up
FLOOD = 300


def flooding_worker(ctx, out_dir: str) -> None:
    messages = Messages()
    for k in range(FLOOD):  # before connecting: the trainer sets its module up only once these are logged
        ctx.log("flood", k, step=k)
    ctx.control.client().set("test/logged/0", b"1")
    rx = ctx.connect(torch.nn.Linear(2, 2))
    while not ctx.stop_requested:
        rx.wait_for_update(0.2)
    ctx.close_logs(10.0)  # deliver now, to count: run_worker's own close then finds nothing left
    record = {"dropped": ctx._logs.dropped, "undelivered": ctx._logs.undelivered, "messages": messages.lines}
    Path(out_dir, "worker0.json").write_text(json.dumps(record))


def train_slow_to_forward(fabric: Fabric, out_dir: str) -> None:
    messages = Messages()
    fabric.strategy.control_plane().client().wait(["test/logged/0"], timedelta(seconds=30))
    steps(fabric, 1)  # the first write to the loggers comes only now
    fabric.strategy.shutdown()  # the end of training, to read what rank 0 counted
    collector = fabric.strategy._worker_logs
    record = {"forwarded": collector.forwarded, "dropped": collector.dropped, "messages": messages.lines}
    Path(out_dir, "rank0.json").write_text(json.dumps(record))


@pytest.mark.timeout(90)
def test_a_full_worker_buffer_keeps_the_newest_records_and_both_ends_count_the_rest(tmp_path: Path, monkeypatch) -> None:
    # Small buffers (the forked processes inherit them): the worker holds 50, a chunk is 10, rank 0 holds 20.
    monkeypatch.setattr(worker_logs, "WORKER_LOG_CAPACITY", 50)
    monkeypatch.setattr(worker_logs, "CHUNK_RECORDS", 10)
    monkeypatch.setattr(worker_logs, "RANK0_LOG_CAPACITY", 20)
    launch(
        functools.partial(train_slow_to_forward, out_dir=str(tmp_path)),
        functools.partial(flooding_worker, out_dir=str(tmp_path)),
        tmp_path,
        devices=1,
        workers=1,
    )
    worker = json.loads((tmp_path / "worker0.json").read_text())
    trainer = json.loads((tmp_path / "rank0.json").read_text())
    (path,) = tmp_path.glob("trainer/version_*/metrics.csv")
    written = [int(value) for _, value in column(read_csv(path), "flood")]
    assert worker["undelivered"] == 0
    assert worker["dropped"] > 0, "300 records against at most about 90 held: some must have been dropped"
    assert trainer["dropped"] == worker["dropped"], "the worker reports every drop to rank 0"
    assert len(written) + worker["dropped"] == FLOOD == trainer["forwarded"] + trainer["dropped"], "nothing unaccounted"
    assert written == sorted(written) and written[-1] == FLOOD - 1, "the newest records are kept, in order"
    assert any("dropping the oldest" in line for line in worker["messages"]), worker["messages"]
    assert any("worker 0 dropped" in line for line in trainer["messages"]), trainer["messages"]


def test_metric_values_must_be_numbers() -> None:
    assert worker_logs.scalar_metrics({"a": 1, "b": torch.tensor(2.5), "c": True}) == {"a": 1.0, "b": 2.5, "c": 1.0}
    with pytest.raises(TypeError, match="'v' must be a number"):
        worker_logs.scalar_metrics({"v": torch.zeros(3)})
    with pytest.raises(TypeError, match="'s' must be a number"):
        worker_logs.scalar_metrics({"s": "high"})


def test_a_chunk_that_is_not_one_is_refused() -> None:
    records = [(3, {"x": 1.5}), (4, {"x": float("nan")})]
    decoded, dropped = worker_logs.decode_chunk(worker_logs.encode_chunk(records, 7))
    assert dropped == 7 and decoded[0] == (3, {"x": 1.5}) and decoded[1][0] == 4
    for raw in (b"{", b"[]", b'{"records": [[1]], "dropped": 0}', b'{"records": [], "dropped": "x"}'):
        with pytest.raises(ValueError, match="not a chunk"):
            worker_logs.decode_chunk(raw)
