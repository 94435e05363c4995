"""One tiny training run for every launch mode of the tests: python script, spawn/fork, torchrun and SLURM.

Training ranks print what the tests check about their world (ranks, gradient averaging, barrier, all_reduce,
sampler split) and save their final weights; workers record every version they applied and save their final
weights, so the test can compare tensors exactly. Lines look like ``TAG key=value ...`` with JSON values.

    python fws_train.py --out DIR [--launch popen|spawn|fork|cli] [--devices 2] [--workers 2] [--nodes 1]
                        [--steps 6] [--worker-mode ok|raise|mismatch|exit] [--strategy object|registry]
                        [--transport auto] [--on-worker-failure raise] [--verify-replicas N] [--diverge-rank R] [--relay]
"""

import argparse
import gc
import json
import operator
import os
import sys
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy

torch.set_num_threads(1)
# Every full collection, the one at interpreter exit included, walks the whole torch + Lightning import graph:
# on a loaded 2-core machine that was 10-25 s per launch. Frozen objects are only the imports; everything the
# library allocates later is collected as usual.
gc.freeze()

HIDDEN = 16
MISMATCHED_HIDDEN = 8
FAILURE_STEP_BUDGET = 600
"""Default steps of a run with a failing worker: it must stop at the push that sees the failure, long before."""

DATASET_SIZE = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    # cli: started by `fabric run`, which sets the processes up in Fabric(...) and refuses fabric.launch()
    parser.add_argument("--launch", choices=["popen", "spawn", "fork", "cli"], default="popen")
    parser.add_argument("--strategy", choices=["object", "registry"], default="object")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: 6, or a long budget with a failing worker")
    # exit: the run's last worker dies (os._exit) once it applied version 2
    parser.add_argument("--worker-mode", choices=["ok", "raise", "mismatch", "exit"], default="ok")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--on-worker-failure", choices=["raise", "continue"], default="raise")
    parser.add_argument("--verify-replicas", type=int, default=None)
    parser.add_argument("--diverge-rank", type=int, default=None, help="this training rank alters its weights at step 3")
    parser.add_argument("--relay", action="store_true", help="serve_replicas=False: nodes get rank 0's weights")
    return parser.parse_args()


