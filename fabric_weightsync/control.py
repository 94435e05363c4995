"""The control plane: a TCPStore hosted by training rank 0 that every worker and transport signals through.

Rank 0 binds it to an OS-chosen free port (so it can never collide with Fabric's ``MASTER_PORT``) on the
interface of ``MASTER_ADDR`` (loopback on a single host), and publishes ``host:port`` under
:data:`BOOTSTRAP_KEY` in the store that already listens on ``MASTER_ADDR:MASTER_PORT`` in every launch mode
(the trainers' rendezvous store, or torchrun's agent store). Workers read it from there.

What the store holds is listed in :mod:`~fabric_weightsync.protocol`. No weights and nothing pickled go through it,
but anyone who can reach the port can read and write those keys: run multi-host jobs on a trusted network.
"""

import ipaddress
import socket
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from fabric_weightsync.protocol import BOOTSTRAP_KEY, ENDED_KEY, STOP_KEY, TrainingEnded

def open_client(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A new client connection; retries connecting until ``timeout`` (the server may not be up yet)."""
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout))


class ControlPlane:
    """Address of the control store plus a way to open more clients to it (one per blocking user)."""

    def __init__(
        self, host: str, port: int, timeout: float, server: Optional[dist.TCPStore] = None, bootstrap: Optional[dist.Store] = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._server = server
        self._bootstrap = bootstrap  # rank 0's client of the rendezvous store, where it says the run ended
        self.store = server if server is not None else open_client(host, port, timeout)

    @classmethod
    def serve(cls, main_address: str, bootstrap_port: int, timeout: float) -> "ControlPlane":
        """Host the store on training rank 0 and publish its address through the bootstrap store."""
        listener = _listen_on(main_address)
        port = listener.getsockname()[1]
        server = dist.TCPStore(
            main_address,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
            master_listen_fd=listener.detach(),
        )
        bootstrap = open_client(main_address, bootstrap_port, timeout)
        bootstrap.delete_key(ENDED_KEY)  # left by an earlier run on the same rendezvous store
        bootstrap.set(BOOTSTRAP_KEY, f"{main_address}:{port}")
        return cls(main_address, port, timeout, server=server, bootstrap=bootstrap)

    @classmethod
    def join(cls, main_address: str, bootstrap_port: int, timeout: float, *, after_end: bool = False) -> "ControlPlane":
        """Find the store through the bootstrap store (waits up to ``timeout`` for rank 0 to publish it).

        Raises :class:`~fabric_weightsync.protocol.TrainingEnded` when rank 0 already said the run is over, unless
        ``after_end`` (to report something to a rank 0 that may still listen).
        """
        bootstrap = open_client(main_address, bootstrap_port, timeout)
        bootstrap.wait([BOOTSTRAP_KEY], timedelta(seconds=timeout))
        if not after_end and bootstrap.check([ENDED_KEY]):
            raise TrainingEnded("training had already ended when this worker started")
        host, port = bootstrap.get(BOOTSTRAP_KEY).decode().rsplit(":", 1)
        return cls(host, int(port), timeout)

    def client(self) -> dist.TCPStore:
        return open_client(self.host, self.port, self.timeout)

    def request_stop(self) -> None:
        """Tell every worker that training ended, and workers that start from now on that there is nothing to join."""
        self.store.set(STOP_KEY, b"1")
        if self._bootstrap is not None:
            try:
                self._bootstrap.set(ENDED_KEY, b"1")
            except Exception:  # the rendezvous store went first (its host is shutting down): nobody can start now
                pass

    def stop_requested(self) -> bool:
        return self.store.check([STOP_KEY])


def _listen_on(address: str) -> socket.socket:
    """A listening socket on a free port of the interface that ``address`` names (all interfaces if unknown)."""
    host = socket.gethostbyname(address)
    bind_host = host if ipaddress.ip_address(host).is_loopback or _is_local(host) else "0.0.0.0"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind_host, 0))
    listener.listen(128)
    return listener


def _is_local(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False
