"""User mistakes and unlucky timings: each is refused where it was made, with an error that names it, and none
corrupts a policy or changes a run's exit code. Real processes and real groups throughout.

The races run beside CPU-bound processes (``cpu_hogs``): on an idle machine they hide.
"""

import functools
import gc
import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import nn

from conftest import SCRIPTS_DIR, Processes, clean_env, free_port, slurm_envs
from fabric_weightsync import DistributedTransport, SchemaMismatchError, WeightSyncCallback, WeightSyncStrategy
from fabric_weightsync.protocol import ENDED_KEY

HOG = "while True: pass"


@pytest.fixture
def cpu_hogs():
    """Two busy-looping processes for the duration of the test: races that an idle machine hides then show."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait(10)


@pytest.fixture
def fresh_master_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def fork_launch(train_fn: Callable, worker_fn: Callable, **strategy_kwargs: Any) -> Any:
    """One fork launch: 1 training rank, 1 worker; returns training rank 0's result."""
    gc.collect()  # children inherit this process's garbage; a stale store collected there would abort them
    strategy = WeightSyncStrategy(worker_fn, inference_workers=1, start_method="fork", shutdown_timeout=30, **strategy_kwargs)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, callbacks=[WeightSyncCallback()])
    return fabric.launch(train_fn)


def make_policy() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))


def weights_of(module: nn.Module) -> dict[str, list]:
    return {name: tensor.detach().flatten().tolist() for name, tensor in module.state_dict().items()}


# ---------------------------------------------------------------------- two threads polling over gloo
def two_polling_threads(ctx, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1000)  # unlike the trainer's: equality can only come from the transfers
    policy = make_policy()
    receiver = ctx.connect(policy)
    errors, stop = [], threading.Event()

    def poll_forever(wait: bool) -> None:
        try:
            while not stop.is_set():
                receiver.wait_for_update(0.05) if wait else receiver.poll()
        except BaseException as err:  # noqa: BLE001 - recorded for the test
            errors.append(repr(err))

    threads = [threading.Thread(target=poll_forever, args=(wait,)) for wait in (False, True)]
    for thread in threads:
        thread.start()
    while not ctx.stop_requested:
        receiver.poll()
    stop.set()
    for thread in threads:
        thread.join(30)
    Path(out, "worker.json").write_text(json.dumps({"version": receiver.version, "weights": weights_of(policy), "errors": errors}))


def train_steps(fabric: Fabric, out: str, steps: int) -> None:
    torch.manual_seed(0)
    module = make_policy()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.01))
    for _ in range(steps):
        fabric.backward(model(torch.randn(16, 64)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    Path(out, "trainer.json").write_text(json.dumps({"steps": steps, "weights": weights_of(model)}))


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("fresh_master_port", "cpu_hogs")
def test_threads_polling_one_receiver_over_gloo_never_corrupt_its_policy(tmp_path: Path) -> None:
    """A rollout thread and two more polling one receiver over gloo: one receives at a time, every version is
    taken whole, and the worker ends on the trainer's last version with exactly its weights."""
    fork_launch(
        functools.partial(train_steps, out=str(tmp_path), steps=200),
        functools.partial(two_polling_threads, out=str(tmp_path)),
        transport="gloo",
    )
    trainer = json.loads((tmp_path / "trainer.json").read_text())
    worker = json.loads((tmp_path / "worker.json").read_text())
    assert worker["errors"] == []
    assert worker["version"] == trainer["steps"], "the final delivery reached the worker"
    assert worker["weights"] == trainer["weights"], "the policy holds the trainer's last weights, byte for byte"


# ---------------------------------------------------------------------- a refused policy, under load
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("cpu_hogs")
def test_a_refused_policy_is_always_told_so_never_a_json_error(store_client) -> None:
    """The trainer refuses a worker's policy and drops the connection at once: the worker, reading the verdict
    meanwhile, must get the SchemaMismatchError every time, whatever the interleaving."""

    def transport(rank: int, width: int) -> DistributedTransport:
        return DistributedTransport(weights_buffer=nn.Linear(4, width), store=store_client(30), rank=rank, timeout=30)

    outcomes = []
    for rank in range(1, 61):
        sender, receiver = transport(rank, 3), transport(rank, 5)

        def refuse(sender: DistributedTransport = sender) -> None:
            try:
                sender.setup_connection_and_weights_on_sender()
            except SchemaMismatchError:
                pass
            finally:
                sender.close()

        thread = threading.Thread(target=refuse)
        thread.start()
        try:
            receiver.setup_connection_and_weights_on_receiver(worker_idx=rank - 1, model=nn.Linear(4, 5))
            outcomes.append("connected")
        except SchemaMismatchError:
            outcomes.append("refused")
        except Exception as err:  # noqa: BLE001 - recorded for the assertion
            outcomes.append(repr(err))
        thread.join(30)
        receiver.close()
    assert outcomes == ["refused"] * 60, [outcome for outcome in outcomes if outcome != "refused"]


# ---------------------------------------------------------------------- a parameter registered after setup
def idle_worker(ctx) -> None:
    receiver = ctx.connect(make_policy())
    while not ctx.stop_requested:
        receiver.wait_for_update(0.1)


def register_after_setup(fabric: Fabric) -> None:
    module = make_policy()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.01))
    for step in range(4):
        if step == 2:
            module.register_parameter("temperature", nn.Parameter(torch.ones(1)))  # workers were never told
        fabric.backward(model(torch.randn(4, 64)).pow(2).mean())
        optimizer.step()


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_master_port")
def test_a_parameter_registered_after_setup_is_refused_at_the_next_push() -> None:
    with pytest.raises(Exception, match=r"changed its parameters after the workers connected: key 'temperature' only on the trainer now"):
        fork_launch(register_after_setup, idle_worker)


