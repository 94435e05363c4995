"""An inference worker for tests/test_links.py: connects over the control plane and polls until stopped.

    python polling_worker.py WORKER_ID NUM_WORKERS BOOTSTRAP_PORT [ROLLOUT_S OUT_JSON]

Without ROLLOUT_S it polls every 1 ms. With it, each poll is followed by a "rollout" of that many seconds, and
every poll is recorded in OUT_JSON: the newest version rank 0 had staged just before it (read from the store)
and the version the policy held after it.
"""

import json
import sys
import time

import torch

from fabric_weightsync import WorkerContext
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.protocol import LATEST_KEY

torch.set_num_threads(1)


def make_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


if __name__ == "__main__":
    worker_id, num_workers, boot_port = map(int, sys.argv[1:4])
    rollout_s = float(sys.argv[4]) if len(sys.argv) > 4 else None
    ctx = WorkerContext(
        worker_id=worker_id, num_workers=num_workers, global_rank=worker_id + 1, local_rank=worker_id + 1,
        node_rank=0, device=torch.device("cpu"), control=ControlPlane.join("127.0.0.1", boot_port, 30.0), timeout=30.0,
    )
    policy = make_policy()
    receiver = ctx.connect(policy)
    polls = []
    while not ctx.stop_requested:
        if rollout_s is None:
            if not receiver.poll():
                time.sleep(0.001)
            continue
        staged_before = int(ctx.control.store.read(LATEST_KEY) or 0)
        applied = receiver.poll()
        polls.append({"staged_before": staged_before, "applied": applied, "version": receiver.version})
        time.sleep(rollout_s)
    if rollout_s is not None:
        with open(sys.argv[5], "w") as f:
            json.dump(polls, f)
    receiver.poll()
    weights = {name: value.tolist() for name, value in policy.state_dict().items()}
    print(f"FINAL {json.dumps({'version': receiver.version, 'weights': weights})}", flush=True)
