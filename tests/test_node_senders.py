"""Node senders: on every node, local training rank 0 serves that node's workers from its own DDP replica.

Two torchrun agents on loopback (``--nnodes=2``) stand for two nodes. Every worker on both nodes ends on the last
version with global rank 0's weights (``test_launch_modes.assert_healthy``), global rank 0 sends no weight byte to
node 1's workers (counted by the senders), the replica check catches a replica that diverged and names its node,
a worker that dies on node 1 meets the failure policy as on node 0 and one that comes back is re-admitted, and where replicas may differ, global rank 0's
weights are relayed to each node once.
"""

import psutil
import pytest
import torch

from conftest import LAUNCHES, Launch, free_port, sigkill
from test_fault_tolerance import HEARTBEAT_TIMEOUT, FaultRun, base_env
from test_launch_modes import EXIT_AFTER_FAILURE, FAILURE_LAUNCH_TIMEOUT, assert_failed_naming, assert_healthy, assert_same_weights

TWO_NODES = "torchrun-2nodes"


@pytest.mark.timeout(200)
def test_each_node_serves_its_own_workers(launches):
    """2 nodes x (2 training ranks + 2 workers), gloo: node 1's workers get every byte from node 1's sender."""
    run, launch = launches.get(TWO_NODES), LAUNCHES[TWO_NODES]
    assert_healthy(run, launch)
    senders = {record["rank"]: record for record in run.records("SENDER")}
    assert sorted(senders) == [0, launch.devices], f"one sender per node, on its local rank 0\n{run.describe()}"
    rank0, node1 = senders[0], senders[launch.devices]
    assert rank0["served"] == [0, 1] and node1["served"] == [2, 3]
    # Global rank 0's egress to the other node's workers, counted where bytes are sent: none.
    assert rank0["bytes_sent"]["2"] == rank0["bytes_sent"]["3"] == 0, rank0
    assert rank0["bytes_sent"]["0"] > 0 and rank0["bytes_sent"]["1"] > 0, rank0
    assert node1["bytes_sent"]["2"] > 0 and node1["bytes_sent"]["3"] > 0, node1
    # Global rank 0 still sees every worker, node 1's through its sender's reports.
    assert rank0["workers"] == {str(w): [True, launch.steps] for w in range(4)}, rank0
    # The replicas were compared at every version (--verify-replicas 1) and never differed.
    assert rank0["replicas_compared"] >= 1, rank0


@pytest.mark.timeout(200)
def test_replica_check_names_the_diverged_node(tmp_path):
    """Training rank 1 (node 1's sender) alters its own weights at step 3: global rank 0 fails the run, naming node 1."""
    launch = Launch(
        "torchrun", devices=1, workers=1, nodes=2, steps=None, timeout=FAILURE_LAUNCH_TIMEOUT,
        settle=("ReplicaMismatchError", EXIT_AFTER_FAILURE[1]), extra=("--verify-replicas", "1", "--diverge-rank", "1"),
    )  # fmt: skip
    run = launch.run(tmp_path)
    assert_failed_naming(run, "ReplicaMismatchError", "node 1")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("policy", ["raise", "continue"])
def test_worker_dying_on_node_1_meets_the_failure_policy(tmp_path, policy):
    """Node 1's worker dies after version 2: ``raise`` fails the run naming it, ``continue`` trains on with node 0's.

    Script mode, one ``python train.py`` per node: under torchrun, any process that exits non-zero makes the agent
    stop its whole node, workers included (see README)."""
    extra = ("--on-worker-failure", policy)
    if policy == "raise":
        launch = Launch(
            "popen", devices=1, workers=1, nodes=2, steps=None, worker_mode="exit", timeout=FAILURE_LAUNCH_TIMEOUT,
            settle=EXIT_AFTER_FAILURE, extra=extra,
        )  # fmt: skip
        run = launch.run(tmp_path)
        assert_failed_naming(run, "WorkerFailedError", "Inference worker 1 failed")
        return
    launch = Launch("popen", devices=1, workers=1, nodes=2, steps=20, worker_mode="exit", extra=extra)
    run = launch.run(tmp_path)
    assert run.returncode == 0 and not run.leftovers, run.describe()
    assert [r["worker_id"] for r in run.records("WORKER_EXIT")] == [1], run.describe()
    assert "inference worker 1 failed" in run.output, run.describe()
    [done] = run.records("WORKER_DONE")
    assert done["worker_id"] == 0 and done["final_version"] == 20, run.describe()
    [rank0] = [r for r in run.records("SENDER") if r["rank"] == 0]
    assert rank0["workers"] == {"0": [True, 20], "1": [False, rank0["workers"]["1"][1]]}, rank0


