"""A stranger on the host can reach every store of a run; it must not be able to steer it.

The attacker (tests/scripts/attacker.py) is a real process that finds the stores as any local user could and runs
as uid 65534 when the tests run as root, so file permissions are part of what is tested.
"""

import json
import os
import re
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import Processes, clean_env, free_port, wait_until
from fabric_weightsync import WeightSyncScheme
from fabric_weightsync.auth import SECRET_ENV, ControlStore, Credentials, new_run_id
from fabric_weightsync.channels import ChannelError, new_pair_group
from fabric_weightsync.channels.board import SHM_PREFIX, open_shared_buffer, shm_dir
from fabric_weightsync.control import ControlPlane
from fabric_weightsync.protocol import worker_keys
from fabric_weightsync.weights import WeightSchema

SCRIPTS = Path(__file__).parent / "scripts"
ATTACKER = SCRIPTS / "attacker.py"


def attack(tmp_path: Path, rendezvous_port: int, *attacks: str) -> str:
    """Run the attacker to its end; its output."""
    done = subprocess.run(
        [sys.executable, str(ATTACKER), str(rendezvous_port), *attacks], env=clean_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in attacks:
        assert f"ATTACKED {name}" in done.stdout, done.stdout + done.stderr
    if os.getuid() == 0:
        assert "SECRET_UNREADABLE" in done.stdout, "another user could read the run's secret"
    return done.stdout


def records(lines: list, tag: str) -> list:
    """The fields of every ``TAG key=json ...`` line with this tag."""
    return [dict((k, json.loads(v)) for k, v in (f.split("=", 1) for f in line.split()[1:])) for line in lines if line.split()[:1] == [tag]]


def ignored(output: str) -> set:
    return set(re.findall(r"ignored store key '([^']+)'", output))


def remove_strangers_files() -> None:
    for name in os.listdir(shm_dir()):
        path = os.path.join(shm_dir(), name)
        if name.startswith(SHM_PREFIX) and os.stat(path).st_uid != os.getuid():
            os.unlink(path)


# ---------------------------------------------------------------------------------------------- a live run
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["auto", "gloo"])
def test_attacks_on_a_live_run_change_nothing(tmp_path, transport):
    """Forged eviction and verdicts, garbage newest version, oversized and garbage schemas, fake heartbeats, fake
    exit and error reports and a fake stop, all while the run trains: it ends with exit code 0, every worker on the
    trainer's last version with the trainer's weights, no memory jump, and the log names what it ignored."""
    port, go = free_port(), tmp_path / "attack_over"
    run = Processes(tmp_path)
    env = clean_env(MASTER_PORT=str(port))
    env.pop(SECRET_ENV, None)
    trainer = run.start("trainer", [sys.executable, str(SCRIPTS / "attacked_train.py"), "--transport", transport, "--go", str(go)], env)
    try:
        assert run.watch(lambda: any(line.startswith("ATTACK_ME") for line in trainer.lines), 90), run.describe()
        attack(tmp_path, port, "verdict", "latest", "schemas", "heartbeat", "reports", "stop")
        go.touch()
        assert run.wait(90), run.describe()
    finally:
        run.close()
        remove_strangers_files()
    assert trainer.returncode == 0, run.describe()
    trainer_done, workers_done = records(trainer.lines, "TRAINER_DONE"), records(trainer.lines, "WORKER_DONE")
    assert len(trainer_done) == 1 and len(workers_done) == 2, run.describe()
    final = trainer_done[0]
    for worker in workers_done:
        assert worker["version"] == final["version"], f"worker ended on {worker} but the trainer on {final}"
        assert worker["checksum"] == pytest.approx(final["checksum"], abs=1e-9), f"{worker} holds other weights than {final}"
    # The forged schemas declared 4 TB and 268M elements: nothing of that size may have been allocated.
    assert final["rss_after"] - final["rss_before"] < 200, f"the trainer's memory jumped: {final}"
    output = run.describe() + "".join(proc.stderr() for proc in run.procs)
    # Forgeries that stay until the run reads them (a heartbeat may be overwritten by the next real one first;
    # verdicts and schemas are read only at connect: see the next test).
    expected = {"NODE_1_evicted", "NODE_2_evicted", "NODE_1_exit", "NODE_2_error", "fws/stop"}
    assert expected <= ignored(output), f"not named in the log: {expected - ignored(output)}\n{output[-3000:]}"


