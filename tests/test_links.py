"""Rank 0's link threads over gloo: asleep between pushes (no polling), woken by the push that needs them."""

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import SCRIPTS_DIR, clean_env
from fabric_weightsync import WeightSyncScheme
from fabric_weightsync.control import ControlPlane

WORKER = SCRIPTS_DIR / "polling_worker.py"


def start_workers(count: int, boot_port: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, str(WORKER), str(i), str(count), str(boot_port)], env=clean_env())
        for i in range(count)
    ]


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
    bootstrap = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    procs = start_workers(workers, bootstrap.port)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    control = ControlPlane.serve("127.0.0.1", bootstrap.port, 30.0)
    # These workers beat no heartbeat (no run_worker around them): the monitor must not evict them meanwhile.
    scheme = WeightSyncScheme(control, workers, transport="gloo", heartbeat_timeout=600)
    try:
        scheme.start(model)
        assert scheme.flush(60), "the workers never connected"
        links = [link.native_id for link in scheme._links]
        before = [voluntary_switches(tid) for tid in links]
        time.sleep(0.5)
        after = [voluntary_switches(tid) for tid in links]
        # A link that looked for new versions every 0.5 ms would have slept about 1000 times.
        assert all(b - a <= 5 for a, b in zip(before, after)), f"idle links kept waking up: {before} -> {after}"

        for version in range(1, 21):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            scheme.push(version)
            assert scheme.flush(10), f"version {version} was not delivered: {[w.delivered_version for w in scheme.workers]}"
        assert [w.delivered_version for w in scheme.workers] == [20] * workers
    finally:
        control.request_stop()
        scheme.close()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
