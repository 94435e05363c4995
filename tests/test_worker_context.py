"""What a worker_fn gets, in a spawn launch (everything crosses a pickle): arguments through ``functools.partial``,
``ctx.seed_everything`` (a distinct, reproducible seed per worker) and ``ctx.send`` of a plain dict of tensors.
"""

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

BASE_SEED = 7


def make_policy() -> nn.Module:
    return nn.Linear(3, 2)


def draws() -> dict:
    return {"random": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3).tolist()}


def seeded_worker(ctx, out_dir: str, base_seed: int, tag: str) -> None:
    seed = ctx.seed_everything(base_seed)
    drawn = draws()
    ctx.connect(make_policy())
    ctx.send({"draw": torch.tensor(drawn["torch"]), "meta": {"seed": torch.tensor(seed)}})  # a dict, nested too
    Path(out_dir, f"worker{ctx.worker_id}.json").write_text(json.dumps({"seed": seed, "draws": drawn, "tag": tag}))


def receive(fabric: Fabric, out_dir: str) -> None:
    policy = make_policy()
    fabric.setup(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    stream = fabric.strategy.experience()
    received = {
        b.worker_id: {"keys": sorted(".".join(k) if isinstance(k, tuple) else k for k in b.data.keys(True, True)),
                      "batch_size": list(b.data.batch_size),
                      "draw": b.data["draw"].tolist(), "seed": int(b.data["meta", "seed"])}
        for b in stream.get(2)
    }  # fmt: skip
    Path(out_dir, "rank0.json").write_text(json.dumps(received))


@pytest.mark.timeout(150)
def test_partial_worker_fn_seeds_and_dict_batches_under_spawn(tmp_path: Path, launch_fabric) -> None:
    launch_fabric(
        functools.partial(receive, out_dir=str(tmp_path)),
        functools.partial(seeded_worker, out_dir=str(tmp_path), base_seed=BASE_SEED, tag="from partial"),
        workers=2,
        start_method="spawn",
    )
    received = {int(k): v for k, v in json.loads((tmp_path / "rank0.json").read_text()).items()}
    for worker_id in (0, 1):
        worker = json.loads((tmp_path / f"worker{worker_id}.json").read_text())
        assert worker["tag"] == "from partial"
        seed = BASE_SEED + 1000 * (worker_id + 1)
        assert worker["seed"] == seed
        # Reproducible: the draws of generators seeded with that seed, in any process.
        assert worker["draws"] == {
            "random": random.Random(seed).random(),
            "numpy": float(np.random.RandomState(seed).rand()),
            "torch": torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist(),
        }
        assert received[worker_id] == {"keys": ["draw", "meta.seed"], "batch_size": [], "draw": worker["draws"]["torch"], "seed": seed}
    assert received[0]["draw"] != received[1]["draw"], "the workers' random streams differ"
