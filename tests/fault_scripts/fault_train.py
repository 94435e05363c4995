"""A training run that fault-injection tests steer, observe and break.

Every version is recognisable: before optimizer step ``v`` rank 0 fills every parameter with ``float(v)`` (SGD
with ``lr=0`` then leaves them untouched, and WeightSyncCallback pushes them as version ``v``). A worker's policy
is therefore intact iff all its parameters equal the version it reports; a torn or half-applied update shows.

Each process prints ``FWS {json}`` lines with an ``ev`` name and a wall-clock ``t`` the test compares against
the moments it killed something. Worker behaviours are chosen per worker id with ``--behaviour 0=poll,1=every:2``:

    poll                wait_for_update in a loop (the usual collector)
    every:S             poll(), then a "rollout" of S seconds, repeated
    sleeper             connect, then a rollout that never touches the store again (only the heartbeat can notice
                        a dead trainer)
    kill_self:K         poll; after K updates, SIGKILL itself in the middle of the next receive
    kill_trainer:K      poll; after K updates, SIGKILL training rank 0 in the middle of the next receive, then keep
                        polling and report what the policy holds
    mismatch            a policy of another architecture (its connect must fail)
    die_after_connect   SIGKILL itself right after its connect returned (before any heartbeat)
    poll_now            poll, but connect at once instead of after the usual 1 s of "building the environment"
    raise:K             poll; after K updates, raise (worker_fn fails with a traceback); raise:end once training
                        ended, so the worker process exits with code 1 while rank 0 exits

    python fault_train.py --out DIR [--devices 1] [--workers 2] [--transport auto] [--on-failure continue] ...
"""

import argparse
import atexit
import gc
import json
import logging
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import torch
from lightning.fabric import Fabric
from torch import nn

from fabric_weightsync import (
    SchemaMismatchError,
    WeightSyncCallback,
    WeightSyncStrategy,
    WorkerFailedError,
)
from fabric_weightsync.channels.group import GroupChannel
from fabric_weightsync.channels.shm import SharedMemoryChannel

torch.set_num_threads(1)
# The library logs worker failures and rejoins; the time on each line is when rank 0 decided it.
logging.basicConfig(level=logging.WARNING, format="FWSLOG %(created).3f %(name)s %(message)s")

HIDDEN = 16
MISMATCHED_HIDDEN = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1, help="one process per node, each started with its NODE_RANK")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--on-failure", default="continue")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--sync-timeout", type=float, default=30.0)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--step-sleep", type=float, default=0.02)
    parser.add_argument("--big-mb", type=int, default=0, help="add ~this many MB of weights to the policy")
    parser.add_argument("--behaviour", default="", help="per worker id: 0=poll,1=every:2")
    parser.add_argument("--until-rejoin", type=int, default=-1, help="train until this worker died and came back")
    parser.add_argument("--change-at", type=int, default=0, help="reshape a parameter after this step")
    parser.add_argument("--flush-every-step", action="store_true")
    parser.add_argument("--sample-at", default="", help="steps at which rank 0 reports memory, fds, store keys")
    parser.add_argument("--raise-for-worker", type=int, default=-1, help="re-raise the WorkerFailedError naming it")
    parser.add_argument("--worker-start-delay", type=float, default=0.0, help="popen workers start this much later")
    parser.add_argument("--until-connected", type=int, default=-1, help="train until this worker connected, then 150 steps")
    parser.add_argument("--no-wait-for-workers", action="store_true", help="start training before the workers are ready")
    return parser.parse_args()


