"""An inference worker for tests/test_links.py: connects over the control plane and polls every 1 ms until stopped.

    python polling_worker.py WORKER_ID NUM_WORKERS BOOTSTRAP_PORT
"""

import sys
import time

import torch

from fabric_weightsync import WorkerContext
from fabric_weightsync.control import ControlPlane

torch.set_num_threads(1)


def make_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


if __name__ == "__main__":
    worker_id, num_workers, boot_port = map(int, sys.argv[1:4])
    ctx = WorkerContext(
        worker_id=worker_id, num_workers=num_workers, global_rank=worker_id + 1, local_rank=worker_id + 1,
        node_rank=0, device=torch.device("cpu"), control=ControlPlane.join("127.0.0.1", boot_port, 30.0), timeout=30.0,
    )
    receiver = ctx.connect(make_policy())
    while not ctx.stop_requested:
        if not receiver.poll():
            time.sleep(0.001)