def emit(tag: str, **fields) -> None:
    # One write per line so lines of concurrent processes sharing the pipe never interleave.
    line = tag + "".join(f" {k}={json.dumps(v, separators=(',', ':'))}" for k, v in fields.items())
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_policy(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def checksum(module: nn.Module) -> float:
    return float(sum(p.double().sum() for p in module.state_dict().values()))


def worker(ctx) -> None:
    args = parse_args()
    emit(
        "WORKER_START",
        worker_id=ctx.worker_id, num_workers=ctx.num_workers, global_rank=ctx.global_rank,
        local_rank=ctx.local_rank, node_rank=ctx.node_rank, pid=os.getpid(),
    )  # fmt: skip
    hidden = MISMATCHED_HIDDEN if args.worker_mode == "mismatch" else HIDDEN
    # A seed unlike the trainer's: equal weights at the end can only come from a transfer.
    policy = make_policy(hidden, seed=1000 + ctx.worker_id)
    tensors = list(policy.parameters())
    rx = ctx.connect(policy)
    if args.worker_mode == "raise" and ctx.worker_id == 0:
        raise RuntimeError(f"injected failure in inference worker {ctx.worker_id}")
    dies = args.worker_mode == "exit" and ctx.worker_id == ctx.num_workers - 1
    versions = [rx.version]
    seen = {rx.version: snapshot(policy)}
    while not ctx.stop_requested:
        if rx.wait_for_update(1.0):
            versions.append(rx.version)
            seen[rx.version] = snapshot(policy)
        if dies and rx.version >= 2:
            emit("WORKER_EXIT", worker_id=ctx.worker_id, version=rx.version)
            os._exit(3)
    out = Path(args.out)
    torch.save({"versions": versions, "seen": seen, "weights": snapshot(policy)}, out / f"worker{ctx.worker_id}.pt")
    emit(
        "WORKER_DONE",
        worker_id=ctx.worker_id, final_version=rx.version, versions=versions, checksum=checksum(policy),
        params_kept_identity=all(map(operator.is_, tensors, policy.parameters())),
    )  # fmt: skip


def train(fabric: Fabric) -> None:
    args = parse_args()
    out = Path(args.out)
    rank, world = fabric.global_rank, fabric.world_size
    emit(
        "TRAIN_START",
        rank=rank, world_size=world, local_rank=fabric.local_rank, node_rank=fabric.node_rank, pid=os.getpid(),
        default_group_size=torch.distributed.get_world_size(), strategy=type(fabric.strategy).__name__,
        worker_fn=f"{fabric.strategy.worker_fn.__module__}:{fabric.strategy.worker_fn.__name__}",
    )  # fmt: skip
    raw = make_policy(HIDDEN, seed=0)
    model, optimizer = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.05))

    scheme = fabric.strategy.scheme
    if rank == 0:
        # The collectives below are meant to run while the workers are up and connected.
        scheme.flush(60)
        emit("CONNECTED", delivered=[w.delivered_version for w in scheme.workers], alive=[w.alive for w in scheme.workers])

    # A second module: the first one set up is the synced policy, this one only probes gradient averaging.
    probe = fabric.setup_module(nn.Linear(3, 1, bias=False))
    fabric.backward(probe(torch.ones(1, 3)).sum() * (rank + 1))
    emit("GRAD", rank=rank, grad=probe.weight.grad.flatten().tolist())

    fabric.barrier()
    emit("BARRIER", rank=rank)
    total = fabric.all_reduce(torch.tensor(float(rank + 1)), reduce_op="sum")
    emit("ALL_REDUCE", rank=rank, sum=float(total))

    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(DATASET_SIZE)), batch_size=1))
    emit(
        "SAMPLER",
        rank=rank, num_replicas=loader.sampler.num_replicas, sampler_rank=loader.sampler.rank,
        indices=[int(batch[0]) for (batch,) in loader],
    )  # fmt: skip

    steps = args.steps if args.steps is not None else (6 if args.worker_mode == "ok" else FAILURE_STEP_BUDGET)
    generator = torch.Generator().manual_seed(rank)
    history = {0: snapshot(raw)}  # version v = the weights after v optimizer steps
    for step in range(steps):
        loss = model(torch.randn(8, 4, generator=generator)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if args.worker_mode in ("ok", "exit"):
            history[step + 1] = snapshot(raw)
        if step == 2 and rank == args.diverge_rank:
            with torch.no_grad():  # this rank's replica only: DDP never hears of it
                next(raw.parameters()).add_(1.0)
        time.sleep(0.05)  # so workers see several versions, and a failing worker is noticed mid-run
    torch.save({"weights": snapshot(raw), "history": history}, out / f"trainer{rank}.pt")
    if scheme is not None:
        scheme.flush(60)
        emit(
            "SENDER",
            rank=rank, node=fabric.node_rank, served=[w.worker_id for w in scheme.health.watched],
            bytes_sent={w.worker_id: w.bytes_sent for w in scheme.workers}, replicas_compared=scheme.replicas_compared,
            workers={w.worker_id: [w.alive, w.delivered_version] for w in scheme.workers},
            relays={w.relay_of: w.bytes_sent for w in scheme.relays},
        )  # fmt: skip
    emit("TRAIN_DONE", rank=rank, steps=steps, policy_version=fabric.strategy.policy_version, checksum=checksum(raw))


def main() -> None:
    args = parse_args()
    if args.strategy == "registry":
        strategy = "ddp_weightsync_spawn" if args.launch == "spawn" else "ddp_weightsync"
    else:
        start_method = "popen" if args.launch == "cli" else args.launch
        strategy = WeightSyncStrategy(
            worker, inference_workers=args.workers, start_method=start_method, sync_timeout=30, transport=args.transport,
            on_worker_failure=args.on_worker_failure, verify_replicas=args.verify_replicas, serve_replicas=not args.relay,
        )  # fmt: skip
    fabric = Fabric(
        accelerator="cpu", devices=args.devices, num_nodes=args.nodes, strategy=strategy, callbacks=[WeightSyncCallback()]
    )
    if args.launch == "cli":
        train(fabric)
    elif args.launch == "popen":
        fabric.launch()
        train(fabric)
    else:
        fabric.launch(train)


if __name__ == "__main__":
    main()