# ---------------------------------------------------------------------------------------------- a connecting worker
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["auto", "gloo"])
def test_forged_verdict_is_ignored_and_the_worker_takes_the_trainers_weights(tmp_path, transport):
    """A worker waiting for its verdict gets a stranger's first (its own shared-memory files of 7.0, or a group of
    its own): it ignores it, names the key, and connects to the trainer when the real verdict comes."""
    bootstrap = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    control = ControlPlane.serve("127.0.0.1", bootstrap.port, 30.0)
    run = Processes(tmp_path)
    worker = run.start("worker", [sys.executable, str(SCRIPTS / "polling_worker.py"), "0", "1", str(bootstrap.port)], clean_env())
    scheme = None
    try:
        # The worker said hello and waits for its verdict: the stranger answers first.
        wait_until(lambda: control.store.check([worker_keys(1).hello]), 60, "the worker said hello")
        attack(tmp_path, bootstrap.port, "verdict")
        wait_until(lambda: "NODE_1_verdict" in ignored(worker.stderr()), 30, "the worker ignored the forged verdict")
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        scheme = WeightSyncScheme(control, 1, transport=transport, heartbeat_timeout=600)
        scheme.start(model)
        assert scheme.flush(60), "the worker never connected to the trainer"
        control.request_stop()
        assert run.wait(60), run.describe()
    finally:
        if scheme is not None:
            scheme.close()
        control.close()
        run.close()
        remove_strangers_files()
    final = json.loads(next(line for line in worker.lines if line.startswith("FINAL ")).split(" ", 1)[1])
    for name, value in model.state_dict().items():
        assert torch.equal(torch.tensor(final["weights"][name]), value), f"{name} is not the trainer's"
    assert worker.returncode == 0, run.describe()


# ---------------------------------------------------------------------------------------------- the secret
def join_as(env: dict, wait_s: float) -> subprocess.CompletedProcess:
    """A process with ``env`` joining a live run's control plane; its outcome."""
    bootstrap = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    control = ControlPlane.serve("127.0.0.1", bootstrap.port, 30.0)
    code = f"from fabric_weightsync.control import ControlPlane; ControlPlane.join('127.0.0.1', {bootstrap.port}, {wait_s})"
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50)
    finally:
        control.close()


@pytest.mark.timeout(60)
def test_a_process_without_the_secret_is_refused_at_connect(tmp_path):
    """No secret in its environment and no file on this host (another temp dir): a clear error saying what to set."""
    env = clean_env(TMPDIR=str(tmp_path))
    env.pop(SECRET_ENV, None)
    done = join_as(env, 10.0)
    assert done.returncode != 0
    assert "MissingSecret" in done.stderr and SECRET_ENV in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_a_process_with_another_secret_is_refused_at_connect():
    done = join_as(clean_env(**{SECRET_ENV: "ab" * 32}), 2.0)
    assert done.returncode != 0
    assert "not signed with this process's secret" in done.stderr and SECRET_ENV in done.stderr, done.stderr


def test_the_secret_file_is_this_users_alone():
    bootstrap = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    control = ControlPlane.serve("127.0.0.1", bootstrap.port, 30.0)
    path = Path(control._secret_file)
    try:
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        control.close()
    assert not path.exists(), "the secret file outlived the run"


# ---------------------------------------------------------------------------------------------- signed values
def signed_pair(timeout: float = 1.0) -> tuple[dist.TCPStore, ControlStore]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    return server, ControlStore(server, Credentials(os.urandom(32), new_run_id()), timeout)


