"""WeightSyncCallback: which optimizer triggers pushes, every_n_steps, and the final version at the end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env

SCRIPT = Path(__file__).parent / "scripts" / "callback_train.py"


def run(*args: str) -> tuple[dict, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=clean_env(), capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    trainer = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("TRAINER ")]
    workers = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("WORKER ")]
    assert len(trainer) == 1 and len(workers) == 2, proc.stdout[-3000:]
    return trainer[0], workers


@pytest.mark.timeout(180)
@pytest.mark.parametrize("train_end_call", [False, True], ids=["automatic-final-push", "on_train_end"])
def test_every_n_steps_with_two_optimizers_ends_on_the_last_version(train_end_call: bool) -> None:
    trainer, workers = run("--steps", "10", "--every", "3", *(["--train-end-call"] if train_end_call else []))
    assert trainer["steps"] == 10, "one step per training step: only the first optimizer to step counts"
    for worker in workers:
        applied = worker["applied"]
        assert applied == sorted(applied), f"versions only grow: {applied}"
        assert applied[-1] == 10, f"the last version reaches every worker at the end: {applied}"
        assert set(applied[1:-1]) <= {3, 6, 9}, f"pushes happen every 3rd step only: {applied}"
        assert worker["weights"] == trainer["weights"], "the worker ends with the trainer's final weights, exactly"


@pytest.mark.timeout(180)
def test_explicit_trigger_optimizer_counts_its_own_steps() -> None:
    trainer, workers = run("--steps", "6", "--every", "1", "--explicit-trigger", "critic")
    assert trainer["steps"] == 6
    for worker in workers:
        assert worker["applied"][-1] == 6 and worker["weights"] == trainer["weights"]
