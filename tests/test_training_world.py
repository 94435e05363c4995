"""The training ranks' world ignores the workers: world size, DDP gradient averaging, barrier, all_reduce and the
DistributedSampler all behave as in plain DDP over ``devices * num_nodes`` ranks while the workers are alive.

The runs are the healthy launches of every mode (shared with test_launch_modes.py, each one runs once per session).
In each, every training rank computes a gradient of ``rank + 1``: averaged over the training ranks only it is
``(W + 1) / 2``; had the workers joined the average, it would be smaller.
"""

import pytest

from conftest import LAUNCHES

MODES = list(LAUNCHES)


def training_world(launches, mode):
    run = launches.get(mode)
    assert run.returncode == 0, run.describe()
    launch = LAUNCHES[mode]
    return run, launch.devices * launch.nodes, launch


def by_rank(records: list[dict], world: int, run) -> dict:
    ranks = sorted(r["rank"] for r in records)
    assert ranks == list(range(world)), f"expected one record per training rank, got ranks {ranks}\n{run.describe()}"
    return {r["rank"]: r for r in records}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", MODES)
def test_world_size_counts_training_ranks_only(launches, mode):
    run, world, launch = training_world(launches, mode)
    for rank, start in by_rank(run.records("TRAIN_START"), world, run).items():
        assert start["world_size"] == world == launch.devices * launch.nodes
        assert start["default_group_size"] == world, "workers must not be members of the default process group"
        assert start["node_rank"] == rank // launch.devices
        assert start["local_rank"] == rank % launch.devices


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_averaged_over_training_ranks_only(launches, mode):
    run, world, launch = training_world(launches, mode)
    mean_over_trainers = sum(rank + 1 for rank in range(world)) / world
    mean_over_everyone = sum(rank + 1 for rank in range(world)) / (world + launch.workers * launch.nodes)
    for rank, record in by_rank(run.records("GRAD"), world, run).items():
        assert record["grad"] == [mean_over_trainers] * 3, (
            f"rank {rank}: grad {record['grad']}, expected {mean_over_trainers} "
            f"(an average that counted the workers would give {mean_over_everyone})"
        )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", MODES)
def test_barrier_and_all_reduce_with_workers_alive(launches, mode):
    run, world, launch = training_world(launches, mode)
    (connected,) = run.records("CONNECTED")
    # Rank 0 waited for every worker to connect before the collectives: they ran with the workers up.
    assert connected["alive"] == [True] * (launch.workers * launch.nodes)
    assert all(version >= 0 for version in connected["delivered"]), connected
    by_rank(run.records("BARRIER"), world, run)
    for rank, record in by_rank(run.records("ALL_REDUCE"), world, run).items():
        assert record["sum"] == world * (world + 1) / 2, f"rank {rank}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", MODES)
def test_distributed_sampler_splits_over_training_ranks(launches, mode):
    run, world, _ = training_world(launches, mode)
    seen = []
    for rank, record in by_rank(run.records("SAMPLER"), world, run).items():
        assert record["num_replicas"] == world and record["sampler_rank"] == rank
        assert len(record["indices"]) == 8 // world
        seen += record["indices"]
    assert sorted(seen) == list(range(8)), "each sample exactly once over the training ranks"
