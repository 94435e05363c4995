"""On-policy lockstep: pushes only at the end of an update (``strategy.push()``, ``WeightSyncCallback(every_n_steps=None)``)
and workers that wait for them (``receiver.wait_for_version``). Real fork launches, real worker processes.
"""

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from conftest import REPO_ROOT, clean_env
from fabric_weightsync import WeightSyncCallback

STEPS_PER_UPDATE = 5
UPDATES = 4
EXAMPLE = REPO_ROOT / "examples" / "lockstep_ppo.py"


def make_policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def lockstep_worker(ctx, out_dir: str) -> None:
    """Collect with version v, send, wait for v + 1: the two lines of a lockstep worker."""
    torch.set_num_threads(1)
    receiver = ctx.connect(make_policy())
    record = {"rollouts": [], "applied": [receiver.version], "timeout": None}
    try:  # nothing is pushed before the trainer has every worker's first rollout
        receiver.wait_for_version(1, timeout=0.3)
    except TimeoutError as err:
        record["timeout"] = str(err)
    while True:
        version = receiver.version
        record["rollouts"].append(version)
        # A plain dict of tensors is a batch too.
        if not ctx.send({"obs": torch.full((3, 4), float(version)), "worker": torch.tensor(ctx.worker_id)}, version=version):
            record["end"] = "send returned False"
            break
        if not receiver.wait_for_version(version + 1, timeout=60):
            record["end"] = "wait_for_version returned False"
            break
        record["applied"].append(receiver.version)
    record["final"] = receiver.version
    Path(out_dir, f"worker{ctx.worker_id}.json").write_text(json.dumps(record))


def train_in_lockstep(fabric: Fabric, out_dir: str) -> None:
    torch.set_num_threads(1)
    policy = make_policy()
    model, optimizer = fabric.setup(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    stream = fabric.strategy.experience()
    pushed, updates = 0, []
    for _ in range(UPDATES):
        batches = stream.get(len(stream.worker_ids))
        updates.append({"pushed_before": pushed, "versions": [b.version for b in batches], "workers": sorted(b.worker_id for b in batches)})
        obs = torch.cat([b.data["obs"] for b in batches])
        for _ in range(STEPS_PER_UPDATE):
            fabric.backward(model(obs).pow(2).mean())
            optimizer.step()  # every_n_steps=None: counted, never pushed
            optimizer.zero_grad()
        pushed = fabric.strategy.push()
    extra = [fabric.strategy.push(), fabric.strategy.push()]  # no step in between: the version still grows
    Path(out_dir, "rank0.json").write_text(json.dumps({"updates": updates, "extra": extra}))


@pytest.mark.timeout(120)
def test_pushes_at_the_end_of_updates_keep_workers_in_lockstep(tmp_path: Path, launch_fabric) -> None:
    launch_fabric(
        functools.partial(train_in_lockstep, out_dir=str(tmp_path)),
        functools.partial(lockstep_worker, out_dir=str(tmp_path)),
        workers=2,
        callbacks=[WeightSyncCallback(every_n_steps=None)],
    )
    trainer = json.loads((tmp_path / "rank0.json").read_text())
    pushes = [STEPS_PER_UPDATE * (u + 1) for u in range(UPDATES)]  # versions count optimizer steps
    for update, pushed_before in zip(trainer["updates"], [0] + pushes):
        assert update["workers"] == [0, 1], f"one rollout per worker per update: {update}"
        assert update["versions"] == [pushed_before, pushed_before], f"collected by the version before: {update}"
    last = pushes[-1]
    assert trainer["extra"] == [last + 1, last + 2], "a push without a step since the last one is a new version"
    for worker_id in (0, 1):
        worker = json.loads((tmp_path / f"worker{worker_id}.json").read_text())
        assert worker["rollouts"][:UPDATES] == [0] + pushes[:-1]
        # No version from inside an update ever reached the worker: only the pushes at their end.
        assert worker["applied"][:UPDATES] == [0] + pushes[:-1], worker["applied"]
        # After the last update the three pushes come at once: latest wins, any of them may be the one applied.
        assert set(worker["applied"][UPDATES:]) <= {last, last + 1, last + 2}, worker["applied"]
        assert worker["final"] == last + 2, "the last version reaches every worker at the end"
        assert worker["end"] in ("send returned False", "wait_for_version returned False"), worker
        assert worker["timeout"] is not None
        for needle in (f"Worker {worker_id}", "policy version 1", "still at version 0", "fabric.strategy.push()"):
            assert needle in worker["timeout"], f"{needle!r} missing from: {worker['timeout']}"


def test_every_n_steps_none_or_a_positive_integer() -> None:
    assert WeightSyncCallback(every_n_steps=None).every_n_steps is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps must be an integer of at least 1, or None"):
            WeightSyncCallback(every_n_steps=bad)


# ---------------------------------------------------------------------------------------------------- the example
def run_example(out_dir: Path, *args: str, timeout: float) -> dict:
    cmd = [sys.executable, str(EXAMPLE), "--out-dir", str(out_dir), "--logger", "csv", "--progress", "false", *args]
    result = subprocess.run(cmd, env=clean_env(), cwd=out_dir, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    (path,) = out_dir.glob("lockstep_ppo/version_*/result.json")
    return {"result": json.loads(path.read_text()), "stdout": result.stdout}


@pytest.mark.timeout(120)
def test_lockstep_example_collects_every_rollout_with_the_version_before_it(tmp_path: Path) -> None:
    """A tiny budget: 12 updates of 2 workers x 8 envs x 32 steps."""
    run = run_example(tmp_path, "--total-timesteps", str(12 * 2 * 8 * 32), "--plot", "false", timeout=110)
    result = run["result"]
    assert result["updates"] == 12 and result["rollouts"] == 24, result
    assert result["off_policy_rollouts"] == 0, f"lockstep broke: {result}"
    assert result["policy_version"] == 12 * 4 * 4, "versions count optimizer steps: 4 epochs x 4 minibatches per update"
    summary = next(tmp_path.glob("lockstep_ppo/version_*/summary.txt")).read_text()
    for needle in ("env steps", "steps/s", "0 of the 24 rollouts"):
        assert needle in summary, summary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lockstep_example_solves_cartpole(tmp_path: Path) -> None:
    run = run_example(tmp_path, timeout=590)
    match = re.search(r"^solved: .* at (\d+) env steps, ([\d.]+)s wall time", run["stdout"], re.MULTILINE)
    assert match, f"never solved:\n{run['stdout'][-4000:]}"
    print(f"solved at {match.group(1)} env steps, {match.group(2)}s wall time from process start")
    assert run["result"]["off_policy_rollouts"] == 0
