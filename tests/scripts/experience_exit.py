"""Script mode (``python experience_exit.py`` + ``fabric.launch()``) with experience: two workers send three
batches each and return, rank 0 trains on them and exits. Printed at rank 0's interpreter exit, after the
strategy's shutdown: the library's threads still running, which must be none: a daemon thread inside a store
call when the interpreter finalizes aborts the process, and the experience receivers and links of workers that
returned poll the store, as the launcher's child watcher does when it reports a failed child.
"""

import atexit
import threading

import torch
from lightning.fabric import Fabric
from tensordict import TensorDict

from fabric_weightsync import WeightSyncCallback, WeightSyncStrategy

torch.set_num_threads(1)
BATCHES_PER_WORKER = 3
is_trainer = False


def report_threads() -> None:
    if is_trainer:  # registered before the strategy's own exit handler, so it runs after it
        alive = [t.name for t in threading.enumerate() if t.name.startswith("fws-")]
        print("THREADS_AFTER_SHUTDOWN", ",".join(sorted(alive)) or "none", flush=True)


def worker(ctx) -> None:
    receiver = ctx.connect(torch.nn.Linear(2, 2))
    for _ in range(BATCHES_PER_WORKER):
        receiver.poll()
        ctx.send(TensorDict({"obs": torch.zeros(4, 2)}, batch_size=[4]))


if __name__ == "__main__":
    atexit.register(report_threads)
    strategy = WeightSyncStrategy(worker, inference_workers=2, sync_timeout=30, shutdown_timeout=20)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, callbacks=[WeightSyncCallback()])
    fabric.launch()
    is_trainer = True
    model, optimizer = fabric.setup(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    for batch in fabric.strategy.experience().get(2 * BATCHES_PER_WORKER):
        fabric.backward(model(batch.data["obs"]).sum())
        optimizer.step()
        optimizer.zero_grad()
