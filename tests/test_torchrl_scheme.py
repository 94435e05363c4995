"""``WeightReceiverScheme``: TorchRL's weight-sync interface with this library's transport, in a real fork launch.

A worker runs a TorchRL ``Collector`` whose policy is registered through ``weight_recv_schemes``; after each
``collector.receive_weights()`` it records the version and the policy's weights. Every recorded version must hold
exactly the trainer's weights after that many optimizer steps, and the last one the final weights.
"""

import functools
import gc
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from conftest import free_port
from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy
from fabric_weightsync.torchrl_scheme import WeightReceiverScheme
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.envs import GymEnv

STEPS = 6


def make_policy() -> TensorDictModule:
    return TensorDictModule(nn.Linear(3, 1), in_keys=["observation"], out_keys=["action"])


def snapshot(module: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def collecting_worker(ctx, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(100 + ctx.worker_id)  # unlike the trainer's: equal weights can only come from a transfer
    env = GymEnv("Pendulum-v1")  # 3 observations, 1 continuous action: what a linear policy produces
    scheme = WeightReceiverScheme(ctx)
    collector = Collector(env, make_policy(), frames_per_batch=8, total_frames=-1, weight_recv_schemes={"policy": scheme})
    policy = scheme.model
    params = list(policy.parameters())
    seen = {scheme.version: snapshot(policy)}
    for _ in collector:
        collector.receive_weights()
        if scheme.version not in seen:
            seen[scheme.version] = snapshot(policy)
        if ctx.stop_requested:
            break
    collector.receive_weights()
    seen[scheme.version] = snapshot(policy)
    in_place = all(a is b for a, b in zip(params, policy.parameters()))
    try:
        scheme.create_transport()
        refused = None
    except RuntimeError as err:
        refused = str(err)
    torch.save({"seen": seen, "in_place": in_place, "refused": refused}, Path(out_dir, "worker.pt"))
    collector.shutdown()


def train(fabric: Fabric, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = make_policy()
    model, optimizer = fabric.setup(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    history = {0: snapshot(policy)}
    for step in range(1, STEPS + 1):
        fabric.backward(model(observation=torch.randn(8, 3)).pow(2).sum())
        optimizer.step()
        optimizer.zero_grad()
        history[step] = snapshot(policy)
        time.sleep(0.1)  # so the worker sees several versions
    torch.save(history, Path(out_dir, "trainer.pt"))


@pytest.mark.timeout(90)
def test_collector_policy_follows_the_trainer_through_the_scheme(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    gc.collect()
    worker = functools.partial(collecting_worker, out_dir=str(tmp_path))
    strategy = WeightSyncStrategy(worker, inference_workers=1, start_method="fork", shutdown_timeout=20)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, callbacks=[WeightSyncCallback()])
    fabric.launch(functools.partial(train, out_dir=str(tmp_path)))
    history = torch.load(tmp_path / "trainer.pt")
    record = torch.load(tmp_path / "worker.pt")
    seen = record["seen"]
    assert max(seen) == STEPS, f"the collector's policy should end on version {STEPS}, saw {sorted(seen)}"
    for version, weights in seen.items():
        for name, tensor in history[version].items():
            assert torch.equal(weights[name], tensor), f"version {version}: {name} differs from the trainer's"
    assert record["in_place"], "updates land in the collector policy's own parameters"
    assert record["refused"] and "only receives" in record["refused"]
