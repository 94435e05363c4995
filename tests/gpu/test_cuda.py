"""CUDA path: a GPU trainer and GPU policies on the workers. Skipped where there is no GPU (CI)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("cuda_sync.py")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["auto", "gloo"])
def test_gpu_trainer_and_gpu_workers_end_equal(transport: str) -> None:
    out = run("--transport", transport, "--steps", "30")
    trainer = re.search(r"TRAINER device=cuda:0 steps=30 digest=(\w+)", out)
    workers = re.findall(r"WORKER (\d) device=cuda:\d version=(\d+) digest=(\w+)", out)
    assert trainer and len(workers) == 2, out
    assert all(version == "30" and dig == trainer.group(1) for _, version, dig in workers), out


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="nccl needs one GPU per process (1 trainer + 2 workers)")
def test_nccl_transport_between_distinct_gpus() -> None:
    out = run("--transport", "nccl", "--steps", "30")
    trainer = re.search(r"TRAINER device=cuda:0 steps=30 digest=(\w+)", out)
    workers = re.findall(r"WORKER (\d) device=cuda:\d version=(\d+) digest=(\w+)", out)
    assert trainer and len(workers) == 2 and all(d == trainer.group(1) for _, _, d in workers), out
