"""How weight sync scales with the number of shared-memory workers on one host.

    python benchmarks/bench_scale.py                              # W = 1, 8, 32, 64; small and 100 MB policies
    python benchmarks/bench_scale.py --workers 1,64 --sizes 100   # one comparison

Each case is one real Fabric launch (``start_method="fork"``: one training rank, W workers forked from it, so the
figures are the library's, not W Python interpreters importing torch), in a fresh process:

- ``connect``: from ``fabric.launch()`` until every worker holds the initial weights (``scheme.flush()``);
- ``stall``: time inside ``push()`` on the trainer;
- ``applied``: from the push until the last worker applied it (workers poll between 5 ms "rollouts").
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, here and in every forked process

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncStrategy, WorkerContext
from flags import parse_flags
from results_file import provenance, write_section


@dataclass
class Args:
    workers: str = "1,8,32,64"
    sizes: str = "0.3,100"
    """policy sizes in MB"""
    pushes: int = 10
    rollout_s: float = 0.005
    timeout_s: float = 600.0
    out: str = "benchmarks/results.md"
    case: str = ""
    """internal: run one case (W,MB) in this process and print its figures"""


def parse_args() -> Args:
    return parse_flags(Args, __doc__)


def make_policy(megabytes: float) -> torch.nn.Module:
    width = max(1, int(megabytes * 2**20 / 4 / 1024))
    return torch.nn.Linear(1024, width, bias=False)


def collect(ctx: WorkerContext) -> None:
    args = parse_args()
    torch.set_num_threads(1)
    receiver = ctx.connect(make_policy(float(args.case.split(",")[1])))
    while not ctx.stop_requested:
        receiver.poll()
        time.sleep(args.rollout_s)


def train(fabric: Fabric, args: Args, started: float) -> dict:
    model = fabric.setup(make_policy(float(args.case.split(",")[1])))
    scheme = fabric.strategy.scheme
    if not scheme.flush(args.timeout_s):
        raise RuntimeError("some workers never connected")
    connect = time.time() - started
    stalls, applied = [], []
    for version in range(1, args.pushes + 1):
        with torch.no_grad():
            model.weight.fill_(float(version))
        begin = time.perf_counter()
        scheme.push(version)
        stalls.append(time.perf_counter() - begin)
        while min(status.delivered_version for status in scheme.workers) < version:
            time.sleep(0.0002)
        applied.append(time.perf_counter() - begin)
    return {"connect_s": connect, "stall_ms": 1e3 * statistics.median(stalls), "applied_ms": 1e3 * statistics.median(applied)}


def run_case(args: Args) -> None:
    workers = int(args.case.split(",")[0])
    torch.set_num_threads(1)
    started = time.time()
    strategy = WeightSyncStrategy(collect, inference_workers=workers, start_method="fork", sync_timeout=args.timeout_s)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
    print("RESULT " + json.dumps(fabric.launch(train, args, started)), flush=True)


def main() -> None:
    args = parse_args()
    if args.case:
        return run_case(args)
    rows = []
    for megabytes in (float(m) for m in args.sizes.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            cmd = [sys.executable, __file__, "--case", f"{workers},{megabytes}", "--pushes", str(args.pushes)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s + 120)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                rows.append((megabytes, workers, None, done.returncode, done.stderr[-300:]))
            else:
                rows.append((megabytes, workers, json.loads(lines[-1][7:]), 0, ""))
            print(rows[-1][:4], flush=True)
    lines = provenance() + [
        "",
        "One training rank and W shared-memory workers forked from it (2 cores here: W = 64 is 32x oversubscribed);",
        f"{args.pushes} pushes per case, workers polling between {args.rollout_s * 1e3:g} ms rollouts. Medians.",
        "",
        "| policy | W | connect (s) | push stall (ms) | stall / W=1 | push -> applied on the last worker (ms) | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {mb: r["stall_ms"] for mb, w, r, _, _ in rows if r is not None and w == min(int(x) for x in args.workers.split(","))}
    for megabytes, workers, result, code, err in rows:
        if result is None:
            lines.append(f"| {megabytes:g} MB | {workers} | failed | | | | {code}: {err.splitlines()[-1] if err else ''} |")
            continue
        ratio = result["stall_ms"] / base[megabytes] if megabytes in base else float("nan")
        lines.append(
            f"| {megabytes:g} MB | {workers} | {result['connect_s']:.1f} | {result['stall_ms']:.3f} | {ratio:.2f} |"
            f" {result['applied_ms']:.2f} | 0 |"
        )
    text = "\n".join(lines)
    print(text)
    write_section("bench_scale", text, args.out)


if __name__ == "__main__":
    main()
