"""Workers that log, in script mode (``python logging_train.py`` + ``fabric.launch()``), where a worker's LOCAL_RANK
is at least 1: each worker logs through ``ctx.log``/``ctx.log_dict`` (to training rank 0's CSVLogger) and through a
CSVLogger of its own.

    python logging_train.py --out DIR [--devices 2] [--workers 2] [--records 40]
"""

import argparse
from datetime import timedelta

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=40)
    return parser.parse_args()


def worker(ctx) -> None:
    args = parse_args()
    torch.set_num_threads(1)
    w = ctx.worker_id
    # Before connecting: the trainer sets its module up (which the connection waits for) once these are logged.
    for k in range(args.records):
        ctx.log_dict({f"worker{w}/value": k, f"worker{w}/square": torch.tensor(k * k)}, step=k)
    own = CSVLogger(root_dir=args.out, name=f"worker{w}")  # a logger of the worker's own
    own.log_metrics({"own": 1.0}, step=0)
    own.finalize("success")
    ctx.control.client().set(f"test/logged/{w}", b"1")
    rx = ctx.connect(torch.nn.Linear(2, 2))
    ctx.log(f"worker{w}/version", rx.version)  # step: the applied policy version
    while not ctx.stop_requested:
        rx.wait_for_update(0.2)
    ctx.log(f"worker{w}/final", 1.0, step=args.records)  # after the trainer's last step: delivered at exit


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    strategy = WeightSyncStrategy(worker, inference_workers=args.workers, sync_timeout=30)
    logger = CSVLogger(root_dir=args.out, name="trainer", flush_logs_every_n_steps=1000)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy, callbacks=[WeightSyncCallback()], loggers=logger)
    fabric.launch()
    fabric.strategy.control_plane().client().wait([f"test/logged/{w}" for w in range(args.workers)], timedelta(seconds=30))
    model, optimizer = fabric.setup(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    for _ in range(3):
        fabric.backward(model(torch.randn(4, 2)).pow(2).sum())
        optimizer.step()
        optimizer.zero_grad()
    fabric.log("trainer/loss", 0.5, step=3)
    logger.finalize("success")  # as a user's script ends; the workers' last records come after it


if __name__ == "__main__":
    main()
