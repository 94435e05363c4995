"""Training starts with its workers: rank 0's ``fabric.setup`` of the synced module returns once every worker holds
the initial weights or is gone, within ``ready_timeout``; ``wait_for_workers=False`` starts at once. Real launches.
"""

import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from conftest import REPO_ROOT, clean_env
from fabric_weightsync import WeightSyncCallback
from fabric_weightsync.protocol import SLOW_POLL_S, poll_until

STEPS = 5


def make_policy() -> nn.Module:
    return nn.Linear(4, 2)


def train(fabric: Fabric, out_dir: str, publish_go: bool = False) -> None:
    torch.set_num_threads(1)
    policy = make_policy()
    started = time.monotonic()
    model, optimizer = fabric.setup(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    scheme = fabric.strategy.scheme
    record = {"setup_s": time.monotonic() - started, "at_setup": [w.delivered_version for w in scheme.workers]}
    if publish_go:
        fabric.strategy.publish(go=True)
    for _ in range(STEPS):
        fabric.backward(model(torch.randn(2, 4)).sum())
        optimizer.step()
        optimizer.zero_grad()
    record["alive"] = [w.alive for w in scheme.workers]
    Path(out_dir, "rank0.json").write_text(json.dumps(record))


def worker(ctx, out_dir: str, behaviour: str) -> None:
    """``slow``: 1 s of "building environments" before connecting; ``on_go``: connect only once the trainer says
    so; ``never``: never connect; ``raise``: raise before connecting (worker 0 only)."""
    torch.set_num_threads(1)
    if behaviour == "raise" and ctx.worker_id == 0:
        raise RuntimeError("worker 0 could not build its environments")
    if behaviour == "never" and ctx.worker_id == 1:
        poll_until(lambda: ctx.stop_requested, 60, max_pause=SLOW_POLL_S)
        return
    if behaviour == "slow":
        time.sleep(1.0 + 0.5 * ctx.worker_id)
    if behaviour == "on_go":
        assert poll_until(lambda: ctx.messages.get("go", False), 30, max_pause=SLOW_POLL_S), "the trainer never said go"
    receiver = ctx.connect(make_policy())
    while not ctx.stop_requested:
        receiver.wait_for_update(0.1)
    Path(out_dir, f"worker{ctx.worker_id}.json").write_text(json.dumps({"final": receiver.version}))


def run(launch_fabric, tmp_path: Path, behaviour: str, publish_go: bool = False, **strategy_kwargs) -> dict:
    launch_fabric(
        functools.partial(train, out_dir=str(tmp_path), publish_go=publish_go),
        functools.partial(worker, out_dir=str(tmp_path), behaviour=behaviour),
        workers=2,
        callbacks=[WeightSyncCallback()],
        **strategy_kwargs,
    )
    return json.loads((tmp_path / "rank0.json").read_text())


@pytest.mark.timeout(90)
def test_training_starts_once_every_worker_holds_the_weights(tmp_path: Path, launch_fabric) -> None:
    trainer = run(launch_fabric, tmp_path, "slow")
    assert trainer["at_setup"] == [0, 0], "fabric.setup returned before every worker held the initial weights"
    assert trainer["setup_s"] > 1.0, trainer


@pytest.mark.timeout(90)
def test_wait_for_workers_false_starts_training_at_once(tmp_path: Path, launch_fabric) -> None:
    """The workers connect only once the trainer, past its setup, tells them to: waiting would never end."""
    trainer = run(launch_fabric, tmp_path, "on_go", publish_go=True, wait_for_workers=False, ready_timeout=30)
    assert trainer["at_setup"] == [-1, -1]
    for worker_id in (0, 1):
        assert json.loads((tmp_path / f"worker{worker_id}.json").read_text())["final"] == STEPS


@pytest.mark.timeout(90)
def test_a_worker_missing_at_the_ready_timeout_is_named(tmp_path: Path, launch_fabric) -> None:
    with pytest.raises(Exception, match=r"TimeoutError: Inference workers not ready 3s after .*\(worker 1: running, but it has not called ctx.connect\(policy\) yet\)"):
        run(launch_fabric, tmp_path, "never", ready_timeout=3)


@pytest.mark.timeout(90)
def test_continue_starts_without_a_missing_worker(tmp_path: Path, launch_fabric) -> None:
    trainer = run(launch_fabric, tmp_path, "never", ready_timeout=3, on_worker_failure="continue")
    assert trainer["at_setup"] == [0, -1]
    assert json.loads((tmp_path / "worker0.json").read_text())["final"] == STEPS


# A worker that fails before it is ready ends the wait at once: ready_timeout is far above the test's timeout.
@pytest.mark.timeout(90)
def test_a_worker_failing_before_it_is_ready_fails_the_run_at_once(tmp_path: Path, launch_fabric) -> None:
    with pytest.raises(Exception, match=r"(?s)WorkerFailedError: Inference worker 0 failed: it raised.*could not build its environments"):
        run(launch_fabric, tmp_path, "raise", ready_timeout=600)


@pytest.mark.timeout(90)
def test_continue_trains_on_without_a_worker_that_failed_before_it_was_ready(tmp_path: Path, launch_fabric) -> None:
    trainer = run(launch_fabric, tmp_path, "raise", ready_timeout=600, on_worker_failure="continue")
    assert trainer["at_setup"][1] == 0 and trainer["alive"] == [False, True], trainer
    assert json.loads((tmp_path / "worker1.json").read_text())["final"] == STEPS


@pytest.mark.timeout(150)
def test_quickstart_with_one_training_rank_serves_workers_during_training(tmp_path: Path) -> None:
    """The README's quickstart on one training rank: the workers take part in training, not only in its end."""
    cmd = [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--devices", "1", "--steps", "200"]
    result = subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    applied = {int(w): int(n) for w, n in re.findall(r"^worker (\d+): applied (\d+) versions", result.stdout, re.MULTILINE)}
    assert sorted(applied) == [0, 1], result.stdout
    # Counted: the initial version and each poll that applied a newer one during training (not the final delivery).
    assert all(n >= 4 for n in applied.values()), f"workers applied too few versions while training ran: {applied}"
