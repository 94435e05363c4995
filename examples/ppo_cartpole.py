"""PPO on CartPole-v1 with asynchronous inference workers, CleanRL style, in one file.

Inference workers collect rollouts with the newest policy they have and send them to the trainer, which runs
PPO updates and pushes its weights back after every optimizer step (``WeightSyncCallback``). Rollouts are
tagged with the policy version that collected them; the PPO importance ratio is taken against the
*behaviour* log-probs, which is what keeps a few versions of lag harmless.

    python examples/ppo_cartpole.py                          # 1 training rank, 2 workers, CPU
    python examples/ppo_cartpole.py --inference-workers 4 --env-latency-ms 1 --total-timesteps 200000
    python examples/ppo_cartpole.py --help

Prints ``solved ...`` (wall time from process start, env steps) when the mean episodic return over the last 20
episodes first reaches 475, then stops; writes metrics (CSV, or TensorBoard if installed), a learning-curve
PNG and a summary under ``--out-dir``.
"""

import argparse
import functools
import json
import math
import os
import time
from collections import deque
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from lightning.fabric import Fabric
from tensordict import TensorDict
from torch import nn

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy, WorkerContext


def arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class PPOArgs:
    """The knobs of PPO on workers, asynchronous or not (examples/lockstep_ppo.py shares them)."""

    exp_name: str = arg("ppo_cartpole", "name of this run (output subfolder)")
    seed: int = arg(1, "seed of the trainer; worker i uses seed + 1000 * (i + 1)")
    env_id: str = arg("CartPole-v1", "gymnasium environment id")
    devices: int = arg(1, "training ranks (DDP processes)")
    inference_workers: int = arg(2, "inference worker processes (per node)")
    start_method: str = arg("fork", "how processes start: fork (fast), spawn or popen (re-runs this script)")
    transport: str = arg("auto", "weight transport: auto (shared memory on this host, gloo to others), gloo, shm or nccl")
    num_envs: int = arg(8, "environments per worker (gymnasium SyncVectorEnv)")
    num_steps: int = arg(32, "steps per environment in one rollout (one batch sent to the trainer)")
    total_timesteps: int = arg(500_000, "env-step budget (steps consumed by the trainer)")
    env_latency_ms: float = arg(0.0, "extra sleep per env step, in ms, to emulate a slow simulator")
    learning_rate: float = arg(2.5e-3, "Adam learning rate")
    anneal_lr: bool = arg(True, "anneal the learning rate linearly to 0 over total_timesteps")
    gamma: float = arg(0.99, "discount factor")
    gae_lambda: float = arg(0.95, "GAE lambda")
    num_minibatches: int = arg(4, "minibatches per epoch")
    update_epochs: int = arg(4, "epochs over each update's data")
    norm_adv: bool = arg(True, "normalize advantages per minibatch")
    clip_coef: float = arg(0.2, "PPO surrogate clipping coefficient")
    clip_vloss: bool = arg(True, "clip the value loss as in the PPO paper")
    ent_coef: float = arg(0.01, "entropy bonus coefficient")
    vf_coef: float = arg(0.5, "value loss coefficient")
    max_grad_norm: float = arg(0.5, "gradient clipping norm")
    target_kl: Optional[float] = arg(None, "stop an update's epochs early above this approx KL")
    recompute_values: bool = arg(True, "recompute values with the current critic for GAE (fresher than the workers')")
    hidden_size: int = arg(64, "hidden units of the actor and critic MLPs")
    solve_return: float = arg(475.0, "mean episodic return that counts as solved")
    solve_window: int = arg(20, "episodes averaged for the solve check")
    stop_on_solve: bool = arg(True, "stop training once solved")
    out_dir: str = arg("runs", "where metrics, the learning curve and the summary go")
    logger: str = arg("auto", "metrics logger: auto (tensorboard if installed, else csv), csv or tensorboard")
    progress: bool = arg(True, "show a tqdm progress bar")
    plot: bool = arg(True, "save a learning-curve PNG at the end")


@dataclass
class Args(PPOArgs):
    batches_per_update: int = arg(0, "rollouts per PPO update on each training rank (0: one per worker of the rank)")
    capacity: int = arg(0, "rollouts a training rank buffers at most; workers block beyond (0: one per worker)")
    max_staleness: int = arg(-1, "drop rollouts more than this many policy versions old (-1: keep all)")


