"""The worker of tests/test_checksum.py, in a process of its own: take one good update, then a corrupt one.

    python checksum_peer.py PORT OUT
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from fabric_weightsync import DistributedTransport, TransportError

TIMEOUT = 20.0


def policy(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 2))


def store(port: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=is_master, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT))


def main(port: int, out: str) -> None:
    torch.set_num_threads(1)
    model = policy(seed=1)
    transport = DistributedTransport(weights_buffer=model, store=store(port, False), rank=1, timeout=TIMEOUT)
    transport.setup_connection_and_weights_on_receiver(worker_idx=0, model=model)
    good = transport.receive_weights(TIMEOUT, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        transport.receive_weights(TIMEOUT, model=model)
        error = None
    except TransportError as err:
        error = str(err)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.save((good is not None, transport.version, error, unchanged, [p.detach().sum().item() for p in model.parameters()]), out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
