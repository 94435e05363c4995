"""Rank 0's link threads over gloo, with real worker processes: asleep between pushes (no polling), woken by the
push that needs them; and workers that arm their receive, which still apply only the newest version after a
rollout."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from conftest import SCRIPTS_DIR, clean_env, wait_until
from fabric_weightsync import WeightSyncScheme
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.protocol import LATEST_KEY

WORKER = SCRIPTS_DIR / "polling_worker.py"


def start_workers(count: int, boot_port: int, *rollout: str) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, str(WORKER), str(i), str(count), str(boot_port), *rollout], env=clean_env())
        for i in range(count)
    ]


@contextlib.contextmanager
def serving(
    workers: int, *rollout: str, transport: str = "gloo"
) -> Iterator[tuple[ControlPlane, WeightSyncScheme, torch.nn.Module, list[subprocess.Popen]]]:
    """Rank 0's scheme (over gloo by default) with ``workers`` polling_worker.py processes connected; stopped on the
    way out."""
    bootstrap = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    procs = start_workers(workers, bootstrap.port, *rollout)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    control = ControlPlane.serve("127.0.0.1", bootstrap.port, 30.0)
    # These workers beat no heartbeat (no run_worker around them): the monitor must not evict them meanwhile.
    scheme = WeightSyncScheme(control, workers, transport=transport, heartbeat_timeout=600)
    try:
        scheme.start(model)
        assert scheme.flush(60), "the workers never connected"
        yield control, scheme, model, procs
    finally:
        control.request_stop()
        scheme.close()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def voluntary_switches(native_id: int) -> int:
    """How many times the thread went to sleep so far (each wake-up of a polling loop counts one)."""
    for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


@pytest.mark.timeout(90)
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads per-thread counters from /proc")
def test_idle_links_sleep_until_a_push_wakes_them() -> None:
    workers = 2
    with serving(workers) as (control, scheme, model, procs):
        links = [link.native_id for link in scheme.links.threads]
        # Counted from the moment every link waits for a newer version, not while one still finishes a delivery.
        wait_until(lambda: scheme.links.idle_group_links == workers, 10, "every link waits for a newer version")
        before = [voluntary_switches(tid) for tid in links]
        time.sleep(0.5)  # the window watched: nothing happens in it, on purpose
        after = [voluntary_switches(tid) for tid in links]
        # A link that looked for new versions every 0.5 ms would have slept about 1000 times; a waiting one, never
        # (a loaded machine only delays its wake-ups, it does not add any).
        assert all(b - a <= 5 for a, b in zip(before, after)), f"idle links kept waking up: {before} -> {after}"

        for version in range(1, 21):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            scheme.push(version)
            assert scheme.flush(10), f"version {version} was not delivered: {[w.delivered_version for w in scheme.workers]}"
        assert [w.delivered_version for w in scheme.workers] == [20] * workers


@pytest.mark.timeout(90)
def test_busy_armed_worker_applies_the_newest_version_not_the_one_that_landed(tmp_path) -> None:
    """A gloo worker arms its receive after each update, so the next one lands during its rollout; versions
    pushed after that one supersede it, and the poll after the rollout must apply the newest, not what landed."""
    record = tmp_path / "polls.json"
    # 150 ms rollouts: far longer than fetching the newest 0.3 MB takes even on a loaded machine, so the worker
    # must ask after every one of them.
    with serving(1, "0.15", str(record)) as (control, scheme, model, procs):
        version = 0
        delivered = {scheme.workers[0].delivered_version}
        deadline = time.monotonic() + 60
        # Pushes until the worker took 10 of them (one per rollout), however long a loaded machine makes that.
        while len(delivered) < 11:
            assert time.monotonic() < deadline, f"the worker took only {len(delivered) - 1} updates in 60 s"
            version += 1
            scheme.push(version)
            time.sleep(0.002)  # a trainer step: a push every 2 ms, about 75 per rollout
            delivered.add(scheme.workers[0].delivered_version)
        assert scheme.flush(10) and scheme.workers[0].delivered_version == version
    polls = json.loads(record.read_text())
    applied = [poll for poll in polls if poll["applied"]]
    assert len(applied) >= 8, polls
    stale = [poll for poll in applied if poll["version"] < poll["staged_before"]]
    assert not stale, f"polls applied a version older than the newest staged before they began: {stale}"
    versions = [poll["version"] for poll in polls]
    assert versions == sorted(versions) and versions[-1] == version


@pytest.mark.timeout(90)
def test_newest_version_reaches_the_store_only_while_a_worker_holds_an_unanswered_update() -> None:
    """The store write of the newest version (for a busy worker's "was what landed superseded?") is skipped while
    every gloo link waits for a newer version, where it only slowed the links' sends; a worker that was stopped
    with an update landed still finds the newer version there, drops what landed and applies the newest."""
    with serving(1) as (control, scheme, model, procs):
        try:
            for version in range(1, 6):
                wait_until(lambda: scheme.links.idle_group_links == 1, 10, "the link waits for a newer version")
                scheme.push(version)
                assert scheme.flush(10), f"version {version} was not delivered"
            wait_until(lambda: scheme.links.idle_group_links == 1, 10, "the link waits for a newer version")
            assert control.store.read(LATEST_KEY) is None, "pushes to a worker whose link was idle wrote the newest version"

            os.kill(procs[0].pid, signal.SIGSTOP)  # it cannot poll: version 6 lands and stays unanswered
            scheme.push(6)
            wait_until(lambda: scheme.links.sent_version(0) == 6, 10, "the link sent version 6")
            scheme.push(7)
            wait_until(lambda: control.store.read(LATEST_KEY) == b"7", 10, "version 7 is in the store")
            os.kill(procs[0].pid, signal.SIGCONT)
            assert scheme.flush(20) and scheme.workers[0].delivered_version == 7
        finally:
            os.kill(procs[0].pid, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_workers_that_serve_themselves_need_no_thread() -> None:
    """Shared-memory workers take updates off the board: once they are connected no link thread is left for them,
    and pushes still reach them."""
    with serving(3, transport="shm") as (control, scheme, model, procs):
        wait_until(lambda: not any(link.is_alive() for link in scheme.links.threads), 10, "every link thread ended")
        for version in (1, 2, 3):
            scheme.push(version)
        wait_until(lambda: all(w.delivered_version == 3 for w in scheme.workers), 30, "every worker applied version 3")