def parse_args(cls: type = Args, description: str = __doc__) -> Any:
    """``cls`` (a dataclass of ``arg`` fields) from the command line; ``--help`` lists every field."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=_to_bool, nargs="?", const=True, default=default, help=f.metadata["help"])
        else:
            kind = float if f.name == "target_kl" else type(default)
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"])
    return cls(**vars(parser.parse_args()))


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


# ---------------------------------------------------------------------------------------------------- model
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """CleanRL's CartPole actor-critic: two tanh MLPs."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )  # fmt: skip
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, num_actions), std=0.01),
        )  # fmt: skip

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-prob of ``action``, entropy and value: what the PPO loss needs (training goes through forward for DDP)."""
        logp = torch.log_softmax(self.actor(obs), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1), entropy, self.critic(obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled action, its log-prob and the value; log_softmax + multinomial is Categorical without its overhead."""
        logp = torch.log_softmax(self.actor(obs), dim=-1)
        action = torch.multinomial(logp.exp(), 1).squeeze(-1)
        return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), self.critic(obs).squeeze(-1)


def env_spaces(env_id: str) -> tuple[int, int]:
    env = gym.make(env_id)
    obs_dim, num_actions = int(np.prod(env.observation_space.shape)), int(env.action_space.n)
    env.close()
    return obs_dim, num_actions


# ---------------------------------------------------------------------------------------------------- workers
class EnvLatency(gym.Wrapper):
    """Sleeps before every step: a stand-in for a simulator that is slow but does not use the CPU."""

    def __init__(self, env: gym.Env, latency_ms: float) -> None:
        super().__init__(env)
        self.latency = latency_ms / 1000.0

    def step(self, action: Any) -> Any:
        time.sleep(self.latency)
        return self.env.step(action)


def make_env(env_id: str, latency_ms: float) -> Any:
    def thunk() -> gym.Env:
        env = gym.make(env_id)
        return EnvLatency(env, latency_ms) if latency_ms > 0 else env

    return thunk


