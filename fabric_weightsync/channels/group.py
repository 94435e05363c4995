"""The process-group data plane: one ``send`` of the wire storage on a standalone two-rank group (any host).

Signalling goes through the control store: the sender sets the worker's instruction key, the worker answers
with its ready key once its receive is posted, the sender sends, and the worker acks. A worker that applies
updates into a landing buffer of its own *arms* the channel instead: right after applying an update it posts
the receive of the next one and says so in its ack, so the next update is sent without instruction, lands while
the worker runs, and a poll is a memory read. A gloo receive cannot be asked whether it finished without
waiting on it (a wait that times out breaks the group), so the worker fills the buffer's last word with a random
mark before posting: gloo's TCP pairs write a message in order, so the update's own bytes overwrite it last, and
the work's wait still confirms every byte before the update is taken.

An armed worker that was busy when an update landed first asks the store for the newest version staged; if it
was superseded meanwhile it drops it, re-arms, answers ``superseded, armed`` and waits for the newest, which
the sender sends next. It asks only when the update may have waited longer than such a fetch takes (what its
last fetches took), so a fetch never blocks longer than the staleness it removes.
"""

import random
import time
from datetime import timedelta
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

import fabric_weightsync.protocol as protocol
from fabric_weightsync.auth import ControlStore, prove_pair
from fabric_weightsync.channels.base import ChannelError, ChannelTimeout, Endpoint, register
from fabric_weightsync.protocol import StoreTimeout, await_key, poll_until, worker_keys
from fabric_weightsync.weights import WeightSchema
from fabric_weightsync.wire import WireBuffer

FRESH_S = 0.0005
"""An armed worker that looked this recently takes what landed without asking whether it is still the newest:
the answer, a store round trip away, would be no fresher. Raised to what fetching the newest took lately."""


def new_pair_group(store: Union[ControlStore, dist.Store], name: str, group_rank: int, backend: str, timeout: float) -> dist.ProcessGroup:
    """A standalone two-rank process group on ``store``: outside the default group and the trainers' world.

    On a store with the run's credentials, the peer has shown it holds the run's secret before this returns
    (torch's rendezvous alone trusts whatever the store holds).
    """
    signed = store if isinstance(store, ControlStore) else None
    prefixed = dist.PrefixStore(name, store if signed is None else signed.raw)  # torch's rendezvous writes its own values
    if backend == "gloo":
        group, device = dist.ProcessGroupGloo(prefixed, group_rank, 2, timedelta(seconds=timeout)), torch.device("cpu")
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout)
        group, device = dist.ProcessGroupNCCL(prefixed, group_rank, 2, options), torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"Unsupported backend {backend!r}: use 'gloo' or 'nccl'")
    if signed is not None and signed.credentials is not None:
        try:
            prove_pair(group, signed.credentials, name, group_rank, device)
        except RuntimeError as err:
            raise ChannelError(str(err)) from err
    return group


class _ArmedReceive(NamedTuple):
    work: dist.Work
    wire: WireBuffer
    last_word: memoryview
    mark: int


