"""Shared-memory staging files: they live in RAM, so none may outlive the runs that made them."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from fabric_weightsync import WeightSchema
from fabric_weightsync.channels.board import create_shared_buffer, new_run_id, shm_dir, sweep_stale_files


@pytest.mark.timeout(60)
def test_staging_files_of_a_killed_trainer_are_swept_by_the_next_run() -> None:
    """/dev/shm is RAM: files left by a trainer that died (SIGKILL, OOM) are removed when another run starts."""
    code = "; ".join(
        [
            "import sys, torch",
            "from fabric_weightsync import WeightSchema",
            "from fabric_weightsync.channels.board import create_shared_buffer, new_run_id",
            "wire = create_shared_buffer(WeightSchema.of(torch.nn.Linear(4, 4)), new_run_id(), 0)",
            "print(wire.path, flush=True)",
            "sys.stdin.read()",
        ]
    )
    trainer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    path = trainer.stdout.readline().strip()
    assert os.path.exists(path) and path.startswith(shm_dir())
    sweep_stale_files.cache_clear()
    sweep_stale_files()
    assert os.path.exists(path), "the file of a live trainer must be kept"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    assert os.path.exists(path), "a SIGKILLed trainer cannot clean up after itself"
    sweep_stale_files.cache_clear()
    mine = create_shared_buffer(WeightSchema.of(torch.nn.Linear(2, 2)), new_run_id(), 0)
    assert not os.path.exists(path), "the next run sweeps the dead trainer's file"
    os.unlink(mine.path)