def test_signed_values_round_trip_and_forgeries_count_as_absent():
    raw, store = signed_pair()
    store.set("k", b"value")
    assert store.get("k") == b"value" and store.check(["k"]) and store.read("k") == b"value"
    assert raw.get("k") != b"value", "the value is stored without its MAC"
    raw.set("k", b"forged")  # a stranger's value
    assert store.read("k") is None and not store.check(["k"])
    with pytest.raises(dist.DistStoreError, match="'k'"):
        store.get("k")  # waits its timeout for a signed value, then names the key
    # A signed value moved to another key, or replayed into another run, is refused too.
    store.set("a", b"1")
    raw.set("b", raw.get("a"))
    other_run = ControlStore(raw, Credentials(store.credentials.secret, new_run_id()), 1.0)
    assert store.read("b") is None and other_run.read("a") is None


def test_a_wait_ends_when_the_real_value_replaces_a_forgery():
    raw, store = signed_pair(timeout=30.0)
    raw.set("k", b"forged")
    writer = ControlStore(dist.TCPStore("127.0.0.1", raw.port, is_master=False, timeout=timedelta(seconds=30)), store.credentials, 30.0)
    threading.Timer(0.2, lambda: writer.set("k", b"real")).start()
    assert store.get("k") == b"real"


@pytest.mark.timeout(150)
def test_a_pair_group_peer_without_the_secret_is_refused():
    """torch's rendezvous trusts the store; the proof after it does not: both ends of a mismatched pair refuse."""
    raw, store = signed_pair(timeout=60.0)  # the stranger's start (imports) may take long on a loaded machine
    code = (
        "import sys, datetime, torch.distributed as dist\n"
        "from fabric_weightsync.auth import ControlStore, Credentials\n"
        "from fabric_weightsync.channels import new_pair_group\n"
        f"raw = dist.TCPStore('127.0.0.1', {raw.port}, is_master=False, timeout=datetime.timedelta(seconds=30))\n"
        f"store = ControlStore(raw, Credentials(b'x' * 32, {store.credentials.run_id!r}), 60.0)\n"
        "try:\n    new_pair_group(store, 'pair', 1, 'gloo', 60.0)\nexcept Exception as err:\n    print('REFUSED', err)\n"
    )
    stranger = subprocess.Popen([sys.executable, "-c", code], env=clean_env(), stdout=subprocess.PIPE, text=True)
    with pytest.raises(ChannelError, match="does not hold this run's secret"):
        new_pair_group(store, "pair", 0, "gloo", 60.0)
    out, _ = stranger.communicate(timeout=60)
    assert "REFUSED" in out and "does not hold this run's secret" in out, out


# ---------------------------------------------------------------------------------------------- named files
def stranger_file(tmp_path: Path, name: str, nbytes: int, mode: int = 0o600) -> str:
    """A file in the shared-memory directory created by uid 65534 (by this user when not root)."""
    path = os.path.join(shm_dir(), name)
    code = (
        "import os, sys\n"
        "if os.getuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
        f"fd = os.open({path!r}, os.O_CREAT | os.O_WRONLY, {mode})\nos.ftruncate(fd, {nbytes})\nos.fchmod(fd, {mode})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    return path


@pytest.mark.skipif(os.getuid() != 0, reason="needs another uid to create the stranger's file")
def test_a_staging_file_of_another_user_is_refused(tmp_path):
    schema = WeightSchema.of(torch.nn.Linear(4, 4))
    path = stranger_file(tmp_path, f"{SHM_PREFIX}1-{'a' * 12}-0", schema.layout.nbytes, mode=0o666)
    try:
        with pytest.raises(ChannelError, match="this user's"):
            open_shared_buffer(path, schema)
    finally:
        os.unlink(path)


def test_a_staging_file_that_is_a_link_or_misnamed_is_refused(tmp_path):
    schema = WeightSchema.of(torch.nn.Linear(4, 4))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * schema.layout.nbytes)
    link = os.path.join(shm_dir(), f"{SHM_PREFIX}1-{'b' * 12}-0")
    os.symlink(target, link)
    try:
        with pytest.raises(ChannelError, match="cannot be opened"):
            open_shared_buffer(link, schema)
    finally:
        os.unlink(link)
    with pytest.raises(ChannelError, match="not a fabric_weightsync staging file"):
        open_shared_buffer(str(target), schema)
