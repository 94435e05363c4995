"""WeightSyncCallback options under a real fork launch: several optimizers, every_n_steps, the final push.

Rank 0 trains an actor with one optimizer and a critic with another (actor's steps trigger pushes); workers
record every version they apply and print them with the actor's final weights for the test to compare.

    python callback_train.py --steps 10 --every 3 [--explicit-trigger critic] [--train-end-call]
"""

import argparse
import json
import time

import torch
from lightning.fabric import Fabric
from torch import nn

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--explicit-trigger", choices=["none", "critic"], default="none")
    parser.add_argument("--train-end-call", action="store_true")
    return parser.parse_args()


def make_actor() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def collect(ctx: WorkerContext) -> None:
    torch.set_num_threads(1)
    actor = make_actor()
    receiver = ctx.connect(actor)
    applied = [receiver.version]
    while not ctx.stop_requested:
        if receiver.wait_for_update(0.05):
            applied.append(receiver.version)
    while receiver.poll():
        applied.append(receiver.version)
    flat = torch.cat([p.detach().flatten() for p in actor.parameters()]).tolist()
    print("WORKER " + json.dumps({"worker": ctx.worker_id, "applied": applied, "weights": flat}), flush=True)


def train(fabric: Fabric, args: argparse.Namespace, callback: WeightSyncCallback) -> None:
    torch.set_num_threads(1)
    actor, critic = make_actor(), nn.Linear(4, 1)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=0.1)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    actor, actor_opt = fabric.setup(actor, actor_opt)  # the first module set up is the one synced
    critic, critic_opt = fabric.setup(critic, critic_opt)
    if args.explicit_trigger == "critic":
        callback.trigger_optimizer = critic_opt
    for _ in range(args.steps):
        x = torch.randn(16, 4)
        fabric.backward(actor(x).pow(2).mean() + critic(x).pow(2).mean())
        actor_opt.step()  # each step also fires on_after_optimizer_step for the critic's optimizer below
        critic_opt.step()
        actor_opt.zero_grad()
        critic_opt.zero_grad()
        time.sleep(0.02)
    if args.train_end_call:
        fabric.call("on_train_end")
    flat = torch.cat([p.detach().flatten() for p in actor.parameters()]).tolist()
    print("TRAINER " + json.dumps({"steps": callback.step, "weights": flat}), flush=True)


def main() -> None:
    args = parse_args()
    callback = WeightSyncCallback(every_n_steps=args.every)
    strategy = WeightSyncStrategy(collect, inference_workers=2, start_method="fork")
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, callbacks=[callback])
    fabric.launch(train, args, callback)


if __name__ == "__main__":
    main()
