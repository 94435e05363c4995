"""The control protocol in one place: key names, and the one poll helper every wait of the library uses."""

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

import fabric_weightsync.protocol as protocol
from fabric_weightsync.protocol import Aborted, StoreTimeout, await_key, poll_until, worker_keys


def test_worker_keys_keep_torchrl_names_and_never_collide():
    keys = worker_keys(3)
    assert (keys.instruction, keys.ack) == ("NODE_3_in", "NODE_3_out"), "TorchRL's DistributedTransport names"
    everyone = [key for rank in range(1, 20) for key in worker_keys(rank)]
    assert len(everyone) == len(set(everyone)), "every key of every worker is distinct"
    assert protocol.weights_group_name(3, 0) != protocol.weights_group_name(3, 1), "each connection its own group"
    names = {protocol.experience_key(2, rank, 1, name) for rank in (0, 1) for name in ("schema", "accept", "credit")}
    assert len(names) == 6 and not names & {protocol.experience_epoch_key(2, 0), protocol.experience_epoch_key(2, 1)}
    assert protocol.experience_group_name(2, 0, 1) != protocol.experience_group_name(2, 1, 1), "one group per rank"


def test_ack_words_are_distinct():
    words = [protocol.INSTRUCTION, protocol.READY, *protocol.ACK_WORDS, protocol.ABORT]
    assert len(words) == len(set(words))


def test_poll_until_returns_at_once_when_ready_and_reads_no_clock():
    calls = []
    assert poll_until(lambda: calls.append(1) or True, 0.0, sleep=lambda s: pytest.fail("slept"))
    assert calls == [1]


def test_poll_until_backs_off_up_to_its_max_pause_then_times_out():
    pauses, looks = [], []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    assert not poll_until(lambda: looks.append(1) and False, 0.05, max_pause=0.004, sleep=sleep)
    assert pauses[0] == protocol.FIRST_PAUSE_S
    growth = pauses[:-1]  # the last pause is cut to the deadline
    assert growth == sorted(growth) and max(pauses) <= 0.004, pauses
    assert len(looks) == len(pauses) + 1


def test_poll_until_waits_for_a_condition_that_turns_true():
    countdown = iter(range(5, -1, -1))
    assert poll_until(lambda: next(countdown) == 0, None, sleep=lambda s: None)


def test_poll_until_raises_when_aborted():
    with pytest.raises(Aborted):
        poll_until(lambda: False, None, aborted=lambda: True, sleep=lambda s: None)


def test_await_key_names_what_it_waited_for_and_the_key():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    store.set("there", b"value")
    assert await_key(store, "there", "for nothing", timeout=1.0) == b"value"
    with pytest.raises(StoreTimeout, match=r"Timed out waiting for the trainer \(store key 'missing'\)"):
        await_key(store, "missing", "for the trainer", timeout=0.1)
