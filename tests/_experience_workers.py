"""Worker functions and batch builders for tests/test_experience.py (module level so any start method can use them).

Workers write what they did to ``out_dir/worker{id}.json``; the tests compare it with what the trainers received.
"""

import gc
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tensordict import TensorDict
from torch import nn

from fabric_weightsync.experience import ExperienceSchemaError, ExperienceTimeout

T, N = 5, 3
"""Time steps x environments of every test batch."""


def make_policy() -> nn.Module:
    return nn.Linear(2, 2)


def make_batch(worker_id: int, seq: int, version: int) -> TensorDict:
    """A batch whose every byte follows from (worker, seq, version), so a trainer can rebuild it to compare."""
    gen = torch.Generator().manual_seed(100_003 * worker_id + seq)
    return TensorDict(
        {
            "obs": torch.randn(T, N, 4, generator=gen),
            "action": torch.randint(0, 7, (T, N), generator=gen),
            "logprob": torch.randn(T, N, generator=gen, dtype=torch.float64),
            ("next", "done"): torch.rand(T, N, generator=gen) > 0.5,
            ("next", "reward"): torch.randn(T, N, generator=gen, dtype=torch.bfloat16),
            "seq": torch.full((T, N), seq, dtype=torch.int64),
            "version_seen": torch.full((T, N), version, dtype=torch.int64),
        },
        batch_size=[T, N],
    )


def batch_seq(data: TensorDict) -> int:
    return int(data["seq"][0, 0])


def _write(out_dir: str, worker_id: int, record: dict[str, Any]) -> None:
    Path(out_dir, f"worker{worker_id}.json").write_text(json.dumps(record))


def streaming_worker(ctx, out_dir: str, pause: float = 0.0, limit: Optional[int] = None) -> None:
    """Sends batches as fast as it can (after ``pause`` s each) until training stops or ``limit`` were sent."""
    torch.set_num_threads(1)
    rx = ctx.connect(make_policy())
    sent, durations = [], []
    stopped_in_send = False
    seq = 0
    while not ctx.stop_requested and (limit is None or seq < limit):
        rx.poll()
        version = rx.version
        batch = make_batch(ctx.worker_id, seq, version)
        start = time.monotonic()
        if not ctx.send(batch):
            stopped_in_send = True
            break
        durations.append(time.monotonic() - start)
        sent.append([seq, version])
        seq += 1
        if pause:
            time.sleep(pause)
    while not ctx.stop_requested:
        rx.poll()  # the trainer's final weight delivery waits for every live worker
        time.sleep(0.02)
    _write(out_dir, ctx.worker_id, {"sent": sent, "durations": durations, "stopped_in_send": stopped_in_send})


MAX_EPISODES, MAX_LEN = 4, 6
"""Capacity of a batch of finished episodes: episodes per batch, steps per episode."""


def episode_worker(ctx, out_dir: str) -> None:
    """Sends, per batch, the 0 to MAX_EPISODES episodes that "finished", each padded to MAX_LEN steps and the batch
    padded to MAX_EPISODES rows (``length`` 0 marks a padding row): the pattern for variable-length data."""
    torch.set_num_threads(1)
    rx = ctx.connect(make_policy())
    sent = []
    seq = 0
    while not ctx.stop_requested:
        rx.poll()
        gen = torch.Generator().manual_seed(seq)
        lengths = torch.randint(1, MAX_LEN + 1, (int(torch.randint(0, MAX_EPISODES + 1, (), generator=gen)),), generator=gen)
        batch = TensorDict(
            {
                "reward": torch.zeros(MAX_EPISODES, MAX_LEN),
                "length": torch.zeros(MAX_EPISODES, dtype=torch.int64),
                "seq": torch.full((MAX_EPISODES,), seq),
            },
            batch_size=[MAX_EPISODES],
        )
        episodes = []
        for row, n in enumerate(lengths.tolist()):
            rewards = torch.randn(n, generator=gen)
            batch["reward"][row, :n] = rewards
            batch["length"][row] = n
            episodes.append(rewards.tolist())
        if not ctx.send(batch):
            break
        sent.append([seq, episodes])
        seq += 1
    _write(out_dir, ctx.worker_id, {"sent": sent, "sent_to": ctx._sender.sent_to})


def checking_worker(ctx, out_dir: str) -> None:
    """Sends a good batch, then bad ones (each must be refused before sending), then times out, then a good one."""
    torch.set_num_threads(1)
    rx = ctx.connect(make_policy())
    store = ctx.control.client()
    record: dict[str, Any] = {"errors": {}}
    record["first"] = ctx.send(make_batch(ctx.worker_id, 0, 0), version=1234)

    def refused(name: str, batch: TensorDict) -> None:
        try:
            ctx.send(batch)
        except ExperienceSchemaError as err:
            record["errors"][name] = str(err)
        else:
            record["errors"][name] = None

    bad = make_batch(ctx.worker_id, 1, rx.version)
    bad["obs"] = torch.zeros(T, N, 5)
    refused("shape", bad)
    bad = make_batch(ctx.worker_id, 1, rx.version)
    bad["action"] = bad["action"].to(torch.int32)
    refused("dtype", bad)
    bad = make_batch(ctx.worker_id, 1, rx.version)
    del bad["logprob"]
    refused("missing", bad)
    bad = make_batch(ctx.worker_id, 1, rx.version)
    bad["next", "extra"] = torch.zeros(T, N)
    refused("extra", bad)

    # The only slot of the trainer's queue holds the first batch, which the trainer does not take yet.
    start = time.monotonic()
    try:
        ctx.send(make_batch(ctx.worker_id, 1, rx.version), timeout=0.5)
        record["timeout_error"] = None
    except ExperienceTimeout as err:
        record["timeout_error"] = str(err)
    record["timeout_waited"] = time.monotonic() - start
    store.set("test/go", b"1")
    record["after_timeout"] = ctx.send(make_batch(ctx.worker_id, 2, rx.version))
    while not ctx.stop_requested:
        rx.poll()  # the trainer's final weight delivery waits for every live worker
        time.sleep(0.02)
    _write(out_dir, ctx.worker_id, record)


def failing_worker(ctx, out_dir: str) -> None:
    """Sends two batches, then raises."""
    torch.set_num_threads(1)
    rx = ctx.connect(make_policy())
    for seq in range(2):
        ctx.send(make_batch(ctx.worker_id, seq, rx.version))
    raise RuntimeError(f"injected failure in worker {ctx.worker_id}")


def reconnecting_worker(ctx, out_dir: str) -> None:
    """Sends two batches, drops its connection as a dying process would, then sends two more on a new one."""
    torch.set_num_threads(1)
    rx = ctx.connect(make_policy())
    for seq in range(2):
        ctx.send(make_batch(ctx.worker_id, seq, rx.version))
    # What a replacement process under the same worker id looks like to the trainer: the old group's sockets
    # close, and a new sender connects afresh.
    ctx._sender = None
    gc.collect()
    for seq in range(2, 4):
        ctx.send(make_batch(ctx.worker_id, seq, rx.version))
    while not ctx.stop_requested:
        rx.poll()
        time.sleep(0.02)
