"""Checksums of updates: a stamped update that does not match its bytes is refused, never applied."""

import subprocess
import sys

import pytest
import torch

from conftest import SCRIPTS_DIR, clean_env
from fabric_weightsync import DistributedTransport, TransportError, WeightStrategy, make_wire_buffer

sys.path.insert(0, str(SCRIPTS_DIR))
from checksum_peer import TIMEOUT, policy as _policy, store as _store  # noqa: E402


@pytest.mark.timeout(90)
@pytest.mark.parametrize("channel", ["group", "shm"])
def test_corrupt_update_is_refused_and_the_policy_keeps_its_version(channel: str, control_store, tmp_path) -> None:
    server, port = control_store, control_store.port  # hosts the store for both sides until the test ends
    out = str(tmp_path / "worker.pt")
    # A process of its own: a fork of this one would inherit whatever earlier tests left running in it.
    peer = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / "checksum_peer.py"), str(port), out], env=clean_env())
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
        WeightStrategy().apply_weights(corrupt.weights, trainer)  # staged by hand, as the sender would
        corrupt.version = 2
        corrupt.checksum = corrupt.compute_checksum() + 1  # the stamp no longer matches the bytes, as after corruption in flight
        with pytest.raises(TransportError, match="checksum mismatch"):
            transport.send_weights(corrupt, version=2)
        peer.wait(30)
        applied, version, error, unchanged, sums = torch.load(out)
        assert applied and version == 1
        assert error is not None and "update 2 failed its checksum and was not applied" in error
        assert unchanged
        expected = make_wire_buffer(trainer).weights
        assert sums != [t.sum().item() for t in expected.values()]
        transport.close()
        assert not server.check(["NODE_1_in"]) and not server.check(["NODE_1_slot"])  # close() cleaned up
    finally:
        try:
            peer.wait(30)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    assert peer.returncode == 0

