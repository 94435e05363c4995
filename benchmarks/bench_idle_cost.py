"""What weight sync costs a training loop between pushes: step time with W idle workers connected, against none.

    python benchmarks/bench_idle_cost.py                     # gloo and shm, W = 1 and 4 (about 1 min on 2 cores)
    python benchmarks/bench_idle_cost.py --workers 4 --transports gloo

bench_sync.py times push() itself; this one times what the rest of the library makes the trainer pay: its
threads (one link per worker, the heartbeat monitor) and the control store it hosts, which the workers' polls
reach. The trainer runs a Python-heavy step (a small MLP's forward, backward and Adam step, one torch thread),
the kind of step where any thread that wants the GIL slows it down. Per case, in one trainer process:

- ``alone``: the step before the scheme exists, and again after it closed (the workers wait, blocked);
- ``idle``: the scheme started, W workers connected and polling every 1 ms, no push;
- ``push``: the same with a push after every step (the sync's own work then counts too).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, here and in the spawned workers

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fabric_weightsync import WeightSyncScheme, WorkerContext
from fabric_weightsync.control import ControlPlane
from flags import parse_flags
from results_file import provenance, write_section


@dataclass
class Args:
    workers: str = "1,4"
    transports: str = "gloo,shm"
    steps: int = 400
    repeats: int = 5
    poll_interval_s: float = 0.001
    timeout_s: float = 30.0
    out: str = "benchmarks/results.md"


def make_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4)
    )


def worker(worker_id: int, args: Args, num_workers: int, boot_port: int, stop) -> None:
    torch.set_num_threads(1)
    control = ControlPlane.join("127.0.0.1", boot_port, args.timeout_s)
    ctx = WorkerContext(
        worker_id=worker_id, num_workers=num_workers, global_rank=worker_id + 1, local_rank=worker_id + 1,
        node_rank=0, device=torch.device("cpu"), control=control, timeout=args.timeout_s,
    )
    receiver = ctx.connect(make_policy())
    while not stop.is_set():
        if not receiver.poll():
            time.sleep(args.poll_interval_s)


def step_times(args: Args, step, after_step=lambda: None) -> list[float]:
    """ms per step, one value per repeat of ``args.steps`` steps."""
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
            after_step()
        times.append((time.perf_counter() - start) / args.steps * 1e3)
    return times


def run_case(args: Args, transport: str, num_workers: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    boot = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    procs = [spawn.Process(target=worker, args=(i, args, num_workers, boot.port, stop), daemon=True) for i in range(num_workers)]
    for proc in procs:
        proc.start()
    model = make_policy()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(64, 64)

    def step() -> None:
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step_times(args, step)  # warm-up
    result = {"alone": step_times(args, step)}
    scheme = WeightSyncScheme(ControlPlane.serve("127.0.0.1", boot.port, args.timeout_s), num_workers, transport=transport, timeout=args.timeout_s)
    scheme.start(model, 0)
    try:
        if not scheme.flush(args.timeout_s):
            raise RuntimeError("the workers did not connect")
        time.sleep(0.2)  # every worker in its poll loop
        result["idle"] = step_times(args, step)
        versions = iter(range(1, 1 << 30))
        result["push"] = step_times(args, step, lambda: scheme.push(next(versions)))
        scheme.flush(args.timeout_s)
    finally:
        stop.set()
        scheme.close()
        for proc in procs:
            proc.join(args.timeout_s)
    result["alone"] += step_times(args, step)
    return result


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]"


def main(args: Args) -> None:
    lines = [
        "## What idle workers and pushes cost a training step (bench_idle_cost.py)",
        "",
        f"{args.steps} steps x {args.repeats} repeats per phase; ms per step, median [min-max]",
        "",
        "| transport | W | alone ms/step | idle ms/step | push every step ms/step | idle / alone | push / alone |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for transport in args.transports.split(","):
        for num_workers in map(int, args.workers.split(",")):
            r = run_case(args, transport, num_workers)
            alone = statistics.median(r["alone"])
            lines.append(
                f"| {transport} | {num_workers} | {summary(r['alone'])} | {summary(r['idle'])} | {summary(r['push'])} "
                f"| {statistics.median(r['idle']) / alone:.2f} | {statistics.median(r['push']) / alone:.2f} |"
            )
            print(lines[-1], flush=True)
    write_section("bench_idle_cost", "\n".join(lines[:2] + provenance() + lines[2:]), args.out)


def parse_args() -> Args:
    return parse_flags(Args, __doc__)


if __name__ == "__main__":
    main(parse_args())
