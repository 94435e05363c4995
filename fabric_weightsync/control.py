"""The control plane: a TCPStore hosted by training rank 0 that every worker and transport signals through.

Rank 0 binds it to an OS-chosen free port (so it can never collide with Fabric's ``MASTER_PORT``) on the
interface of ``MASTER_ADDR`` (loopback on a single host), and publishes ``host:port`` under
:data:`BOOTSTRAP_KEY` in the store that already listens on ``MASTER_ADDR:MASTER_PORT`` in every launch mode
(the trainers' rendezvous store, or torchrun's agent store). Workers read it from there.

What the store holds is listed in :mod:`~fabric_weightsync.protocol`. No weights and nothing pickled go through it,
and every value in it is signed with the run's secret (:mod:`~fabric_weightsync.auth`): anyone who can reach the
port can delay the run, but not steer it.
"""

import ipaddress
import json
import socket
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from fabric_weightsync.auth import (
    RUN_ID,
    SECRET_ENV,
    Credentials,
    MissingSecret,
    ControlStore,
    credentials_for_joining,
    credentials_for_serving,
    new_run_id,
    remove_secret_file,
)
from fabric_weightsync.protocol import BOOTSTRAP_KEY, ENDED_KEY, STOP_KEY, TrainingEnded


def open_client(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A new client connection; retries connecting until ``timeout`` (the server may not be up yet)."""
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout))


class ControlPlane:
    """Address of the control store, the run's credentials, and a way to open more clients (one per blocking user).

    Args:
        host, port: where the control store listens.
        credentials: the run's secret and id, which sign every value.
        timeout: seconds a store call may wait.
        server: training rank 0's server of the store.
        bootstrap: rank 0's client of the rendezvous store, where it says the run ended.
        secret_file: the secret file rank 0 wrote for processes on its host, removed by :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        credentials: Credentials,
        timeout: float,
        server: Optional[dist.TCPStore] = None,
        bootstrap: Optional[ControlStore] = None,
        secret_file: Optional[str] = None,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.timeout = timeout
        self._bootstrap = bootstrap
        self._secret_file = secret_file
        self.store = ControlStore(server if server is not None else open_client(host, port, timeout), credentials, timeout)

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
        run_id = new_run_id()
        credentials, secret_file = credentials_for_serving(run_id)
        bootstrap = ControlStore(open_client(main_address, bootstrap_port, timeout), credentials, timeout)
        bootstrap.delete_key(ENDED_KEY)  # left by an earlier run on the same rendezvous store
        # The run id rides unsigned beside the signed address: a joining process needs it to find its secret.
        bootstrap.raw.set(BOOTSTRAP_KEY, json.dumps({"run": run_id}).encode())
        bootstrap.set(_address_key(run_id), f"{main_address}:{port}")
        return cls(main_address, port, credentials, timeout, server=server, bootstrap=bootstrap, secret_file=secret_file)

    @classmethod
    def join(cls, main_address: str, bootstrap_port: int, timeout: float, *, after_end: bool = False) -> "ControlPlane":
        """Find the store through the bootstrap store (waits up to ``timeout`` for rank 0 to publish it).

        Raises :class:`~fabric_weightsync.protocol.TrainingEnded` when rank 0 already said the run is over, unless
        ``after_end`` (to report something to a rank 0 that may still listen), and
        :class:`~fabric_weightsync.auth.MissingSecret` when this process has no secret for the run.
        """
        raw = open_client(main_address, bootstrap_port, timeout)
        raw.wait([BOOTSTRAP_KEY], timedelta(seconds=timeout))
        run_id = _run_id(raw.get(BOOTSTRAP_KEY))
        try:
            credentials = credentials_for_joining(run_id)
        except MissingSecret:
            if not after_end and raw.check([ENDED_KEY]):  # rank 0 is gone and took its secret file along
                raise TrainingEnded("training had already ended when this worker started") from None
            raise
        bootstrap = ControlStore(raw, credentials, timeout)
        if not after_end and bootstrap.check([ENDED_KEY]):
            raise TrainingEnded("training had already ended when this worker started")
        try:
            host, port = bootstrap.get(_address_key(run_id)).decode().rsplit(":", 1)
        except dist.DistStoreError as err:
            raise MissingSecret(
                f"the control store's address is not signed with this process's secret: is {SECRET_ENV} the same as"
                f" training rank 0's? ({err})"
            ) from err
        return cls(host, int(port), credentials, timeout)

    def client(self) -> ControlStore:
        return ControlStore(open_client(self.host, self.port, self.timeout), self.credentials, self.timeout)

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

    def close(self) -> None:
        """Remove the secret file rank 0 wrote: the run is over, nobody joins any more."""
        remove_secret_file(self._secret_file)


def _address_key(run_id: str) -> str:
    return f"{BOOTSTRAP_KEY}/{run_id}"


def _run_id(value: bytes) -> str:
    """The run id in the bootstrap value; a value that is not one names no file (it is used in a path)."""
    try:
        run_id = json.loads(value)["run"]
    except (ValueError, KeyError, TypeError):
        run_id = None
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise MissingSecret(f"the rendezvous store's {BOOTSTRAP_KEY!r} does not name a fabric_weightsync run: {value[:80]!r}")
    return run_id


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
