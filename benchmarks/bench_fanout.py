"""Weights to N nodes: global rank 0 serving every worker, against each node's own sender, in one run.

    python benchmarks/bench_fanout.py                          # N = 2, 4 nodes of 2 workers; a 100 MB policy
    python benchmarks/bench_fanout.py --nodes 2 --size-mb 10   # a quick look

Nodes are simulated on this machine: each gets its own ``FABRIC_WEIGHTSYNC_HOST``, so processes of different
nodes never share memory and talk over gloo on loopback, as over a network. Each case is real Fabric launches in
script mode, one training rank per node:

- ``rank 0``: what every multi-node run did before node senders: one node, one training rank, and N x W workers,
  W of them on rank 0's "host" (shared memory) and the others on N - 1 other "hosts" (one gloo pair each);
- ``node senders``: N nodes (``python train.py`` with ``NODE_RANK``), each with one training rank and W workers;
  every node's training rank serves its own workers from its own replica;
- ``relay`` (``serve_replicas=False``): the same N nodes, each node's training rank relaying rank 0's weights.

Figures: weight bytes global rank 0 sent per update (counted by its sender), and push -> applied on each node's
workers (from the push of the sender whose weights they get; workers wait for updates, no rollout in between). Medians
over the pushes; every node pushes the same weights at the same barrier.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, here and in every launched process

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncStrategy, WorkerContext
from fabric_weightsync.channels.base import HOST_ENV
from bench_scale import make_policy
from flags import parse_flags
from results_file import provenance, write_section


@dataclass
class Args:
    nodes: str = "2,4"
    workers: int = 2
    """workers per node"""
    size_mb: float = 100.0
    pushes: int = 8
    timeout_s: float = 300.0
    out: str = "benchmarks/results.md"
    case: str = ""
    """internal: ``rank0,N``, ``nodes,N`` or ``relay,N``: this process is one node of that case"""
    dir: str = ""
    """internal: where the case's processes write their timings"""


def parse_args() -> Args:
    return parse_flags(Args, __doc__, known_only=True)


def collect(ctx: WorkerContext) -> None:
    """Wait for every update and note when it was applied."""
    args = parse_args()
    torch.set_num_threads(1)
    receiver = ctx.connect(make_policy(args.size_mb))
    applied = {}
    while not ctx.stop_requested:
        if receiver.wait_for_update(0.5):
            applied[receiver.version] = time.time_ns()
    node = os.environ.get(HOST_ENV, "")
    Path(args.dir, f"worker{ctx.worker_id}.json").write_text(json.dumps({"host": node, "applied": applied}))


def train(fabric: Fabric, args: Args) -> None:
    """Push ``pushes`` versions, every node at the same barrier; rank 0 waits for every worker before the next."""
    model = fabric.setup(make_policy(args.size_mb))
    strategy, rank = fabric.strategy, fabric.global_rank
    scheme = strategy.scheme
    if rank == 0 and not scheme.flush(args.timeout_s):
        raise RuntimeError("some workers never connected")
    sent_before = scheme.bytes_sent if rank == 0 else 0
    pushed = {}
    for version in range(1, args.pushes + 1):
        with torch.no_grad():
            model.weight.fill_(float(version))  # the same on every rank: replicas stay identical
        fabric.barrier()
        pushed[version] = time.time_ns()
        strategy.push()
        if rank == 0 and not scheme.flush(args.timeout_s):
            raise RuntimeError(f"version {version} was not delivered")
        fabric.barrier()
    record = {"host": os.environ.get(HOST_ENV, ""), "pushed": pushed}
    if rank == 0:
        record["bytes_per_update"] = (scheme.bytes_sent - sent_before) / args.pushes
    Path(args.dir, f"trainer{rank}.json").write_text(json.dumps(record))


