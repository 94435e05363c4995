"""Data planes of a transport, one backend per module, each registered under its name (see :mod:`.base`)."""

from fabric_weightsync.channels import group, shm
from fabric_weightsync.channels.base import Channel, ChannelError, ChannelTimeout, Endpoint, channel_named, choose, host_id
from fabric_weightsync.channels.board import SharedStaging
from fabric_weightsync.channels.group import new_pair_group

__all__ = [
    "Channel", "ChannelError", "ChannelTimeout", "Endpoint", "SharedStaging", "channel_named", "choose", "group",
    "host_id", "new_pair_group", "shm",
]  # fmt: skip