@pytest.mark.timeout(200)
def test_relay_serves_rank_0s_weights_once_per_node(tmp_path):
    """``serve_replicas=False``: node 1's replica diverged, yet its 2 workers end on global rank 0's weights, which
    crossed to node 1 once per version (to its relay), not once per worker."""
    launch = Launch("popen", devices=1, workers=2, nodes=2, extra=("--relay", "--transport", "gloo", "--diverge-rank", "1"))
    run = launch.run(tmp_path)
    assert run.returncode == 0 and not run.leftovers, run.describe()
    trainer = torch.load(run.out_dir / "trainer0.pt")
    finals = {w["worker_id"]: w for w in run.records("WORKER_DONE")}
    assert sorted(finals) == [0, 1, 2, 3], run.describe()
    for worker_id, record in finals.items():
        assert record["final_version"] == launch.steps, record
        saved = torch.load(run.out_dir / f"worker{worker_id}.pt")
        for version, weights in saved["seen"].items():
            assert_same_weights(weights, trainer["history"][version], f"worker {worker_id} at version {version}")
    [rank0] = run.records("SENDER")  # node 1's rank serves nothing of its own: its relay does
    assert rank0["bytes_sent"]["2"] == rank0["bytes_sent"]["3"] == 0, rank0
    weights = rank0["bytes_sent"]["0"] // len(finals[0]["versions"])  # every version node 0's worker took
    assert 0 < rank0["relays"]["1"] <= weights * (launch.steps + 1), rank0  # at most one copy per version for node 1
    assert rank0["workers"] == {str(w): [True, launch.steps] for w in range(4)}, rank0


@pytest.mark.timeout(150)
def test_worker_killed_on_node_1_rejoins(tmp_path):
    """Node 1's worker is SIGKILLed and a new process takes its place: node 1's sender re-admits it with a full
    resync, and global rank 0 sees it leave and come back, ending with both workers on the last version."""
    run = FaultRun(tmp_path / "run")
    try:
        port = free_port()
        args = [
            "--nodes", 2, "--workers", 1, "--on-failure", "continue", "--heartbeat-timeout", HEARTBEAT_TIMEOUT,
            "--until-rejoin", 1, "--steps", 3000, "--step-sleep", 0.02, "--behaviour", "1=every:0.05",
        ]  # fmt: skip
        nodes = [run.start_script(f"node{n}", args, {**base_env(port), "NODE_RANK": str(n)}) for n in (0, 1)]
        run.wait_for("PROGRESS", 60, lambda e: e["step"] >= 20)
        victim = psutil.Process(run.worker_pid(1))
        env, cmdline, cwd = victim.environ(), victim.cmdline(), victim.cwd()
        sigkill(victim.pid)
        run.wait_for("WORKER_STATUS", 20, lambda e: e["alive"][1] is False)
        run.start("replacement", cmdline, env, cwd=cwd)
        run.wait_all(90)
        run.assert_no_survivors()
        assert all(node.returncode == 0 for node in nodes), run.describe()
        rejoined = run.one("REJOINED")
        final = run.one("FINAL")
        assert final["alive"] == [True, True] and final["delivered"] == [final["latest"]] * 2, final
        back = run.one("WORKER_CONNECTED", proc="replacement")
        assert back["version"] > 0 and rejoined["delivered"] >= back["version"], (back, rejoined)
        done = run.one("WORKER_DONE", worker_id=1, proc="replacement")
        assert done["final_version"] == final["latest"] and done["lo"] == done["hi"] == float(final["latest"])
    finally:
        run.close()
