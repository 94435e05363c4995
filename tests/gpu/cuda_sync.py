"""A CUDA trainer (one GPU) and two workers whose policies live on a GPU; prints what the test checks.

    python tests/gpu/cuda_sync.py --transport auto|shm|gloo|nccl --steps 30 --width 1024
"""

import argparse
import hashlib
import time

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--devices", type=int, default=1)
    return parser.parse_args()


def make_policy(width: int) -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.Linear(width, 4))


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def collect(ctx: WorkerContext) -> None:
    args = parse_args()
    policy = make_policy(args.width).to(ctx.device)
    receiver = ctx.connect(policy)
    while not ctx.stop_requested:
        receiver.poll()
        with torch.no_grad():
            policy(torch.randn(32, 64, device=ctx.device))
        time.sleep(0.002)
    receiver.poll()
    print(f"WORKER {ctx.worker_id} device={next(policy.parameters()).device} version={receiver.version} digest={digest(policy)}", flush=True)


def main() -> None:
    args = parse_args()
    strategy = WeightSyncStrategy(collect, inference_workers=2, transport=args.transport, worker_device="cuda")
    fabric = Fabric(accelerator="cuda", devices=args.devices, strategy=strategy, callbacks=[WeightSyncCallback()])
    fabric.launch()
    model = make_policy(args.width)
    torch.manual_seed(fabric.global_rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    stalls = []
    for _ in range(args.steps):
        loss = model(torch.randn(256, 64, device=fabric.device)).pow(2).mean()
        fabric.backward(loss)
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        stalls.append(time.perf_counter() - start)
        optimizer.zero_grad()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stalls.sort()
    if fabric.global_rank == 0:
        print(f"TRAINER device={fabric.device} steps={args.steps} digest={digest(model)} bytes={nbytes}"
              f" step+push median {1e3 * stalls[len(stalls) // 2]:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