# ---------------------------------------------------------------------- bad arguments, refused before any process
def local_worker_fn():
    return lambda ctx: None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"worker_fn": 42}, "worker_fn must be a function"),
        ({"inference_workers": 2.5}, "inference_workers must be an integer of at least 1, got 2.5"),
        ({"inference_workers": 0}, "inference_workers must be an integer of at least 1, got 0"),
        ({"transport": "shmm"}, "transport must be one of 'auto', 'shm', 'gloo', 'nccl', got 'shmm'"),
        ({"on_worker_failure": "ignore"}, "on_worker_failure must be one of 'raise', 'continue', got 'ignore'"),
        ({"start_method": "thread"}, "start_method must be one of"),
        ({"worker_fn": local_worker_fn(), "start_method": "spawn"}, "must be importable|define it at module level"),
    ],
)
def test_bad_arguments_are_refused_by_the_constructor_naming_them(kwargs: dict, message: str) -> None:
    kwargs = {"worker_fn": idle_worker, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        WeightSyncStrategy(**kwargs)


def test_a_local_worker_fn_is_fine_with_fork() -> None:
    WeightSyncStrategy(local_worker_fn(), start_method="fork")


# ---------------------------------------------------------------------- workers that come after training ended
@pytest.mark.timeout(240)
def test_workers_that_come_after_training_ended_exit_at_once_with_code_0(tmp_path: Path) -> None:
    port = free_port()
    envs = slurm_envs(clean_env(MASTER_PORT=port), tasks_per_node=3)
    cmd = [sys.executable, str(SCRIPTS_DIR / "late_worker_train.py")]
    procs = Processes(tmp_path)
    try:
        trainer, early = procs.start("rank0", cmd, envs[0]), procs.start("rank1", cmd, envs[1])
        rendezvous = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=60))
        rendezvous.wait([ENDED_KEY], timedelta(seconds=60))  # rank 0 says training is over
        ended = time.time()
        late = procs.start("rank2", cmd, envs[2])  # a worker process that starts only now
        assert procs.wait(150), procs.describe()
    finally:
        procs.close()
    assert [p.returncode for p in (trainer, early, late)] == [0, 0, 0], procs.describe()
    assert "training ended before worker 0 could connect" in early.stderr()
    assert "training had already ended when this worker started" in late.stderr()
    # Exiting without a wait is the feature: they used to wait out the 60 s sync timeout. The late one's bound
    # includes starting a Python process with torch and Lightning on a possibly loaded machine.
    assert early.exit_time - ended < 20 and late.exit_time - ended < 45, procs.describe()
