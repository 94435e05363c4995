"""PPO on CartPole-v1 in lockstep: on-policy, every rollout collected with the policy of the update before it.

Each worker collects a rollout with policy version v, sends it and waits for version v + 1; the trainer takes one
rollout per worker, runs its update epochs and pushes once. Two lines make a worker loop lockstep:
``fabric.strategy.push()`` after the update (``WeightSyncCallback(every_n_steps=None)``: no push per optimizer
step) and ``receiver.wait_for_version(version + 1, timeout)`` after ``ctx.send``. The agent, the rollout, the PPO
update and the knobs are examples/ppo_cartpole.py's, the asynchronous version of this loop.

    python examples/lockstep_ppo.py                          # 1 training rank, 2 workers, CPU
    python examples/lockstep_ppo.py --inference-workers 4 --num-envs 4
    python examples/lockstep_ppo.py --help

Prints ``solved ...`` (wall time from process start, env steps) when the mean episodic return over the last 20
episodes first reaches 475, then stops; writes metrics, a learning-curve PNG, a summary and ``result.json`` (with
the count of rollouts collected by any other policy than the one before their update: 0 in lockstep) under
``--out-dir``.
"""

import functools
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext
from ppo_cartpole import (  # the PPO pieces of the asynchronous example, next to this file
    PROCESS_START,
    Agent,
    PPOArgs,
    RolloutCollector,
    arg,
    env_spaces,
    episode_returns,
    finish,
    make_logger,
    mean_recent,
    merge_rollouts,
    parse_args,
    ppo_update,
    progress_bar,
    say,
    solve_outcome,
)


@dataclass
class Args(PPOArgs):
    exp_name: str = arg("lockstep_ppo", "name of this run (output subfolder)")
    update_timeout: float = arg(600.0, "seconds a worker waits for the next version (one update of the trainer)")


def worker_main(ctx: WorkerContext, args: Args) -> None:
    """One inference worker: collect with version v, send, wait for version v + 1."""
    torch.set_num_threads(1)
    seed = ctx.seed_everything(args.seed)
    agent = Agent(*env_spaces(args.env_id), args.hidden_size)
    receiver = ctx.connect(agent)
    collector = RolloutCollector(args, agent, seed)
    while not ctx.stop_requested:
        version = receiver.version
        if not ctx.send(collector.collect(), version=version):
            break  # training is over
        if not receiver.wait_for_version(version + 1, timeout=args.update_timeout):
            break  # training ended after this rollout's update
    collector.close()


def train(fabric: Fabric, args: Args) -> dict:
    torch.set_num_threads(1)
    fabric.seed_everything(args.seed + fabric.global_rank)
    agent = Agent(*env_spaces(args.env_id), args.hidden_size)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    agent, optimizer = fabric.setup(agent, optimizer)  # returns once every worker holds the initial policy
    strategy: WeightSyncStrategy = fabric.strategy
    stream = strategy.experience()
    per_update = len(stream.worker_ids)  # one rollout from each of this rank's workers
    steps_per_update = per_update * args.num_steps * args.num_envs * fabric.world_size

    progress = progress_bar(fabric, args)
    recent: deque[float] = deque(maxlen=args.solve_window)
    curve: list[tuple[int, float]] = []
    rollouts, off_policy, updates = 0, 0, 0
    global_step, solved_at, train_start = 0, None, time.time()
    while global_step < args.total_timesteps:
        batches = stream.get(per_update)
        rollouts += len(batches)
        off_policy += sum(b.version != strategy.policy_version for b in batches)  # the version pushed last
        data = merge_rollouts(batches)
        global_step += steps_per_update
        for value in episode_returns(data):
            recent.append(value)
            curve.append((global_step, value))

        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - (global_step - steps_per_update) / args.total_timesteps)
        metrics = ppo_update(fabric, agent, optimizer, data, args)
        strategy.push()  # the one push of the update: the workers wait for it
        updates += 1

        mean_return = mean_recent(fabric, recent, args.solve_window)
        sps = global_step / max(time.time() - train_start, 1e-9)
        metrics.update({"charts/episodic_return": mean_return, "charts/sps": sps, "charts/policy_version": float(strategy.policy_version)})
        fabric.log_dict(metrics, step=global_step)
        if progress is not None:
            progress.update(steps_per_update)
            progress.set_postfix(ret=f"{mean_return:.0f}", sps=f"{sps:.0f}", refresh=False)
        if solved_at is None and not math.isnan(mean_return) and mean_return >= args.solve_return:
            solved_at = (global_step, time.time() - PROCESS_START)
            if fabric.is_global_zero:
                say(progress, f"solved: mean episodic return {mean_return:.1f} over the last {args.solve_window} episodes"
                    f" at {global_step} env steps, {solved_at[1]:.1f}s wall time from process start")  # fmt: skip
            if args.stop_on_solve:
                break
    if progress is not None:
        progress.close()

    result = {
        "solved": solved_at is not None,
        "solve_steps": solved_at[0] if solved_at else None,
        "solve_wall_s": solved_at[1] if solved_at else None,
        "steps": global_step,
        "train_s": time.time() - train_start,
        "wall_s": time.time() - PROCESS_START,
        "sps": global_step / max(time.time() - train_start, 1e-9),
        "updates": updates,
        "rollouts": rollouts,
        "off_policy_rollouts": off_policy,
        "final_mean_return": mean_recent(fabric, recent, args.solve_window),
        "episodes": len(curve),
        "policy_version": strategy.policy_version,
    }
    if fabric.is_global_zero:
        workers = args.inference_workers * strategy.num_nodes
        summary = (
            f"Lockstep PPO on {args.env_id} with {fabric.world_size} training rank(s) and {workers} inference worker(s)"
            f" x {args.num_envs} envs {solve_outcome(args, result)}. It consumed {global_step:,} env steps in"
            f" {result['train_s']:.1f}s of training ({result['sps']:,.0f} steps/s) over {updates} updates;"
            f" {off_policy} of the {rollouts} rollouts on training rank 0 were collected by another policy than the one"
            " pushed after the update before."
        )
        finish(fabric, args, result, summary, curve)
    return result


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(1)
    strategy = WeightSyncStrategy(
        functools.partial(worker_main, args=args),
        inference_workers=args.inference_workers,
        start_method=args.start_method,
        transport=args.transport,
    )
    fabric = Fabric(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        callbacks=[WeightSyncCallback(every_n_steps=None)],  # push only on strategy.push()
        loggers=make_logger(args),
    )
    if args.start_method == "popen":
        fabric.launch()  # workers never return from here
        train(fabric, args)
    else:
        fabric.launch(train, args)


if __name__ == "__main__":
    main()
