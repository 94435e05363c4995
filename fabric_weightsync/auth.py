"""The run's secret, and a store whose values carry an HMAC of it.

torch's ``TCPStore`` lets anyone who reaches its port read and write any key. Every value the library writes is
signed with HMAC-SHA256 over (run id, key, value) under a per-run secret, and every value it reads is checked
first: a value that fails is treated as absent (one warning per key and process), so a forged value can delay a
peer up to that peer's own timeout but never steer it.

The secret comes from :data:`SECRET_ENV` (set by the job, or inherited from the process that started this one);
training rank 0 creates one when nobody set it and leaves it, for processes started by torchrun or SLURM on its
host, in a file only this user can read (:func:`secret_path`).
"""

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist

SECRET_ENV = "FABRIC_WEIGHTSYNC_SECRET"
"""Environment variable holding the run's secret (hex); multi-host jobs set it on every host."""

MAC_BYTES = 32
RUN_ID = re.compile(r"[0-9a-f]{32}")
_RECHECK_S = 0.05  # how often a reader looks again at a key that held a forged value

log = logging.getLogger(__name__)
_warned: set[str] = set()


class MissingSecret(RuntimeError):
    """This process has no secret for the run it is asked to join."""


@dataclass(frozen=True)
class Credentials:
    """The run's secret and id: what signs and checks every control value of one run."""

    secret: bytes
    run_id: str

    def mac(self, key: str, value: bytes) -> bytes:
        """HMAC-SHA256 of ``value`` under ``key`` in this run."""
        return hmac.new(self.secret, f"{self.run_id}\0{key}\0".encode() + value, hashlib.sha256).digest()

    def sign(self, key: str, value: bytes) -> bytes:
        """``value`` as stored: its MAC, then the value."""
        return self.mac(key, value) + value

    def open(self, key: str, stored: bytes) -> Optional[bytes]:
        """The value inside ``stored`` if its MAC is right, else ``None``."""
        value = stored[MAC_BYTES:]
        if len(stored) >= MAC_BYTES and hmac.compare_digest(stored[:MAC_BYTES], self.mac(key, value)):
            return value
        return None


def new_run_id() -> str:
    return secrets.token_hex(16)


def _refuse(key: str) -> None:
    """Say once per process that ``key`` was ignored because its value is not this run's."""
    if key not in _warned:
        _warned.add(key)
        log.warning("fabric_weightsync: ignored store key %r: its value is not signed by this run's secret", key)


class ControlStore:
    """A control-store client that signs what it writes and reads only values signed for this run.

    It has the ``dist.Store`` methods the library uses (``set``, ``get``, ``check``, ``wait``, ``delete_key``,
    ``set_timeout``), each with the same meaning for signed values, plus :meth:`read`. A key holding a value that
    fails the check counts as absent. Without credentials (a bare store given to a standalone transport) values
    are stored as they are.

    Args:
        store: the raw client (or server) of the control store.
        credentials: the run's secret and id.
        timeout: seconds ``get`` and ``wait`` wait by default.
    """

    def __init__(self, store: dist.Store, credentials: Optional[Credentials], timeout: float) -> None:
        self.raw = store
        self.credentials = credentials
        self._timeout = float(timeout)
        store.set_timeout(timedelta(seconds=timeout))

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout.total_seconds()
        self.raw.set_timeout(timeout)

    def set(self, key: str, value: Union[bytes, str]) -> None:
        value = value.encode() if isinstance(value, str) else bytes(value)
        self.raw.set(key, value if self.credentials is None else self.credentials.sign(key, value))

    def read(self, key: str) -> Optional[bytes]:
        """The key's value now, or ``None`` if it is unset or not signed for this run."""
        if not self.raw.check([key]):
            return None
        try:
            return self._open(key, self.raw.get(key))
        except dist.DistStoreError:  # deleted between the two calls
            return None

    def check(self, keys: Iterable[str]) -> bool:
        """Whether every key holds a value signed for this run."""
        return all(self.read(key) is not None for key in keys)

    def get(self, key: str) -> bytes:
        """The key's signed value, waiting up to the timeout for one; raises ``DistStoreError`` naming the key."""
        deadline = time.monotonic() + self._timeout
        value = self._open(key, self.raw.get(key))  # one round trip when the value is good, as a bare get
        return value if value is not None else self._await([key], deadline)[key]

    def wait(self, keys: Iterable[str], timeout: Optional[timedelta] = None) -> None:
        """Wait until every key holds a signed value; raises ``DistStoreError`` naming the keys that do not."""
        keys = list(keys)
        seconds = self._timeout if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + seconds
        self.raw.wait(keys, timedelta(seconds=seconds))  # blocks in the server until they exist: no polling
        self._await(keys, deadline)

    def _await(self, keys: list, deadline: float) -> dict:
        """The keys' signed values, looking again while a forgery sits in one, until ``deadline``."""
        while True:
            values = {key: self.read(key) for key in keys}
            missing = [key for key, value in values.items() if value is None]
            if not missing:
                return values
            if time.monotonic() >= deadline:
                raise dist.DistStoreError(f"store keys {missing} hold no value signed by this run")
            time.sleep(_RECHECK_S)  # only a new write by the real peer can end this wait

    def _open(self, key: str, stored: bytes) -> Optional[bytes]:
        if self.credentials is None:
            return stored
        value = self.credentials.open(key, stored)
        if value is None:
            _refuse(key)
        return value

    def delete_key(self, key: str) -> bool:
        return self.raw.delete_key(key)


