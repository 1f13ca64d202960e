"""Listing an org's channels in Redis: a bounded SCAN over its stream keys.

A channel that retains history has a stream key
`<prefix>:{b<shard>}:<org>:c:<channel>` (`keys`); nothing else has `:c:`
in that place, and escaping leaves no glob character in the org or the
channel prefix, so `SCAN MATCH <that pattern> TYPE stream` finds exactly the
org's retained channels. The SCAN runs inside a script (one keyless
EVALSHA per step, through the `ScriptBatcher` like every other Redis call),
`SCAN_COUNT` keys per step and at most `LIST_SCAN_BUDGET` keys examined in
all, so a listing never stalls Redis on a huge keyspace; the channels'
positions are then read with the ordinary read script, concurrently.

On Redis Cluster a keyless script runs on one node, so only the channels of
that node are found (docs/http-api.md says so).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from apix_trio.broker.model import BrokerUnavailable, ChannelInfo
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script
from apix_trio.protocol.names import is_channel

SCAN_COUNT = 1000
"""Keys one SCAN step examines."""
LIST_SCAN_BUDGET = 200_000
"""Keys one listing examines at most (SCAN_COUNT per step)."""

SCAN_STREAMS = Script(
    "scan_streams",
    """
-- KEYS: none. ARGV: cursor, pattern, count. Returns {next cursor, {keys...}}.
return redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3], 'TYPE', 'stream')
""",
)


async def list_channels(
    scripts: ScriptBatcher,
    layout: KeyLayout,
    position: Callable[[str, str], Awaitable[str]],
    org: str,
    prefix: str,
    limit: int,
) -> list[ChannelInfo]:
    """See `Broker.list_channels`; `position(org, channel)` reads a channel's last id.

    Error handling: BrokerUnavailable from the batcher passes through.
    """
    if limit < 1:
        return []
    pattern = layout.stream_pattern(org, prefix).encode()
    names: set[str] = set()
    cursor = b"0"
    examined = 0
    while examined < LIST_SCAN_BUDGET:
        reply = await scripts.call(
            SCAN_STREAMS, (), (cursor, pattern, b"%d" % SCAN_COUNT), write=False
        )
        cursor = str(reply[0]).encode()
        examined += SCAN_COUNT
        for key in reply[1] or []:
            channel = layout.channel_of_stream(org, str(key))
            if channel is not None and channel.startswith(prefix) and is_channel(channel):
                names.add(channel)
        if cursor == b"0":
            break
    chosen = sorted(names)[:limit]
    positions: dict[str, str] = {}
    failures: list[BrokerUnavailable] = []

    async def read(channel: str) -> None:
        try:
            positions[channel] = await position(org, channel)
        except BrokerUnavailable as exc:  # raised once, below, not as a group
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for channel in chosen:
            nursery.start_soon(read, channel)
    if failures:
        raise failures[0]
    return [ChannelInfo(channel, positions[channel]) for channel in chosen]
