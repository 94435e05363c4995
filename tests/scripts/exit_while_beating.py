"""A worker process whose heartbeat beats without pause, so that a beat is in flight whenever its worker_fn
returns and the process exits: the exit must be clean (code 0), not an abort.

    python exit_while_beating.py BOOTSTRAP_PORT
"""

import sys
import time

import torch

import fabric_weightsync.worker_process as worker_process
from fabric_weightsync import WorkerContext
from fabric_weightsync.control import ControlPlane

if __name__ == "__main__":
    worker_process.HEARTBEAT_INTERVAL = 0.0  # the heartbeat thread is inside a store call nearly all the time
    beats, beat = [0], worker_process._beat

    def counted(store, keys):
        beats[0] += 1
        beat(store, keys)

    worker_process._beat = counted
    ctx = WorkerContext(
        worker_id=0, num_workers=1, global_rank=1, local_rank=1, node_rank=0, device=torch.device("cpu"),
        control=ControlPlane.join("127.0.0.1", int(sys.argv[1]), 30.0), timeout=30.0,
    )
    worker_process.run_worker(lambda context: time.sleep(0.3), ctx)
    print(f"BEATS {beats[0]}", flush=True)
    sys.exit(0)
