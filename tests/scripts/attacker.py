"""A stranger on the host: connects to a live run's stores and tries to steer it (tests/test_security.py).

    python attacker.py RENDEZVOUS_PORT ATTACK [ATTACK ...]

It drops to uid/gid 65534 first when started as root, so file permissions hold against it as against another
user. It finds the control store as anyone could (the rendezvous store names it), writes forged values, and prints
``ATTACKED <what>`` for each attack and ``SECRET_UNREADABLE`` if the run's secret file is closed to it.
Attacks: ``verdict`` (forged shared-memory and group verdicts naming its own files and group, with an eviction),
``latest``, ``schemas`` (oversized and garbage experience schemas), ``heartbeat``, ``reports`` (exit and error
reports), ``stop``.
"""

import json
import os
import sys
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from fabric_weightsync.auth import secret_path
from fabric_weightsync.protocol import BOOTSTRAP_KEY, LATEST_KEY, STOP_KEY, experience_epoch_key, experience_key, worker_keys

FORGED_VALUE = 7.0


def drop_privileges() -> None:
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)


def say(what: str) -> None:
    print(f"ATTACKED {what}", flush=True)


def forged_files(nbytes: int) -> tuple[str, str]:
    """A staging file full of 7.0 and a board that publishes it, named as a run's would be, owned by the attacker."""
    stem = f"/dev/shm/fabric_weightsync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    buffer = torch.from_file(f"{stem}-0", shared=True, size=nbytes // 4, dtype=torch.float32)
    buffer.fill_(FORGED_VALUE)
    board = torch.from_file(f"{stem}-board", shared=True, size=2 * 4 + 1, dtype=torch.int64)
    board.fill_(999999)
    os.chmod(f"{stem}-0", 0o666)  # a stranger's file that anyone may map: exactly what must be refused
    return f"{stem}-0", f"{stem}-board"


def main() -> None:
    port, attacks = int(sys.argv[1]), sys.argv[2:]
    drop_privileges()
    rendezvous = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=30))
    run = json.loads(rendezvous.get(BOOTSTRAP_KEY))["run"]
    try:
        open(secret_path(run)).read()
    except OSError:
        print("SECRET_UNREADABLE", flush=True)
    host, control_port = rendezvous.get(f"{BOOTSTRAP_KEY}/{run}")[32:].decode().rsplit(":", 1)  # skip the MAC
    store = dist.TCPStore(host, int(control_port), is_master=False, wait_for_workers=False, timeout=timedelta(seconds=30))
    one, two = worker_keys(1), worker_keys(2)
    for attack in attacks:
        if attack == "verdict":
            path, board = forged_files(1 << 16)
            store.set(one.evicted, b"evicted by a stranger")
            store.set(one.verdict, json.dumps({"channel": "shm", "files": [path], "board": board}).encode())
            store.set(two.evicted, b"evicted by a stranger")
            store.set(two.verdict, json.dumps({"channel": "group", "group": "stranger", "latest": LATEST_KEY}).encode())
        elif attack == "latest":
            store.set(LATEST_KEY, b"not a number")
        elif attack == "schemas":
            huge = {"names": ["obs"], "shapes": [[10**12]], "dtypes": ["float32"]}
            store.set(experience_epoch_key(0, 0), b"999")
            store.set(experience_key(0, 0, 1000, "schema"), json.dumps(huge).encode())
            store.set(experience_key(0, 0, 1, "schema"), json.dumps(huge).encode())
            store.set(experience_epoch_key(1, 0), b"\xff garbage")
            store.set(two.hello, b"{not json")
            store.set(worker_keys(3).hello, json.dumps({"schema": huge, "host": "stranger"}).encode())
        elif attack == "heartbeat":
            store.set(one.heartbeat, b"99999999999999999999")
            store.set(two.heartbeat, b"garbage")
        elif attack == "reports":
            store.set(one.exit, b"1")
            store.set(two.error, b"Traceback: forged by a stranger")
        elif attack == "stop":
            store.set(STOP_KEY, b"1")
        else:
            raise SystemExit(f"unknown attack {attack!r}")
        say(attack)


if __name__ == "__main__":
    main()
