"""A run that tests/scripts/attacker.py attacks while it trains: one training rank, two workers that send
experience and report the version and weights they end on.

    python attacked_train.py --transport auto|gloo --go FILE

The trainer prints ``ATTACK_ME`` once training is under way, then keeps training until FILE exists (the attack is
over) and a few steps more, and ends with ``TRAINER_DONE`` (its last version, weights checksum and peak memory).
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from lightning.fabric import Fabric
from tensordict import TensorDict

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy

STEPS_AFTER_ATTACK = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--go", required=True)
    return parser.parse_args()


def emit(tag: str, **fields) -> None:
    sys.stdout.write(tag + "".join(f" {k}={json.dumps(v)}" for k, v in fields.items()) + "\n")
    sys.stdout.flush()


def make_policy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def checksum(module: torch.nn.Module) -> float:
    return float(sum(p.double().sum() for p in module.state_dict().values()))


def worker(ctx) -> None:
    torch.set_num_threads(1)
    policy = make_policy()
    receiver = ctx.connect(policy)
    while not ctx.stop_requested:
        receiver.poll()
        batch = TensorDict({"obs": torch.randn(8, 4)}, batch_size=[8])
        if not ctx.send(batch):
            break
    receiver.poll()
    emit("WORKER_DONE", worker_id=ctx.worker_id, version=receiver.version, checksum=checksum(policy))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    fabric = Fabric(
        accelerator="cpu",
        devices=1,
        strategy=WeightSyncStrategy(worker, inference_workers=2, transport=args.transport, heartbeat_timeout=30.0),
        callbacks=[WeightSyncCallback()],
    )
    fabric.launch()
    torch.manual_seed(0)
    model = make_policy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    stream = fabric.strategy.experience()
    attacked_at, after = None, 0
    while after < STEPS_AFTER_ATTACK:
        batches = stream.get(2)
        loss = sum(model(b.data["obs"]).pow(2).mean() for b in batches)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if attacked_at is None and fabric.strategy.policy_version == 3:
            attacked_at = peak_rss_mb()
            emit("ATTACK_ME", rss_mb=attacked_at)
        if attacked_at is not None and os.path.exists(args.go):
            after += 1
        time.sleep(0.01)
    emit("TRAINER_DONE", version=fabric.strategy.policy_version, checksum=checksum(model), rss_before=attacked_at, rss_after=peak_rss_mb())


if __name__ == "__main__":
    main()
