"""Quickstart: a small policy trained on 2 training ranks while 2 inference workers follow its weights.

    python examples/quickstart.py                      # python train.py + fabric.launch()
    torchrun --nproc-per-node=4 examples/quickstart.py  # 2 training + 2 worker processes per node

Each worker polls for the newest weights between "rollouts", collects with the policy it has, and prints the
versions it applied. The trainer pushes after every optimizer step (WeightSyncCallback); when training ends,
every worker gets the last version before it is told to stop.
"""

import argparse
import time
from dataclasses import dataclass, fields

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext


@dataclass
class Args:
    devices: int = 2
    """training processes"""
    inference_workers: int = 2
    """inference (collector) processes per node"""
    num_nodes: int = 1
    """nodes (torchrun --nnodes / SLURM --nodes)"""
    steps: int = 100
    """optimizer steps"""
    rollout_ms: float = 20.0
    """time a worker spends collecting one rollout"""
    seed: int = 1
    """seed of the policy's initial weights (the workers receive the trainer's, whatever theirs were)"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Args):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return Args(**vars(parser.parse_args()))


def make_policy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))


def collect(ctx: WorkerContext) -> None:
    """Runs in every inference worker instead of the training code."""
    torch.set_num_threads(1)
    args = parse_args()
    policy = make_policy()
    receiver = ctx.connect(policy)  # blocks until the initial weights arrived: policy == trainer's policy
    applied = [receiver.version]
    while not ctx.stop_requested:
        if receiver.poll():
            applied.append(receiver.version)
        with torch.no_grad():
            policy(torch.randn(16, 4))  # "collect" with the current policy
        time.sleep(args.rollout_ms / 1000)
    receiver.poll()
    print(f"worker {ctx.worker_id}: applied {len(applied)} versions, first {applied[:5]}, last {receiver.version}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    fabric = Fabric(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=WeightSyncStrategy(collect, inference_workers=args.inference_workers),
        callbacks=[WeightSyncCallback()],
    )
    fabric.launch()
    torch.manual_seed(args.seed)
    model = make_policy()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(args.steps):
        loss = model(torch.randn(32, 4)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()  # WeightSyncCallback stages the new weights for every worker (no waiting)
        optimizer.zero_grad()
        time.sleep(0.005)
    fabric.print(f"trainer: {args.steps} steps on {fabric.world_size} training ranks; workers end on version {args.steps}")


if __name__ == "__main__":
    main()