@register
class GroupChannel:
    """Sends the wire storage as one message on a two-rank group (sender rank 0, worker rank 1)."""

    name = "group"
    priority = 0  # serves any worker: the fallback
    carries_bytes = True
    applied_row = None

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.group = endpoint.group
        self._keys = worker_keys(endpoint.rank) if endpoint.rank is not None else None
        self._pending: Optional[dist.Work] = None
        # sender side
        self._peer_armed = False
        self._instructed = False
        self._ready_taken = False
        self._ack_key_read = False
        # worker side
        self._armed: Optional[_ArmedReceive] = None
        self._last_words: dict[int, memoryview] = {}
        self._marks = random.Random()  # its own: drawing from the global one would shift a seeded user's stream
        self._looked_at = 0.0
        self._fetch_s: Optional[float] = None  # what fetching the newest took lately (smoothed); none yet

    @classmethod
    def accepts(cls, preferred: str, hello: dict) -> bool:
        return True

    @classmethod
    def for_sender(cls, endpoint: Endpoint, schema: WeightSchema) -> "GroupChannel":
        return cls(endpoint)

    @classmethod
    def for_receiver(cls, endpoint: Endpoint, verdict: dict, schema: WeightSchema) -> "GroupChannel":
        endpoint.group_name, endpoint.latest_key = verdict["group"], verdict.get("latest")
        return cls(endpoint)

    def verdict(self) -> dict:
        return {"channel": self.name, "group": self.endpoint.group_name, "latest": self.endpoint.latest_key}

    def connect(self, group_rank: int) -> None:
        if self.group is None:
            e = self.endpoint
            self.group = new_pair_group(e.store, e.group_name, group_rank, e.backend, e.timeout)

    def sender_buffer(self, wire: WireBuffer) -> WireBuffer:
        return wire

    def sends_from(self, wire: WireBuffer) -> bool:
        return True

    def stage(self, wire: WireBuffer, write: Callable[[], None]) -> None:
        write()  # the transport finished any send from this buffer before it restages

    # ------------------------------------------------------------------ sender
    def await_ready(self, timeout: Optional[float]) -> None:
        """Instruct the worker (unless its receive is armed) and wait for its ready key."""
        if self._peer_armed or self._ready_taken:
            return
        store = self.endpoint.store
        if not self._instructed:
            store.set(self._keys.instruction, protocol.INSTRUCTION)
            self._instructed = True
            self._drop_read_ack()  # while the worker notices the instruction: it cannot ack before it is ready
        try:
            store.wait([self._keys.ready], timedelta(seconds=self.endpoint.timeout if timeout is None else timeout))
        except dist.DistStoreError as err:
            raise ChannelTimeout(f"Timed out waiting for worker rank {self.endpoint.rank} to post its receive ({self._keys.ready!r})") from err
        self._instructed, self._ready_taken = False, True

    def post(self, wire: WireBuffer, tag: int) -> None:
        self._drop_read_ack()  # the worker may ack as soon as this lands: the old ack must be gone first
        self._pending = self._group().send([wire.storage], 1, tag)
        if self._ready_taken:
            self.endpoint.store.delete_key(self._keys.ready)  # after posting: off the worker's critical path
            self._ready_taken = False

    def wait_sent(self) -> None:
        if self._pending is not None:
            work, self._pending = self._pending, None
            self._wait(work, "sending")

    def wait_ack(self, timeout: Optional[float]) -> bytes:
        try:
            status = await_key(self.endpoint.store, self._keys.ack, f"for the ack of worker rank {self.endpoint.rank}", timeout)
        except StoreTimeout as err:
            raise ChannelTimeout(str(err)) from err
        self._ack_key_read = True  # deleted later (_drop_read_ack), off the path of this ack
        self._peer_armed = status in (protocol.ACK_ARMED, protocol.SUPERSEDED)
        return status

    def tidy(self) -> None:
        """Delete the ack read last now, when the caller has time, so the next send need not."""
        self._drop_read_ack()

    def _drop_read_ack(self) -> None:
        if self._ack_key_read:
            self.endpoint.store.delete_key(self._keys.ack)
            self._ack_key_read = False

    # ------------------------------------------------------------------ worker
    def take_notice(self, timeout: float) -> bool:
        if self._armed is not None:
            return self._notice_landed(timeout)
        store, aborted = self.endpoint.store, self.endpoint.aborted
        if not poll_until(lambda: store.delete_key(self._keys.instruction), timeout, max_pause=protocol.STORE_POLL_S, aborted=aborted):
            return False
        store.set(self._keys.ready, protocol.READY)
        return True

    def receive(self, landing: WireBuffer, tag: int, land: bool) -> WireBuffer:
        """Receive into ``landing`` (a process group always lands the update there); armed, take what landed."""
        if self._armed is None:
            self._wait(self._group().recv([landing.storage], 0, tag), "receiving")
            return landing
        armed, self._armed = self._armed, None
        if armed.wire is not landing:
            raise ChannelError("the update was armed to land in another buffer")
        self._wait(armed.work, "receiving")
        return landing

    def acknowledge(self, version: int, word: bytes, arm: Optional[WireBuffer]) -> None:
        # The ack may announce the receive before it is posted: a gloo send waits for its receive anyway.
        arm = arm if word == protocol.ACK and arm is not None and arm.storage.is_cpu else None
        self.endpoint.store.set(self._keys.ack, protocol.ACK_ARMED if arm is not None else word)
        if arm is not None:
            self._arm(arm)
            self._looked_at = time.monotonic()

    def _notice_landed(self, timeout: float) -> bool:
        landed_earlier = self._landed()  # it may have landed at any time since this worker last looked
        if not landed_earlier and not poll_until(self._landed, timeout, aborted=self.endpoint.aborted):
            self._looked_at = time.monotonic()
            return False
        if landed_earlier and self._superseded():
            self._fetch_newest()
        return True

    def _arm(self, wire: WireBuffer) -> None:
        """Post the receive of the next update into ``wire`` (host memory) now, ahead of any notice of it."""
        storage = wire.storage
        last_word = self._last_words.get(storage.data_ptr())
        if last_word is None:  # the landing buffers alternate between two storages: map each one once
            last_word = self._last_words[storage.data_ptr()] = memoryview(storage[-8:].view(torch.int64).numpy())
        mark = self._marks.getrandbits(63)  # an update whose last word equals it would go unnoticed: 1 in 2**63
        last_word[0] = mark
        self._armed = _ArmedReceive(self._group().recv([storage], 0, protocol.UPDATE_TAG), wire, last_word, mark)

    def _landed(self) -> bool:
        return self._armed.last_word[0] != self._armed.mark

    def _superseded(self) -> bool:
        """Whether the update that landed since the last look was superseded meanwhile (a store round trip).

        Not asked without a latest key, nor when the last look is more recent than fetching the newest takes: the
        update is then at most that stale. The version is read before the receive is confirmed: the header comes
        first, and a wrong guess only costs a resend.
        """
        latest_key = self.endpoint.latest_key
        if latest_key is None or time.monotonic() - self._looked_at < max(FRESH_S, self._fetch_s or 0.0):
            return False
        latest = self.endpoint.store.read(latest_key)
        return latest is not None and latest.isdigit() and int(latest) > self._armed.wire.version

    def _fetch_newest(self) -> None:
        """Drop the superseded update that landed, re-arm, and wait for the newest, which the sender sends once it
        reads ``superseded, armed``."""
        wire = self._armed.wire
        self.receive(wire, protocol.UPDATE_TAG, True)
        self._arm(wire)
        self.endpoint.store.set(self._keys.ack, protocol.SUPERSEDED)
        asked = time.monotonic()
        if not poll_until(self._landed, self.endpoint.timeout, aborted=self.endpoint.aborted):
            raise ChannelTimeout(f"Worker rank {self.endpoint.rank} dropped a superseded update and the newest one did not come")
        took = time.monotonic() - asked  # smoothed: one slow fetch (a trainer busy elsewhere) moves it a quarter
        self._fetch_s = took if self._fetch_s is None else 0.75 * self._fetch_s + 0.25 * took

    # ------------------------------------------------------------------ both
    def wake(self, store: ControlStore) -> None:
        store.set(self._keys.ready, protocol.ABORT)
        store.set(self._keys.ack, protocol.ABORT)

    def close(self) -> None:
        """Drop the group; an armed receive goes with it (its buffer stays referenced by the work until then)."""
        self.group, self._armed = None, None

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise ChannelError("not connected, or an earlier transfer failed")
        return self.group

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.endpoint.timeout))
        except RuntimeError as err:
            self.group = None  # a group whose transfer failed cannot be trusted again
            raise ChannelError(f"{what} failed: {err}") from err
