"""PPO on CartPole-v1 with TorchRL collectors as asynchronous inference workers, CleanRL style, in one file.

Each inference worker runs a TorchRL ``Collector`` (the single-process collector, formerly ``SyncDataCollector``)
on ``GymEnv("CartPole-v1")``. Its policy follows the trainer through TorchRL's own weight-sync interface:
``WeightReceiverScheme`` is a TorchRL ``WeightSyncScheme`` whose transport is fabric_weightsync's, so
``collector.receive_weights()`` between batches applies the newest weights, atomically, or nothing. The collector's
TensorDict batches go to the trainer with ``ctx.send``, tagged with the policy version that collected them; the
trainer runs PPO with TorchRL's ``ClipPPOLoss`` and ``GAE``, the importance ratio taken against the behaviour
log-probs the batches carry.

    python examples/torchrl_collector.py                     # 1 training rank, 2 workers, CPU
    python examples/torchrl_collector.py --inference-workers 4 --devices 2
    python examples/torchrl_collector.py --help

Prints ``solved ...`` (wall time from process start, env steps) when the mean episodic return over the last 20
episodes first reaches 475, then stops; writes metrics (CSV; the workers' collection speed included, logged with
``ctx.log_dict``) and a summary under ``--out-dir``. Needs TorchRL: ``pip install -e ".[torchrl]"``.
"""

import argparse
import functools
import math
import os
import time
from collections import deque
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, GymEnv, RewardSum, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext
from fabric_weightsync.torchrl_scheme import WeightReceiverScheme


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    exp_name: str = arg("torchrl_collector", "name of this run (output subfolder)")
    seed: int = arg(1, "seed of the trainer; worker i uses seed + 1000 * (i + 1)")
    env_id: str = arg("CartPole-v1", "gymnasium environment id")
    devices: int = arg(1, "training ranks (DDP processes)")
    inference_workers: int = arg(2, "inference worker processes (per node), one TorchRL collector each")
    start_method: str = arg("fork", "how processes start: fork (fast), spawn or popen (re-runs this script)")
    frames_per_batch: int = arg(256, "env steps in one collector batch (one message to the trainer)")
    total_frames: int = arg(500_000, "env-step budget (steps consumed by the trainer)")
    batches_per_update: int = arg(0, "collector batches per PPO update on each training rank (0: one per worker of the rank)")
    learning_rate: float = arg(2.5e-3, "Adam learning rate")
    anneal_lr: bool = arg(True, "anneal the learning rate linearly to 0 over total_frames")
    gamma: float = arg(0.99, "discount factor")
    gae_lambda: float = arg(0.95, "GAE lambda")
    num_minibatches: int = arg(4, "minibatches per epoch")
    update_epochs: int = arg(4, "epochs over each update's data")
    clip_coef: float = arg(0.2, "PPO surrogate clipping coefficient")
    ent_coef: float = arg(0.01, "entropy bonus coefficient")
    vf_coef: float = arg(0.5, "value loss coefficient")
    max_grad_norm: float = arg(0.5, "gradient clipping norm")
    hidden_size: int = arg(64, "hidden units of the actor and critic MLPs")
    capacity: int = arg(0, "batches a training rank buffers at most; workers block beyond (0: one per worker)")
    solve_return: float = arg(475.0, "mean episodic return that counts as solved")
    solve_window: int = arg(20, "episodes averaged for the solve check")
    stop_on_solve: bool = arg(True, "stop training once solved")
    out_dir: str = arg("runs", "where metrics and the summary go")


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Args):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=_to_bool, nargs="?", const=True, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f.metadata["help"])
    return Args(**vars(parser.parse_args()))


def _to_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "y", "on")


def process_start_time() -> float:
    """When this process started, on the ``time.time()`` clock: the wall time reported counts imports too.

    Read from ``/proc/self/stat`` (start time in clock ticks after boot); where there is none, the time of this
    module's import.
    """
    try:
        with open("/proc/self/stat") as handle:
            stat = handle.read().rpartition(")")[2].split()  # the fields after the command name
        started_after_boot = int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


# Read once at import, in the launching process: forked training processes inherit it.
PROCESS_START = process_start_time()


# ---------------------------------------------------------------------------------------------------- env and model
def make_env(env_id: str) -> EnvBase:
    """The gymnasium env through TorchRL (integer actions), with the running episode return under ``episode_reward``."""
    return TransformedEnv(GymEnv(env_id, categorical_action_encoding=True), RewardSum())


