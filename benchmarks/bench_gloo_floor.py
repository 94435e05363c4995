"""How fast a gloo push can reach a worker that polls in a tight loop, at best, on this machine: target (5)'s floor.

    python benchmarks/bench_gloo_floor.py                  # small policy (0.3 MB), about 1 min on 2 cores
    python benchmarks/bench_gloo_floor.py --idle-s 0       # pushes back to back, as bench_sync.py's raw sends

bench_sync.py judges our push -> applied (worker polling in a tight loop) against one raw flat send timed back to
back, every thread awake; our pushes there come after milliseconds of other work, as they do after a training
step. This script times, in one run and after the same pause before every push (``--idle-s``), the yardstick,
what any design could do, and ours, each with one two-rank gloo group and one torch thread per process:

- ``raw``: the yardstick: the trainer sends a ready buffer, the worker waits in ``recv().wait()``.
- ``inline``: a push that sent from the trainer thread: copy the weights into a staging buffer, then send; the
  worker posted its receive and spins on the buffer's last word, as ours does. The trainer is stalled for the
  whole send, which target (1) rules out.
- ``one-hop``: the same, but the trainer only copies and wakes one sender thread: the least a trainer that never
  waits can do. No instruction, no ack, no check that the update is still the newest.
- ``ours``: WeightSyncScheme over gloo and a worker calling ``poll()`` in a tight loop.

Workers of the first three take the update where it lands (ours applies it by swapping storages, no copy).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, here and in the spawned processes

import multiprocessing as mp
import queue
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fabric_weightsync import WeightSyncScheme, WorkerContext
from fabric_weightsync.control import ControlPlane
from flags import parse_flags
from results_file import provenance, write_section

MODES = ("raw", "inline", "one-hop", "ours")


@dataclass
class Args:
    nbytes: int = 303_000
    """bytes per update (bench_sync.py's small policy is 0.303 MB)"""
    syncs: int = 40
    """timed pushes per mode and round, after 5 untimed ones"""
    rounds: int = 2
    """run every mode this many times, interleaved, so load drift hits them alike"""
    idle_s: float = 0.005
    """pause before each push, so that every thread of the previous sync is asleep again, as after a training step
    (0: back to back, as bench_sync.py's raw send)"""
    timeout_s: float = 30.0
    out: str = "benchmarks/results.md"
    """the markdown file whose bench_gloo_floor section gets the table"""


WARMUP = 5


def make_policy(nbytes: int) -> torch.nn.Module:
    policy = torch.nn.Linear(nbytes // 4, 1, bias=False)
    torch.nn.init.uniform_(policy.weight)
    return policy


def wait_count(store: dist.Store, key: str, count: int) -> None:
    while store.add(key, 0) < count:
        time.sleep(0.0002)


def pair(store: dist.Store, rank: int, args: Args) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(dist.PrefixStore("floor", store), rank, 2, timedelta(seconds=args.timeout_s))


# ------------------------------------------------------------------ trainer side
def trainer(mode: str, args: Args, port: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=args.timeout_s))
    starts = ours_trainer(args, store) if mode == "ours" else floor_trainer(mode, args, store)
    out.put(("trainer", starts[WARMUP:]))
    wait_count(store, "done", 1)  # keep this end of the group (and the scheme's store) up until the worker is done


def floor_trainer(mode: str, args: Args, store: dist.Store) -> list[float]:
    group = pair(store, 0, args)
    weights = torch.rand(args.nbytes // 4)
    staging = torch.empty_like(weights)
    bell: queue.SimpleQueue = queue.SimpleQueue()  # True: send the staging buffer; None: stop

    def sender() -> None:
        while bell.get():
            group.send([staging], 1, 0).wait()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    starts = []
    for i in range(WARMUP + args.syncs):
        wait_count(store, "armed", i + 1)
        time.sleep(args.idle_s)
        weights.add_(1.0)  # the optimizer step
        start = time.monotonic()
        if mode == "raw":
            group.send([weights], 1, 0).wait()
        else:
            staging.copy_(weights)
            if mode == "inline":
                group.send([staging], 1, 0).wait()
            else:
                bell.put(True)
        starts.append(start)
    bell.put(None)
    thread.join()
    return starts


def ours_trainer(args: Args, store: dist.Store) -> list[float]:
    policy = make_policy(args.nbytes)
    control = ControlPlane.serve("127.0.0.1", store.port, args.timeout_s)
    scheme = WeightSyncScheme(control, 1, transport="gloo", timeout=args.timeout_s)
    scheme.start(policy, 0)
    starts = []
    try:
        for version in range(1, WARMUP + args.syncs + 1):
            if not scheme.flush(args.timeout_s):
                raise RuntimeError(f"version {version - 1} never reached the worker")
            time.sleep(args.idle_s)
            with torch.no_grad():
                policy.weight.add_(1.0)
            start = time.monotonic()
            scheme.push(version)
            starts.append(start)
        if not scheme.flush(args.timeout_s):
            raise RuntimeError("the last version never reached the worker")
    finally:
        scheme.close()
    return starts


# ------------------------------------------------------------------ worker side
def worker(mode: str, args: Args, port: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=args.timeout_s))
    applied = ours_worker(args, store) if mode == "ours" else floor_worker(mode, args, store)
    out.put(("worker", applied[WARMUP:]))
    store.add("done", 1)


def floor_worker(mode: str, args: Args, store: dist.Store) -> list[float]:
    """Takes each update where it lands: applying it by swapping storages, as ours does, costs next to nothing."""
    group = pair(store, 1, args)
    landing = torch.empty(args.nbytes // 4)
    last = memoryview(landing.numpy())[-1:]
    applied = []
    for _ in range(WARMUP + args.syncs):
        last[0] = -1.0  # the trainer's weights are never negative: the landed update overwrites this mark last
        work = group.recv([landing], 0, 0)
        store.add("armed", 1)
        if mode != "raw":
            while last[0] == -1.0:
                pass
        work.wait()
        applied.append(time.monotonic())
    return applied


def ours_worker(args: Args, store: dist.Store) -> list[float]:
    policy = make_policy(args.nbytes)
    control = ControlPlane.join("127.0.0.1", store.port, args.timeout_s)
    ctx = WorkerContext(
        worker_id=0, num_workers=1, global_rank=1, local_rank=1, node_rank=0,
        device=torch.device("cpu"), control=control, timeout=args.timeout_s,
    )
    receiver = ctx.connect(policy)
    applied = []
    for _ in range(WARMUP + args.syncs):
        while not receiver.poll():
            pass
        applied.append(time.monotonic())
    return applied


# ------------------------------------------------------------------ driver
def run(ctx: mp.context.BaseContext, mode: str, args: Args) -> list[float]:
    """push -> applied of each timed sync, in seconds, from fresh processes."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = ctx.Queue()
    procs = [ctx.Process(target=role, args=(mode, args, store.port, out)) for role in (trainer, worker)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=4 * args.timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=args.timeout_s)
    return [applied - start for start, applied in zip(got["trainer"], got["worker"])]


def parse_args() -> Args:
    return parse_flags(Args, __doc__)


def main() -> None:
    args = parse_args()
    ctx = mp.get_context("spawn")
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            latencies[mode] += run(ctx, mode, args)
    raw = statistics.median(latencies["raw"])
    lines = [
        "## The gloo floor: push -> applied against a raw send after the same pause (bench_gloo_floor.py)",
        "",
        *provenance(),
        "",
        f"{args.nbytes / 1e6:.3g} MB, worker polling in a tight loop, {args.rounds} rounds",
        "",
        "| path | median ms | min ms | median / raw |",
        "|---|---|---|---|",
    ]
    for mode, values in latencies.items():
        median = statistics.median(values)
        lines.append(f"| {mode} | {median * 1e3:.3f} | {min(values) * 1e3:.3f} | {median / raw:.2f}x |")
    print("\n".join(lines))
    write_section("bench_gloo_floor", "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