def emit(ev: str, **fields) -> None:
    # One write per line: lines of processes sharing a pipe must not interleave.
    sys.stdout.write("FWS " + json.dumps({"ev": ev, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def make_policy(hidden: int, big_mb: int) -> nn.Module:
    policy = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    if big_mb:
        # Four square layers: a transfer of this size takes long enough to be interrupted in the middle.
        side = int(math.sqrt(big_mb * 2**20 / 4 / 4))
        policy.append(nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(4)]))
    return policy


def integrity(policy: nn.Module) -> dict:
    values = torch.cat([p.detach().flatten() for p in policy.parameters()])
    return {"lo": float(values.min()), "hi": float(values.max())}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def behaviour_of(args: argparse.Namespace, worker_id: int) -> tuple[str, str]:
    for item in filter(None, args.behaviour.split(",")):
        key, _, value = item.partition("=")
        if int(key) == worker_id:
            name, _, arg = value.partition(":")
            return name, arg
    return "poll", ""


# ---------------------------------------------------------------------------------------------- workers
class MidReceiveKiller:
    """SIGKILLs a process while an update is on its way into this worker.

    Over shared memory the receive runs inside the worker's poll: it starts when the channel's take_notice takes the
    notice, and ends when the poll returns. Over gloo the worker arms its receive ahead of time and gloo lands the
    bytes in the background, so a watcher thread looks at each armed buffer (GroupChannel._arm is hooked to learn
    of them): the transfer starts when the header's version changes (the
    first bytes arrived) and ends when the last word loses the channel's mark. The delay is a random fraction
    of the receives measured so far; a kill that would land after the receive finished is cancelled and
    retried on the next one with a shorter delay, so the kill really interrupts a transfer.
    """

    def __init__(self, target_pid_fn, warmup: int) -> None:
        self.target_pid_fn = target_pid_fn
        self.warmup = warmup
        self.durations: list[float] = []
        self.lock = threading.Lock()
        self.in_receive = False
        self.started = 0.0
        self.fired = False
        self.fraction = random.uniform(0.2, 0.8)
        self.timer = None
        killer = self
        for channel_type in (SharedMemoryChannel, GroupChannel):
            original = channel_type.take_notice

            def hooked(channel, timeout, original=original):
                taken = original(channel, timeout)
                if taken:
                    killer._receive_started()
                return taken

            channel_type.take_notice = hooked
        self.armed_receive = None
        original_arm = GroupChannel._arm

        def hooked_arm(channel, wire):
            original_arm(channel, wire)
            with killer.lock:
                killer.armed_receive = (channel._armed, wire.version)

        GroupChannel._arm = hooked_arm
        threading.Thread(target=self._watch_armed_receives, daemon=True).start()

    def _watch_armed_receives(self) -> None:
        watched = None
        while not self.fired:
            time.sleep(0.0005)
            with self.lock:
                current = self.armed_receive
            if current is None:
                continue
            armed, version_before = current
            landed = armed.last_word[0] != armed.mark
            if watched is not armed and armed.wire.version != version_before and not landed:
                watched = armed
                self._receive_started()
            elif watched is armed and landed:
                watched = None
                self.receive_finished(True)

    def _receive_started(self) -> None:
        with self.lock:
            self.in_receive, self.started = True, time.monotonic()
            if self.fired or len(self.durations) < self.warmup:
                return
            delay = self.fraction * statistics.median(self.durations)
            self.timer = threading.Timer(delay, self._fire, args=(delay,))
            self.timer.daemon = True
            self.timer.start()

    def receive_finished(self, applied: bool) -> None:
        with self.lock:
            if self.in_receive and applied:
                self.durations.append(time.monotonic() - self.started)
            self.in_receive = False
            if self.timer is not None and not self.fired:
                self.timer.cancel()
                self.timer = None
                self.fraction /= 2

    def _fire(self, delay: float) -> None:
        with self.lock:
            if not self.in_receive or self.fired:
                return
            self.fired = True
            target = self.target_pid_fn()
            emit(
                "KILL", target=target, delay=delay, into_receive=time.monotonic() - self.started,
                median_receive=statistics.median(self.durations), receives=len(self.durations),
            )  # fmt: skip
            os.kill(target, signal.SIGKILL)


def trainer_pid(out: Path) -> int:
    return int((out / "trainer0.pid").read_text())


def worker(ctx) -> None:
    args = parse_args()
    out = Path(args.out)
    name, arg = behaviour_of(args, ctx.worker_id)
    emit("WORKER_START", worker_id=ctx.worker_id, behaviour=name, local_rank=ctx.local_rank)
    killer = None
    if name == "kill_self":
        killer = MidReceiveKiller(os.getpid, warmup=int(arg or 3))
    elif name == "kill_trainer":
        killer = MidReceiveKiller(lambda: trainer_pid(out), warmup=int(arg or 3))
    # Real workers build environments and models before connecting (their heartbeat runs meanwhile); two
    # behaviours connect at once, before the heartbeat thread beat even once.
    if name not in ("die_after_connect", "poll_now"):
        time.sleep(1.0)
    hidden = MISMATCHED_HIDDEN if name == "mismatch" else HIDDEN
    torch.manual_seed(1000 + ctx.worker_id)  # unlike the trainer's weights: equality can only come from a transfer
    policy = make_policy(hidden, args.big_mb)
    rx = ctx.connect(policy)
    emit("WORKER_CONNECTED", worker_id=ctx.worker_id, version=rx.version, **integrity(policy), fds=fd_count())
    applied = [rx.version]
    errors = []
    if name == "die_after_connect":
        os.kill(os.getpid(), signal.SIGKILL)

    def receive(wait: float) -> None:
        try:
            if wait > 0:
                got = rx.wait_for_update(wait)
            else:
                got = rx.poll()
        except Exception as err:  # only the kill_trainer behaviour expects one (its trainer is gone)
            if killer is not None:
                killer.receive_finished(False)
            if name != "kill_trainer":
                raise
            errors.append(f"{type(err).__name__}: {err}"[:400])
            emit("RECEIVE_FAILED", worker_id=ctx.worker_id, error=errors[-1], version=rx.version, **integrity(policy))
            time.sleep(0.2)
            return
        if killer is not None:
            killer.receive_finished(got)
        if got:
            applied.append(rx.version)
            if name == "raise" and arg != "end" and len(applied) > int(arg or 3):
                emit("WORKER_RAISING", worker_id=ctx.worker_id, version=rx.version)
                raise RuntimeError(f"worker {ctx.worker_id} fails on purpose after {len(applied) - 1} updates")
            if len(applied) % 200 == 0:
                emit("WORKER_PROGRESS", worker_id=ctx.worker_id, applied=len(applied), version=rx.version, fds=fd_count())

    if name == "sleeper":
        # A rollout that never returns to the store: only the heartbeat thread can learn that training is gone.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)
    seconds = float(arg) if name == "every" else 0.0
    while not ctx.stop_requested:
        if name == "every":
            receive(0.0)
            time.sleep(seconds)
        else:
            receive(0.5)
    if name == "raise":
        emit("WORKER_RAISING", worker_id=ctx.worker_id, version=rx.version)
        raise RuntimeError(f"worker {ctx.worker_id} fails on purpose once training ended")
    # The final delivery happened before the stop flag was set; a last poll must find nothing newer.
    if name != "kill_trainer" and rx.poll():
        applied.append(rx.version)
    emit(
        "WORKER_DONE", worker_id=ctx.worker_id, final_version=rx.version, applied=len(applied), distinct=len(set(applied)),
        versions_increasing=applied == sorted(applied), errors=errors, fds=fd_count(), **integrity(policy),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- trainer
def sample(fabric: Fabric, step: int) -> None:
    gc.collect()
    store = fabric.strategy.control_plane().store
    emit(
        "SAMPLE", step=step, rss=psutil.Process().memory_info().rss, fds=fd_count(), threads=threading.active_count(),
        keys=store.raw.num_keys(), objects=len(gc.get_objects()),
    )  # fmt: skip


def status_of(scheme) -> list:
    return [(w.alive, w.error is not None) for w in scheme.workers]


def train(fabric: Fabric, args: argparse.Namespace) -> None:
    rank = fabric.global_rank
    out = Path(args.out)
    if rank == 0:
        (out / "trainer0.pid").write_text(str(os.getpid()))
    emit("TRAIN_START", rank=rank, master_port=fabric.strategy.cluster_environment.main_port)
    raw = make_policy(HIDDEN, args.big_mb)
    with torch.no_grad():
        for p in raw.parameters():
            p.zero_()  # version 0 is all zeros
    model, optimizer = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.0))
    scheme = fabric.strategy.scheme
    if rank == 0:
        control = fabric.strategy.control_plane()
        emit("CONTROL", host=control.host, port=control.port)
        connected = scheme.flush(60)
        emit("CONNECTED", ok=connected, delivered=[w.delivered_version for w in scheme.workers])
    samples = {int(s) for s in args.sample_at.split(",") if s}
    push_times = []
    seen = status_of(scheme) if rank == 0 else None
    died_at = None
    rejoined_at = None
    settled = None
    late_at = None
    step = 0
    limit = args.steps
    while step < limit:
        step += 1
        with torch.no_grad():
            for p in raw.parameters():
                p.fill_(float(step))
        started = time.perf_counter()
        try:
            optimizer.step()  # WeightSyncCallback pushes version `step` on rank 0
        except WorkerFailedError as err:
            emit(
                "WORKER_FAILED_ERROR", step=step, message=str(err)[:2000], push_max=max(push_times, default=0.0),
                alive=[w.alive for w in scheme.workers], delivered=[w.delivered_version for w in scheme.workers],
            )  # fmt: skip
            if f"Inference worker {args.raise_for_worker} failed" in str(err):
                raise
        except SchemaMismatchError as err:
            emit("SCHEMA_ERROR", step=step, message=str(err)[:2000])
            raise  # as a user's script would: training ends with the error
        push_times.append(time.perf_counter() - started)
        if rank == 0:
            if args.flush_every_step:
                scheme.flush(30)
            now = status_of(scheme)
            if now != seen:
                emit(
                    "WORKER_STATUS", step=step, alive=[w.alive for w in scheme.workers],
                    errors=[w.error for w in scheme.workers], delivered=[w.delivered_version for w in scheme.workers],
                )  # fmt: skip
                seen = now
            if step % 10 == 0:
                emit("PROGRESS", step=step, delivered=[w.delivered_version for w in scheme.workers])
            if step in samples:
                sample(fabric, step)
            late = scheme.workers[args.until_connected] if args.until_connected >= 0 else None
            if late is not None and late_at is None and late.delivered_version >= 0:
                late_at = step
                emit("LATE_CONNECTED", step=step)
                limit = step + 400  # 8 s at 20 ms a step: time for the test to watch, then kill another worker
            if args.until_rejoin >= 0:
                watched = scheme.workers[args.until_rejoin]
                if died_at is None and not watched.alive:
                    died_at = step
                if died_at is not None and rejoined_at is None and watched.alive and watched.delivered_version >= 0:
                    rejoined_at = step
                    emit("REJOINED", step=step, delivered=watched.delivered_version, latest=scheme.latest_version)
                if rejoined_at is not None:
                    # End once every worker is back (another may be away too), after several heartbeats of theirs.
                    settled = (settled or step) if all(w.alive for w in scheme.workers) else None
                    limit = settled + 50 if settled else args.steps
        if args.nodes > 1:  # every rank pushes the same versions and stops at rank 0's limit
            limit = int(fabric.broadcast(torch.tensor(limit)))
        if args.change_at and step == args.change_at:
            # A different-shaped Parameter replaces a synced one: the next push must refuse it.
            raw[0].weight = nn.Parameter(torch.zeros(HIDDEN + 1, 8))
            emit("CHANGED", step=step)
        time.sleep(args.step_sleep)
    if rank == 0:
        fabric.call("on_train_end")  # the final delivery, so the statuses below are the final ones
        emit(
            "FINAL", steps=step, latest=scheme.latest_version, alive=[w.alive for w in scheme.workers],
            errors=[w.error for w in scheme.workers], delivered=[w.delivered_version for w in scheme.workers],
            push_max=max(push_times, default=0.0), push_median=statistics.median(push_times) if push_times else 0.0,
            pushes=len(push_times),
        )  # fmt: skip
    emit("TRAIN_DONE", rank=rank, steps=step)


def report_threads_at_exit() -> None:
    # Registered before the strategy's exit handler, so it runs after it: the library's threads still alive then
    # are left to the interpreter's finalization, which aborts the process if one is inside a store call.
    emit("EXIT_THREADS", alive=sorted(t.name for t in threading.enumerate() if t.name.startswith("fws-")))


def main() -> None:
    args = parse_args()
    atexit.register(report_threads_at_exit)
    if args.worker_start_delay and os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(args.worker_start_delay)  # a slow import: the trainer's monitor is running long before
    strategy = WeightSyncStrategy(
        worker,
        inference_workers=args.workers,
        transport=args.transport,
        sync_timeout=args.sync_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        on_worker_failure=args.on_failure,
        shutdown_timeout=args.shutdown_timeout,
        wait_for_workers=not args.no_wait_for_workers,
    )
    fabric = Fabric(accelerator="cpu", devices=args.devices, num_nodes=args.nodes, strategy=strategy, callbacks=[WeightSyncCallback()])
    fabric.launch()
    try:
        train(fabric, args)
    except BaseException:
        emit("TRAIN_RAISED", error=traceback.format_exc()[-2000:])
        raise


if __name__ == "__main__":
    main()