def make_actor(env: EnvBase, hidden: int) -> ProbabilisticActor:
    """Categorical policy; writes ``action`` and its ``action_log_prob`` (the behaviour log-prob PPO needs)."""
    net = MLP(in_features=env.observation_spec["observation"].shape[-1], out_features=env.action_spec.space.n,
              num_cells=[hidden, hidden], activation_class=nn.Tanh)  # fmt: skip
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
        spec=env.action_spec,
    )


def make_critic(env: EnvBase, hidden: int) -> ValueOperator:
    net = MLP(in_features=env.observation_spec["observation"].shape[-1], out_features=1, num_cells=[hidden, hidden],
              activation_class=nn.Tanh)  # fmt: skip
    return ValueOperator(net, in_keys=["observation"])


# ---------------------------------------------------------------------------------------------------- workers
def worker_main(ctx: WorkerContext, args: Args) -> None:
    """One inference worker: a TorchRL collector whose policy the trainer keeps fresh, its batches sent back."""
    torch.set_num_threads(1)
    seed = args.seed + 1000 * (ctx.worker_id + 1)
    torch.manual_seed(seed)
    env = make_env(args.env_id)
    env.set_seed(seed)
    scheme = WeightReceiverScheme(ctx)
    # Registering the scheme connects the collector's policy: it starts with the trainer's weights.
    collector = Collector(
        env, make_actor(env, args.hidden_size), frames_per_batch=args.frames_per_batch, total_frames=-1,
        weight_recv_schemes={"policy": scheme},
    )  # fmt: skip
    version, started = scheme.version, time.monotonic()
    for batch in collector:
        fps = args.frames_per_batch / (time.monotonic() - started)
        if ctx.stop_requested or not ctx.send(batch, version=version):
            break  # training is over
        ctx.log_dict({f"worker{ctx.worker_id}/collector_fps": fps})
        collector.receive_weights()  # between batches: the next one is collected with the newest weights
        version, started = scheme.version, time.monotonic()
    collector.shutdown()


# ---------------------------------------------------------------------------------------------------- trainer
def train(fabric: Fabric, args: Args) -> dict:
    torch.set_num_threads(1)
    fabric.seed_everything(args.seed + fabric.global_rank)
    env = make_env(args.env_id)  # for the specs only
    actor, critic = make_actor(env, args.hidden_size), make_critic(env, args.hidden_size)
    env.close()
    strategy: WeightSyncStrategy = fabric.strategy
    strategy.sync_module(actor)  # workers hold the actor only; the loss module set up below holds both
    # functional=False keeps the networks' own parameters, which DDP and the weight sync need.
    loss_module = ClipPPOLoss(
        actor, critic, clip_epsilon=args.clip_coef, entropy_coeff=args.ent_coef, critic_coeff=args.vf_coef,
        loss_critic_type="l2", normalize_advantage=True, functional=False,
    )  # fmt: skip
    advantage = GAE(gamma=args.gamma, lmbda=args.gae_lambda, value_network=critic, average_gae=False)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.learning_rate, eps=1e-5)
    loss_module, optimizer = fabric.setup(loss_module, optimizer)

    stream = strategy.experience(capacity=args.capacity or len(strategy.routes.workers_of(fabric.global_rank)))
    per_update = args.batches_per_update or len(stream.worker_ids)
    frames_per_update = per_update * args.frames_per_batch * fabric.world_size
    recent: deque[float] = deque(maxlen=args.solve_window)
    lags: list[int] = []
    frames, solved_at, train_start = 0, None, time.time()
    while frames < args.total_frames:
        batches = stream.get(per_update)
        lags.extend(strategy.policy_version - b.version for b in batches)
        data = torch.stack([b.data for b in batches])  # [batches, frames]: GAE runs along each batch's time axis
        frames += frames_per_update
        done = data["next", "done"].squeeze(-1)
        recent.extend(data["next", "episode_reward"].squeeze(-1)[done].tolist())
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - (frames - frames_per_update) / args.total_frames)
        with torch.no_grad():
            advantage(data)  # with the current critic: fresher than the behaviour policy's
        metrics = ppo_update(fabric, loss_module, optimizer, data.reshape(-1), args)

        mean_return = _mean_recent(fabric, recent, args.solve_window)
        metrics.update({
            "charts/episodic_return": mean_return, "charts/sps": frames / max(time.time() - train_start, 1e-9),
            "charts/version_lag": sum(lags[-per_update:]) / per_update, "charts/policy_version": strategy.policy_version,
        })  # fmt: skip
        fabric.log_dict(metrics, step=frames)
        if solved_at is None and not math.isnan(mean_return) and mean_return >= args.solve_return:
            solved_at = (frames, time.time() - PROCESS_START)
            fabric.print(
                f"solved: mean episodic return {mean_return:.1f} over the last {args.solve_window} episodes at {frames}"
                f" env steps, {solved_at[1]:.1f}s wall time from process start",
                flush=True,
            )
            if args.stop_on_solve:
                break
    result = {
        "solved": solved_at is not None, "solve_steps": solved_at[0] if solved_at else None,
        "solve_wall_s": solved_at[1] if solved_at else None, "steps": frames, "train_s": time.time() - train_start,
        "mean_version_lag": sum(lags) / max(len(lags), 1), "final_mean_return": _mean_recent(fabric, recent, args.solve_window),
        "policy_version": strategy.policy_version,
    }  # fmt: skip
    if fabric.is_global_zero:
        _finish(fabric, args, result)
    return result