class RolloutCollector:
    """A worker's vectorized environments, and what carries over from one rollout to the next."""

    def __init__(self, args: PPOArgs, agent: Agent, seed: int) -> None:
        self.args, self.agent = args, agent
        # SAME_STEP autoreset: the obs after a terminal step is the next episode's first, as CleanRL's GAE expects.
        self.envs = gym.vector.SyncVectorEnv(
            [make_env(args.env_id, args.env_latency_ms) for _ in range(args.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        self.next_obs = torch.as_tensor(self.envs.reset(seed=seed)[0], dtype=torch.float32)
        self.next_done = torch.zeros(args.num_envs, dtype=torch.bool)
        self.running_return = np.zeros(args.num_envs)

    def collect(self) -> TensorDict:
        """One rollout of ``num_steps`` steps in every environment with the agent as it is now."""
        T, N = self.args.num_steps, self.args.num_envs
        rollout = {
            "obs": torch.empty(T, N, self.next_obs.shape[-1]),
            "actions": torch.empty(T, N, dtype=torch.int64),
            "logprobs": torch.empty(T, N),
            "rewards": torch.empty(T, N),
            "dones": torch.empty(T, N, dtype=torch.bool),
            "values": torch.empty(T, N),
            "episode_return": torch.zeros(T, N),
            "episode_end": torch.zeros(T, N, dtype=torch.bool),
        }
        for t in range(T):
            rollout["obs"][t] = self.next_obs
            rollout["dones"][t] = self.next_done
            action, logprob, value = self.agent.act(self.next_obs)
            obs, reward, terminated, truncated, _ = self.envs.step(action.numpy())
            done = np.logical_or(terminated, truncated)
            self.running_return += reward
            rollout["actions"][t], rollout["logprobs"][t], rollout["values"][t] = action, logprob, value
            rollout["rewards"][t] = torch.from_numpy(reward)
            if done.any():
                rollout["episode_end"][t] = torch.from_numpy(done)
                rollout["episode_return"][t] = torch.from_numpy(np.where(done, self.running_return, 0.0))
                self.running_return[done] = 0.0
            self.next_obs = torch.as_tensor(obs, dtype=torch.float32)
            self.next_done = torch.from_numpy(done)
        # The bootstrap state rides along: the trainer values it with its own, newer critic.
        return TensorDict({**rollout, "next_obs": self.next_obs, "next_done": self.next_done}, batch_size=[])

    def close(self) -> None:
        self.envs.close()


def worker_main(ctx: WorkerContext, args: Args) -> None:
    """One inference worker: poll for the newest policy, collect a rollout, tag it with its version, send it."""
    torch.set_num_threads(1)
    seed = ctx.seed_everything(args.seed)  # args.seed + 1000 * (worker_id + 1)
    agent = Agent(*env_spaces(args.env_id), args.hidden_size)
    rx = ctx.connect(agent)
    collector = RolloutCollector(args, agent, seed)
    while not ctx.stop_requested:
        rx.poll()
        version = rx.version
        if not ctx.send(collector.collect(), version=version):
            break  # training is over
    collector.close()


# ---------------------------------------------------------------------------------------------------- trainer
def make_logger(args: PPOArgs) -> Any:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    if args.logger in ("auto", "tensorboard"):
        try:
            return TensorBoardLogger(root_dir=args.out_dir, name=args.exp_name)
        except (ImportError, ModuleNotFoundError):
            if args.logger == "tensorboard":
                raise
    return CSVLogger(root_dir=args.out_dir, name=args.exp_name, flush_logs_every_n_steps=20)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor, next_done: torch.Tensor, args: PPOArgs) -> torch.Tensor:
    """CleanRL's GAE over time-major [T, N] tensors; ``dones[t]`` marks obs[t] as the first of a new episode."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        if t == rewards.shape[0] - 1:
            nonterminal, following = 1.0 - next_done.float(), next_value
        else:
            nonterminal, following = 1.0 - dones[t + 1].float(), values[t + 1]
        delta = rewards[t] + args.gamma * following * nonterminal - values[t]
        last = delta + args.gamma * args.gae_lambda * nonterminal * last
        advantages[t] = last
    return advantages


def train(fabric: Fabric, args: Args) -> dict:
    torch.set_num_threads(1)
    fabric.seed_everything(args.seed + fabric.global_rank)
    obs_dim, num_actions = env_spaces(args.env_id)
    agent = Agent(obs_dim, num_actions, args.hidden_size)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    agent, optimizer = fabric.setup(agent, optimizer)
    strategy: WeightSyncStrategy = fabric.strategy
    my_workers = len(strategy.routes.workers_of(fabric.global_rank))
    # One buffered rollout per worker keeps the policy lag low; the workers outpace the learner anyway.
    stream = strategy.experience(
        capacity=args.capacity or max(1, my_workers),
        max_staleness=None if args.max_staleness < 0 else args.max_staleness,
    )
    per_update = args.batches_per_update or len(stream.worker_ids)
    steps_per_batch = args.num_steps * args.num_envs
    steps_per_update = per_update * steps_per_batch * fabric.world_size

    progress = progress_bar(fabric, args)
    recent: deque[float] = deque(maxlen=args.solve_window)
    curve: list[tuple[int, float]] = []
    lags: list[int] = []
    global_step, solved_at, train_start = 0, None, time.time()
    while global_step < args.total_timesteps:
        batches = stream.get(per_update)
        lag = [strategy.policy_version - b.version for b in batches]
        lags.extend(lag)
        data = merge_rollouts(batches)
        global_step += steps_per_update
        for value in episode_returns(data):
            recent.append(value)
            curve.append((global_step, value))

        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - (global_step - steps_per_update) / args.total_timesteps)
        metrics = ppo_update(fabric, agent, optimizer, data, args)

        mean_return = mean_recent(fabric, recent, args.solve_window)
        elapsed = time.time() - train_start
        sps = global_step / max(elapsed, 1e-9)
        metrics.update({
            "charts/episodic_return": mean_return, "charts/sps": sps, "charts/version_lag": float(np.mean(lag)),
            "charts/version_lag_max": float(max(lag)), "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/stale_dropped": float(stream.dropped), "charts/policy_version": float(strategy.policy_version),
        })  # fmt: skip
        fabric.log_dict(metrics, step=global_step)
        if progress is not None:
            progress.update(steps_per_update)
            progress.set_postfix(ret=f"{mean_return:.0f}", sps=f"{sps:.0f}", lag=f"{np.mean(lag):.1f}", refresh=False)
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
        "mean_version_lag": float(np.mean(lags)) if lags else 0.0,
        "max_version_lag": int(max(lags)) if lags else 0,
        "stale_dropped": stream.dropped,
        "final_mean_return": mean_recent(fabric, recent, args.solve_window),
        "episodes": len(curve),
        "policy_version": strategy.policy_version,
    }
    if fabric.is_global_zero:
        finish(fabric, args, result, _summary(fabric, args, result), curve)
    return result


def merge_rollouts(batches: list) -> dict:
    """Rollouts are [T, N, ...] and bootstrap states [N, ...]: join the workers' envs side by side."""
    return {key: torch.cat([b.data[key] for b in batches], dim=0 if key.startswith("next_") else 1) for key in batches[0].data.keys()}


def episode_returns(data: dict) -> list[float]:
    """Returns of the episodes that ended in merged rollouts, env by env, in time order."""
    return [value for ret, end in zip(data["episode_return"].T, data["episode_end"].T) for value in ret[end].tolist()]


def ppo_update(fabric: Fabric, agent: nn.Module, optimizer: torch.optim.Optimizer, data: dict, args: PPOArgs) -> dict:
    """CleanRL's PPO update on one batch of rollouts; the ratio is against the behaviour policy's log-probs."""
    obs, actions = data["obs"], data["actions"]
    T, N = actions.shape
    with torch.no_grad():
        if args.recompute_values:
            stacked = torch.cat([obs, data["next_obs"].unsqueeze(0)])
            _, _, all_values = agent(stacked.reshape(-1, obs.shape[-1]), torch.zeros((T + 1) * N, dtype=torch.int64))
            values, next_value = all_values.reshape(T + 1, N)[:-1], all_values.reshape(T + 1, N)[-1]
        else:
            values = data["values"]
            _, _, next_value = agent(data["next_obs"], torch.zeros(N, dtype=torch.int64))
        advantages = gae(data["rewards"], values, data["dones"], next_value, data["next_done"], args)
        returns = advantages + values

    b_obs, b_actions = obs.reshape(-1, obs.shape[-1]), actions.reshape(-1)
    b_logprobs, b_advantages = data["logprobs"].reshape(-1), advantages.reshape(-1)
    b_returns, b_values = returns.reshape(-1), values.reshape(-1)
    batch_size = b_obs.shape[0]
    minibatch_size = max(1, batch_size // args.num_minibatches)
    clipfracs, approx_kl = [], torch.zeros(())
    for _ in range(args.update_epochs):
        order = torch.randperm(batch_size)
        for start in range(0, batch_size, minibatch_size):
            mb = order[start : start + minibatch_size]
            # One training rank has nobody to average gradients with: skip DDP's all-reduce, which costs more than
            # the whole step here. DDP needs the forward inside the block too.
            with fabric.no_backward_sync(agent, enabled=fabric.world_size == 1):
                newlogprob, entropy, newvalue = agent(b_obs[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                mb_adv = b_advantages[mb]
                if args.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
                if args.clip_vloss:
                    v_unclipped = (newvalue - b_returns[mb]) ** 2
                    v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                optimizer.zero_grad()
                fabric.backward(loss)
            fabric.clip_gradients(agent, optimizer, max_norm=args.max_grad_norm)
            optimizer.step()  # WeightSyncCallback pushes the new weights to the workers
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    return {
        "losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(), "losses/entropy": entropy_loss.item(),
        "losses/approx_kl": approx_kl.item(), "losses/clipfrac": float(np.mean(clipfracs)),
    }  # fmt: skip


def mean_recent(fabric: Fabric, recent: deque, window: int) -> float:
    """Mean of the last ``window`` episodes; with several training ranks, of every rank's last ``window``."""
    if fabric.world_size == 1:
        return float(np.mean(recent)) if len(recent) >= window else float("nan")
    padded = torch.full((window,), float("nan"))
    padded[: len(recent)] = torch.tensor(list(recent), dtype=torch.float32)
    gathered = fabric.all_gather(padded).flatten()
    gathered = gathered[~gathered.isnan()]
    # Every rank sees the same gathered values, so all ranks decide to stop at the same update.
    return float(gathered.mean()) if gathered.numel() >= window else float("nan")


def progress_bar(fabric: Fabric, args: PPOArgs) -> Any:
    """A tqdm bar over the env-step budget on rank 0 (``None`` elsewhere, or with ``--progress false``)."""
    if not (args.progress and fabric.is_global_zero):
        return None
    from tqdm import tqdm

    return tqdm(total=args.total_timesteps, unit="step", unit_scale=True, dynamic_ncols=True, mininterval=0.5)


def say(progress: Any, text: str) -> None:
    """Print ``text`` above the progress bar, if there is one."""
    if progress is not None:
        progress.write(text)
    else:
        print(text, flush=True)


def solve_outcome(args: PPOArgs, result: dict) -> str:
    """Whether and when the run solved the task, as a summary says it."""
    if result["solved"]:
        return (
            f"solved it (mean return >= {args.solve_return:.0f} over {args.solve_window} episodes) after"
            f" {result['solve_steps']:,} env steps, {result['solve_wall_s']:.1f}s of wall time from process start"
        )
    return (
        f"did not reach a mean return of {args.solve_return:.0f} within {result['steps']:,} env steps"
        f" (last mean {result['final_mean_return']:.1f})"
    )


def finish(fabric: Fabric, args: PPOArgs, result: dict, summary: str, curve: list[tuple[int, float]]) -> None:
    """Next to the metrics: ``summary`` (also printed), ``result`` as JSON and the learning-curve PNG."""
    for logger in fabric.loggers:
        logger.finalize("success")
    run_dir = Path(fabric.logger.log_dir) if fabric.loggers else Path(args.out_dir, args.exp_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.txt").write_text(summary + "\n")
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(summary, flush=True)
    if args.plot and curve:
        path = _plot(curve, args, run_dir / "learning_curve.png")
        print(f"learning curve: {path}", flush=True)


def _summary(fabric: Fabric, args: Args, result: dict) -> str:
    workers = args.inference_workers * fabric.strategy.num_nodes
    return (
        f"PPO on {args.env_id} with {fabric.world_size} training rank(s) and {workers} inference worker(s) x"
        f" {args.num_envs} envs {solve_outcome(args, result)}. It consumed {result['steps']:,} env steps in"
        f" {result['train_s']:.1f}s of training ({result['sps']:,.0f} steps/s) over {result['policy_version']} optimizer"
        f" steps, with a mean policy version lag of {result['mean_version_lag']:.1f} (max {result['max_version_lag']})"
        f" between the policy that collected a rollout and the one that learned from it; {result['stale_dropped']}"
        f" rollouts were dropped as stale; env latency {args.env_latency_ms:g} ms/step."
    )


def _plot(curve: list[tuple[int, float]], args: PPOArgs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, returns = np.array(curve).T
    window = args.solve_window
    smooth = np.convolve(returns, np.ones(window) / window, mode="valid") if len(returns) >= window else returns
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(steps, returns, s=3, alpha=0.3, label="episode return")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, color="C1", label=f"mean of last {window}")
    ax.axhline(args.solve_return, color="gray", linestyle="--", linewidth=1, label="solved")
    ax.set_xlabel("env steps")
    ax.set_ylabel("episodic return")
    ax.set_title(f"{args.exp_name}: PPO {args.env_id}, {args.inference_workers} workers")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    strategy = WeightSyncStrategy(
        functools.partial(worker_main, args=args),
        inference_workers=args.inference_workers,
        start_method=args.start_method,
        transport=args.transport,
    )
    fabric = Fabric(
        accelerator="cpu", devices=args.devices, strategy=strategy, callbacks=[WeightSyncCallback()], loggers=make_logger(args)
    )
    if args.start_method == "popen":
        fabric.launch()  # workers never return from here
        train(fabric, args)
    else:
        fabric.launch(train, args)


if __name__ == "__main__":
    main()
