"""A SLURM-style run (one process per rank, none a child of another) whose workers come too late to join.

Rank 0 trains a few steps and shuts down; worker 0 joined the control plane in time but connects its policy only
once training has ended; worker 1's process is started by the test only after rank 0 announced the end (rank 0
waits for the exits of workers that never connected, up to its shutdown timeout, so a late one can still reach
it). Both must exit at once with code 0, saying so, and the run must end with code 0 whatever the timing.

    SLURM_PROCID=<rank> ... python late_worker_train.py
"""

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy
from fabric_weightsync.protocol import SLOW_POLL_S, poll_until

torch.set_num_threads(1)


def make_policy() -> torch.nn.Module:
    return torch.nn.Linear(4, 2)


def connect_after_the_end(ctx) -> None:
    # Joined in time, but its environments took longer than training did.
    poll_until(ctx.control.stop_requested, None, max_pause=SLOW_POLL_S)
    ctx.connect(make_policy())
    raise AssertionError("connect() must refuse: training has ended")


def main() -> None:
    # Training must not wait for workers that only connect once it is over.
    strategy = WeightSyncStrategy(
        connect_after_the_end, inference_workers=2, sync_timeout=60, shutdown_timeout=30, wait_for_workers=False
    )
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, callbacks=[WeightSyncCallback()])
    fabric.launch()
    model, optimizer = fabric.setup(make_policy(), torch.optim.SGD(make_policy().parameters(), lr=0.1))
    for _ in range(3):
        fabric.backward(model(torch.randn(8, 4)).pow(2).sum())
        optimizer.step()
        optimizer.zero_grad()
    print("TRAINING_DONE", flush=True)


if __name__ == "__main__":
    main()