def as_control_store(store: Union[dist.Store, ControlStore], timeout: float) -> ControlStore:
    """``store`` as a :class:`ControlStore` (a bare ``dist.Store`` keeps its values unsigned)."""
    if isinstance(store, ControlStore):
        store.set_timeout(timedelta(seconds=timeout))
        return store
    return ControlStore(store, None, timeout)


# ---------------------------------------------------------------------------------------------- pair proof
def prove_pair(group: dist.ProcessGroup, credentials: Credentials, name: str, group_rank: int, device: torch.device) -> None:
    """Both ranks of a two-rank group show the other they hold the run's secret.

    torch's rendezvous trusts the store, so a forged address there could put a stranger at the other end; it
    cannot answer this. Raises ``RuntimeError`` naming the group when the peer fails.
    """
    proofs = [credentials.mac(f"pair-proof/{name}/{rank}", b"") for rank in (0, 1)]
    mine, theirs = proofs[group_rank], proofs[1 - group_rank]
    received = torch.empty(MAC_BYTES, dtype=torch.uint8, device=device)
    sent = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device)
    refused = f"the peer of process group {name!r} does not hold this run's secret"
    for turn in (0, 1):  # rank 0 proves itself first; rank 1 answers only a peer that did
        try:
            if turn == group_rank:
                group.send([sent], 1 - group_rank, 0).wait()
            else:
                group.recv([received], 1 - group_rank, 0).wait()
        except RuntimeError as err:  # a peer that refused our proof hangs up
            raise RuntimeError(f"{refused} or refused ours ({err})") from err
        if turn != group_rank and not hmac.compare_digest(bytes(received.cpu().tolist()), theirs):
            raise RuntimeError(refused)


# ---------------------------------------------------------------------------------------------- the secret
def ensure_secret() -> None:
    """Give this process, and the processes it starts from now on, a secret: the job's, or a new one."""
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))


def secret_path(run_id: str) -> str:
    """Where training rank 0 leaves a secret it created, for this user's other processes of the run on its host."""
    return os.path.join(tempfile.gettempdir(), f"fabric_weightsync-{os.getuid()}", f"{run_id}.secret")


def credentials_for_serving(run_id: str) -> tuple[Credentials, str]:
    """Training rank 0: the run's credentials, and the secret file it leaves for this user's processes on its host.

    The secret is the environment's (the job's, or the launching process's), else a new one that processes this
    one starts later inherit.
    """
    ensure_secret()
    secret = _parse_secret(os.environ[SECRET_ENV])
    path = secret_path(run_id)
    _private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret.hex())
    return Credentials(secret, run_id), path


def credentials_for_joining(run_id: str) -> Credentials:
    """Any other process: the secret from its environment or from rank 0's file on this host."""
    if SECRET_ENV in os.environ:
        return Credentials(_parse_secret(os.environ[SECRET_ENV]), run_id)
    path = secret_path(run_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise MissingSecret(
            f"this process has no secret for the run: {SECRET_ENV} is not set and {path} cannot be read ({err.strerror})."
            f" On training rank 0's host the file appears by itself; on other hosts set {SECRET_ENV} to the same"
            " value for every process of the job (e.g. `export FABRIC_WEIGHTSYNC_SECRET=$(python -c 'import"
            " secrets; print(secrets.token_hex(32))')` before launching)"
        ) from err
    with os.fdopen(fd) as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise MissingSecret(f"refusing secret file {path}: it must belong to this user and be readable by nobody else")
        return Credentials(_parse_secret(file.read()), run_id)


def remove_secret_file(path: Optional[str]) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _parse_secret(text: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise MissingSecret(f"{SECRET_ENV} must be at least 32 hex digits (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return secret


def _private_dir(path: str) -> None:
    """Create ``path`` for this user alone, or check that it already is (not a link, ours, mode 0700)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MissingSecret(f"refusing {path} for the run's secret: it must be a directory of this user's, mode 0700")