def ppo_update(fabric: Fabric, loss_module: nn.Module, optimizer: torch.optim.Optimizer, data: Any, args: Args) -> dict:
    """Epochs of minibatch steps of TorchRL's clipped PPO loss on one update's frames."""
    minibatch_size = max(1, data.shape[0] // args.num_minibatches)
    for _ in range(args.update_epochs):
        for indices in torch.randperm(data.shape[0]).split(minibatch_size):
            # One training rank has nobody to average gradients with: skip DDP's all-reduce (forward inside too).
            with fabric.no_backward_sync(loss_module, enabled=fabric.world_size == 1):
                losses = loss_module(data[indices])
                loss = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
                optimizer.zero_grad()
                fabric.backward(loss)
            fabric.clip_gradients(loss_module, optimizer, max_norm=args.max_grad_norm)
            optimizer.step()  # WeightSyncCallback pushes the new actor weights to the workers
    return {
        "losses/policy_loss": losses["loss_objective"].item(), "losses/value_loss": losses["loss_critic"].item(),
        "losses/entropy": losses["entropy"].item(), "losses/approx_kl": losses["kl_approx"].item(),
        "losses/clipfrac": losses["clip_fraction"].item(),
    }  # fmt: skip


def _mean_recent(fabric: Fabric, recent: deque, window: int) -> float:
    """Mean of the last ``window`` episodes; with several training ranks, of every rank's last ``window``."""
    if fabric.world_size == 1:
        return sum(recent) / len(recent) if len(recent) >= window else float("nan")
    padded = torch.full((window,), float("nan"))
    padded[: len(recent)] = torch.tensor(list(recent), dtype=torch.float32)
    gathered = fabric.all_gather(padded).flatten()
    gathered = gathered[~gathered.isnan()]
    # Every rank sees the same gathered values, so all ranks decide to stop at the same update.
    return float(gathered.mean()) if gathered.numel() >= window else float("nan")


def _finish(fabric: Fabric, args: Args, result: dict) -> None:
    """A one-paragraph summary next to the metrics."""
    fabric.call("on_train_end")  # the workers' metrics logged so far reach the logger before it is finalized
    fabric.logger.finalize("success")
    if result["solved"]:
        outcome = (
            f"solved it (mean return >= {args.solve_return:.0f} over {args.solve_window} episodes) after"
            f" {result['solve_steps']:,} env steps, {result['solve_wall_s']:.1f}s of wall time from process start"
        )
    else:
        outcome = (
            f"did not reach a mean return of {args.solve_return:.0f} within {result['steps']:,} env steps"
            f" (last mean {result['final_mean_return']:.1f})"
        )
    summary = (
        f"PPO (TorchRL ClipPPOLoss + GAE) on {args.env_id} with {fabric.world_size} training rank(s) and"
        f" {args.inference_workers * fabric.strategy.num_nodes} TorchRL collector worker(s) {outcome}. It consumed"
        f" {result['steps']:,} env steps in {result['train_s']:.1f}s of training over {result['policy_version']}"
        f" optimizer steps, with a mean policy version lag of {result['mean_version_lag']:.1f}."
    )
    run_dir = Path(fabric.logger.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.txt").write_text(summary + "\n")
    print(summary, flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    strategy = WeightSyncStrategy(
        functools.partial(worker_main, args=args), inference_workers=args.inference_workers, start_method=args.start_method
    )
    logger = CSVLogger(root_dir=args.out_dir, name=args.exp_name, flush_logs_every_n_steps=20)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy, callbacks=[WeightSyncCallback()], loggers=logger)
    if args.start_method == "popen":
        fabric.launch()  # workers never return from here
        train(fabric, args)
    else:
        fabric.launch(train, args)


if __name__ == "__main__":
    main()