def run_node(args: Args) -> None:
    """One node of a case (a launch re-runs this script for its other local ranks)."""
    path, nodes = args.case.split(",")
    nodes = int(nodes)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if path == "rank0" and local_rank > 0:  # a worker of the single node: its simulated host
        os.environ[HOST_ENV] = f"sim-{(local_rank - 1) // args.workers}"
    torch.set_num_threads(1)
    workers = args.workers * nodes if path == "rank0" else args.workers
    strategy = WeightSyncStrategy(
        collect, inference_workers=workers, sync_timeout=args.timeout_s, shutdown_timeout=args.timeout_s, serve_replicas=path != "relay"
    )
    fabric = Fabric(accelerator="cpu", devices=1, num_nodes=1 if path == "rank0" else nodes, strategy=strategy)
    fabric.launch()
    train(fabric, args)


def measure(args: Args, path: str, nodes: int) -> dict:
    """Launch one case and read what its processes wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        port = str(_free_port())
        launches = 1 if path == "rank0" else nodes
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", f"{path},{nodes}", "--dir", tmp]
        procs = [
            subprocess.Popen(cmd, env={**os.environ, HOST_ENV: f"sim-{node}", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for node in range(launches)
        ]  # fmt: skip
        codes = [proc.wait(timeout=args.timeout_s + 120) for proc in procs]
        if any(codes):
            raise RuntimeError(f"case {path},{nodes} failed: exit codes {codes}")
        trainers = [json.loads(p.read_text()) for p in Path(tmp).glob("trainer*.json")]
        workers = [json.loads(p.read_text()) for p in Path(tmp).glob("worker*.json")]
    pushed_on = {t["host"]: t["pushed"] for t in trainers}
    by_node: dict[str, list[float]] = {}
    for worker in workers:
        # From the push of whose weights it gets: its own node's sender, else rank 0's (on sim-0).
        pushed = pushed_on[worker["host"] if path == "nodes" else "sim-0"]
        delays = [(t - pushed[v]) / 1e6 for v, t in worker["applied"].items() if v in pushed]
        by_node.setdefault(worker["host"], []).extend(delays)
    rank0 = next(t for t in trainers if "bytes_per_update" in t)
    return {
        "egress_mb": rank0["bytes_per_update"] / 2**20,
        "node0_ms": statistics.median(by_node["sim-0"]),
        "farthest_ms": max(statistics.median(d) for d in by_node.values()),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    args = parse_args()
    if args.case:
        return run_node(args)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        before, after, relay = (measure(args, path, nodes) for path in ("rank0", "nodes", "relay"))
        rows.append((nodes, before, after, relay))
        print(nodes, before, after, relay, flush=True)
    lines = provenance() + [
        "",
        f"N simulated nodes of {args.workers} workers, a {args.size_mb:g} MB policy, {args.pushes} pushes; medians.",
        "Egress: weight bytes global rank 0 sent per update. Applied: push -> applied, on node 0's workers and on the",
        "node whose workers got it last (from the push of the sender whose weights they get).",
        "Every simulated node shares this machine's cores and memory bandwidth, which real nodes do not: absolute",
        "times grow with N here. A relay adds a hop (receive, then stage for its node's workers) to rank 0's weights.",
        "",
        "| N | path | rank-0 egress per update (MB) | applied, node 0 (ms) | applied, farthest node (ms) |",
        "|---|---|---|---|---|",
    ]
    for nodes, before, after, relay in rows:
        for name, r in (("rank 0 serves every worker", before), ("node senders", after), ("relay", relay)):
            lines.append(f"| {nodes} | {name} | {r['egress_mb']:.1f} | {r['node0_ms']:.1f} | {r['farthest_ms']:.1f} |")
    lines += [
        "",
        "| N | egress: node senders / rank 0 | relay / rank 0 | farthest node: node senders / rank 0 |"
        " farthest node, node senders / node 0 of rank 0 (same-host shared memory) | farthest node: relay / rank 0 |",
        "|---|---|---|---|---|---|",
    ]
    for nodes, before, after, relay in rows:
        lines.append(
            f"| {nodes} | {after['egress_mb'] / before['egress_mb']:.2f} | {relay['egress_mb'] / before['egress_mb']:.2f} |"
            f" {after['farthest_ms'] / before['farthest_ms']:.2f} | {after['farthest_ms'] / before['node0_ms']:.2f} |"
            f" {relay['farthest_ms'] / before['farthest_ms']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_section("bench_fanout", text, args.out)


if __name__ == "__main__":
    main()
