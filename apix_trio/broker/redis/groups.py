"""Consumer groups in Redis: Redis Streams consumer groups on the channel stream.

Theory of operation
-------------------
A group is a Redis consumer group on the channel's stream
`<prefix>:{b<shard>}:<org>:c:<channel>` (see `keys`), named as the
client named it (the protocol allows only `[A-Za-z0-9_\\-:@]`); consumers are
`<node_id>:<conn id>`, and released events wait under `groups.RELEASED`.
Every operation is one Lua script on that one key (`redis_group_scripts`),
sent through the broker's `ScriptBatcher`, so group reads, claims and acks
share pipelined round trips with publishes:

- `join`: XGROUP CREATE <stream> <group> $ (BUSYGROUP ignored); nothing when
  the stream does not exist (no MKSTREAM: an empty stream would have no TTL),
  and `read_new` then creates the group at "0" once a publish created it;
- `read_new`: one XREADGROUP as the first consumer for the total count, then
  XCLAIM ... JUSTID of the round-robin shares of the others (count stays 1);
- `claim`: XCLAIM (count + 1); `claim_idle`: XAUTOCLAIM from the start of the
  PEL (bounded scan), then released entries beyond the scan, found directly
  with XPENDING on the holder;
- `touch`: XCLAIM ... JUSTID of the ids XPENDING shows the consumer still
  holds (an id claimed by somebody else is never taken back);
- `release`: XCLAIM ... IDLE <10 years> JUSTID to the holder, then XGROUP
  DELCONSUMER;
- `ack`: XACK; `ack_many`: XACK of several callers' id lists in one script
  (counts per list), which is how a node's group reader acks everything its
  members acked in one tick in one round trip; `pending`: XPENDING;
  `remove_idle_consumers`: XINFO CONSUMERS + XGROUP DELCONSUMER of those with no pending entries;
- `dead_letter`: the broker's own publish to `<channel>.dlq` (same script,
  same retention, bus and idempotency rules as any publish, so it fans out
  to that channel's subscribers), then XACK. `<channel>.dlq` usually lives in
  another hash slot, so the two cannot be one script on Redis Cluster;
  publish-then-ack with the idempotency key `dlq:<group>:<id>` makes a retry
  after a failure in between store nothing new.

Error handling: `BrokerUnavailable` from the batcher (timeouts, Redis down,
script errors) passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from apix_trio.broker.groups import (
    RELEASED,
    RELEASED_IDLE,
    ConsumerGroups,
    ConsumerInfo,
    Delivery,
    EventPublisher,
    GroupInfo,
    PendingEntry,
    publish_dead_letter,
)
from apix_trio.broker.model import Retention
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.group_admin import (
    ADVANCE_REDRIVE_CURSOR,
    GROUP_INFO,
    REDRIVE_CURSOR,
)
from apix_trio.broker.redis.group_scripts import (
    ACK,
    ACK_MANY,
    CLAIM,
    CLAIM_IDLE,
    JOIN,
    PENDING,
    READ_NEW,
    RELEASE,
    REMOVE_IDLE,
    TOUCH,
)
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event

PENDING_LIMIT = 100_000
"""Entries `pending` returns at most (it is for operators and tests)."""

_STREAM_CACHE_SIZE = 65_536
_RELEASED = RELEASED.encode()
_RELEASED_IDLE_MS = b"%d" % int(RELEASED_IDLE * 1000)


def _ms(seconds: float) -> bytes:
    return b"%d" % max(0, math.ceil(seconds * 1000))


def _event(event_id: str, flat: Sequence[str]) -> Event:
    """An Event from a channel stream entry's fields (the publish script
    writes `t d f [k]`, in that order: read them in place when they are)."""
    if len(flat) in (6, 8) and flat[0] == "t" and flat[2] == "d" and flat[4] == "f":
        key = flat[7] if len(flat) == 8 and flat[6] == "k" else None
        return Event(id=event_id, ts=int(flat[1]), data=flat[3], sender=flat[5], key=key)
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return Event(
        id=event_id, ts=int(fields["t"]), data=fields["d"], sender=fields["f"], key=fields.get("k")
    )


def _deliveries(reply: Any) -> list[Delivery]:
    """`[[id, fields, attempt], ...]` -> Deliveries."""
    return [Delivery(_event(entry[0], entry[1]), int(entry[2])) for entry in reply or []]


class RedisGroups(ConsumerGroups):
    """`ConsumerGroups` on a `RedisBroker`. See the module docstring."""

    def __init__(
        self, scripts: ScriptBatcher, publisher: EventPublisher, layout: KeyLayout
    ) -> None:
        self._scripts = scripts
        self._broker = publisher
        self._layout = layout
        self._streams: dict[tuple[str, str], bytes] = {}

    def _stream(self, org: str, channel: str) -> bytes:
        found = self._streams.get((org, channel))
        if found is None:
            if len(self._streams) >= _STREAM_CACHE_SIZE:
                self._streams.clear()
            found = self._layout.channel(org, channel).stream.encode()
            self._streams[org, channel] = found
        return found

    async def _call(
        self, script: Script, org: str, channel: str, *args: bytes, write: bool = True
    ) -> Any:
        return await self._scripts.call(
            script, (self._stream(org, channel),), args, write=write
        )

    async def join(self, org: str, channel: str, group: str) -> None:
        await self._call(JOIN, org, channel, group.encode())

    async def read_new(
        self, org: str, channel: str, group: str, wants: Sequence[tuple[str, int]]
    ) -> list[tuple[str, Delivery]]:
        wants = [(consumer, count) for consumer, count in wants if count > 0]
        if not wants:
            return []
        args = [group.encode()]
        for consumer, count in wants:
            args += [consumer.encode(), b"%d" % count]
        reply = await self._call(READ_NEW, org, channel, *args)
        return [
            (wants[int(index)][0], Delivery(_event(event_id, fields), 1))
            for index, event_id, fields in reply or []
        ]

    async def claim(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[Delivery]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        reply = await self._call(
            CLAIM, org, channel, group.encode(), consumer.encode(), *(i.encode() for i in unique)
        )
        return _deliveries(reply)

    async def claim_idle(
        self, org: str, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Delivery]:
        if count < 1:
            return []
        reply = await self._call(
            CLAIM_IDLE,
            org,
            channel,
            group.encode(),
            consumer.encode(),
            _ms(min_idle),
            b"%d" % count,
            _RELEASED,
        )
        return _deliveries(reply)

    async def touch(
        self, org: str, channel: str, group: str, consumer: str, ids: Sequence[str]
    ) -> list[str]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        reply = await self._call(
            TOUCH, org, channel, group.encode(), consumer.encode(), *(i.encode() for i in unique)
        )
        return [str(event_id) for event_id in reply or []]

    async def release(self, org: str, channel: str, group: str, consumer: str) -> int:
        reply = await self._call(
            RELEASE, org, channel, group.encode(), consumer.encode(), _RELEASED, _RELEASED_IDLE_MS
        )
        return int(reply)

    async def ack(self, org: str, channel: str, group: str, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return 0
        reply = await self._call(ACK, org, channel, group.encode(), *(i.encode() for i in unique))
        return int(reply)

    async def ack_many(
        self, org: str, channel: str, group: str, batches: Sequence[Sequence[str]]
    ) -> list[int]:
        if not batches:
            return []
        args = [group.encode()]
        for batch in batches:
            unique = list(dict.fromkeys(batch))
            args.append(b"%d" % len(unique))
            args += [i.encode() for i in unique]
        reply = await self._call(ACK_MANY, org, channel, *args)
        return [int(count) for count in reply]

    async def pending(
        self, org: str, channel: str, group: str, consumer: str | None = None
    ) -> list[PendingEntry]:
        args = [group.encode(), b"%d" % PENDING_LIMIT]
        if consumer is not None:
            args.append(consumer.encode())
        reply = await self._call(PENDING, org, channel, *args, write=False)
        return [
            PendingEntry(str(event_id), str(owner), int(count), int(idle) / 1000)
            for event_id, owner, idle, count in reply or []
        ]

    async def dead_letter(
        self, org: str, channel: str, group: str, delivery: Delivery, retention: Retention
    ) -> Event:
        dead = await publish_dead_letter(self._broker, org, channel, group, delivery, retention)
        await self.ack(org, channel, group, [delivery.event.id])
        return dead

    async def remove_idle_consumers(
        self, org: str, channel: str, group: str, min_idle: float
    ) -> list[str]:
        reply = await self._call(REMOVE_IDLE, org, channel, group.encode(), _ms(min_idle))
        return [str(name) for name in reply or []]

    async def info(self, org: str, channel: str, group: str) -> GroupInfo | None:
        reply = await self._call(GROUP_INFO, org, channel, group.encode(), write=False)
        if reply is None:
            return None
        return GroupInfo(
            tuple(
                ConsumerInfo(str(name), int(pending), int(idle) / 1000)
                for name, pending, idle in reply
            )
        )

    def _cursor_key(self, org: str, channel: str) -> tuple[bytes, ...]:
        return (self._layout.redrive_cursors(org, channel).encode(),)

    async def redrive_cursor(self, org: str, channel: str, group: str) -> str:
        keys = self._cursor_key(org, channel)
        return str(await self._scripts.call(REDRIVE_CURSOR, keys, (group.encode(),), write=False))

    async def advance_redrive_cursor(
        self, org: str, channel: str, group: str, event_id: str
    ) -> str:
        canonical = ids.format_id(ids.parse_id(event_id))  # ValueError before anything is sent
        args = (group.encode(), canonical.encode())
        keys = self._cursor_key(org, channel)
        return str(await self._scripts.call(ADVANCE_REDRIVE_CURSOR, keys, args, write=True))
