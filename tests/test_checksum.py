"""Checksums of updates: a stamped update that does not match its bytes is refused, never applied."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fabric_weightsync import DistributedTransport, TransportError
from fabric_weightsync.weights import CHECKSUM_KEY, make_wire_buffer

TIMEOUT = 20.0


def _policy(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 2))


def _store(port: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=is_master, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT))


def _worker(port: int, out: str) -> None:
    torch.set_num_threads(1)
    policy = _policy(seed=1)
    transport = DistributedTransport(weights_buffer=policy, store=_store(port, False), rank=1, timeout=TIMEOUT)
    transport.setup_connection_and_weights_on_receiver(worker_idx=0, model=policy)
    good = transport.receive_weights(TIMEOUT, model=policy)
    before = [p.detach().clone() for p in policy.parameters()]
    try:
        transport.receive_weights(TIMEOUT, model=policy)
        error = None
    except TransportError as err:
        error = str(err)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    torch.save((good is not None, transport.version, error, unchanged, [p.detach().sum().item() for p in policy.parameters()]), out)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_corrupt_update_is_refused_and_the_policy_keeps_its_version(channel: str, tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = _store(port, True)  # hosts the store for both sides until the test ends
    out = str(tmp_path / "worker.pt")
    # fork: no semaphore, so no resource tracker outliving the test (the leftover check would flag it)
    peer = mp.get_context("fork").Process(target=_worker, args=(port, out))
    peer.start()
    try:
        trainer = _policy(seed=0)
        transport = DistributedTransport(
            weights_buffer=trainer, store=_store(port, False), rank=1, channel=channel, timeout=TIMEOUT, checksum=True
        )
        transport.setup_connection_and_weights_on_sender()
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(1.0)
        transport.send_weights(trainer, version=1)  # stamped and verified: applied
        corrupt = transport.wire_buffer
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(1.0)
        transport._stage(trainer, 2)
        corrupt[CHECKSUM_KEY].add_(1)  # the stamp no longer matches the bytes, as after corruption in flight
        with pytest.raises(TransportError, match="checksum mismatch"):
            transport.send_weights(corrupt, version=2)
        peer.join(30)
        applied, version, error, unchanged, sums = torch.load(out)
        assert applied and version == 1
        assert error is not None and "update 2 failed its checksum and was not applied" in error
        assert unchanged
        expected = make_wire_buffer(trainer)["weights"]
        assert sums != [t.sum().item() for t in expected.values()]
        transport.close()
        assert not server.check(["NODE_1_in"]) and not server.check(["NODE_1_slot"])  # close() cleaned up
    finally:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    assert peer.exitcode == 0

