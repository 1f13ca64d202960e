"""Latency snapshots in Redis: one hash per org.

    <prefix>:<org>:lat   hash  field "<slot>:<node>" = snapshot payload (JSON);
                               PEXPIRE SNAPSHOT_TTL after every write

One script call per org per round (`PUT`): HSET the org's new snapshots,
HDEL the fields older than the oldest slot kept (the hash holds at most
`RING_SLOTS` slots per node, so the walk is short), PEXPIRE. Reading is one
HGETALL-like script (`READ`), filtered by slot in Python. Each script
touches one key (Redis Cluster safe without a hash tag).

Every call goes through the broker's `ScriptBatcher`; `BrokerUnavailable`
passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from apix_trio.broker.latency import SNAPSHOT_TTL, LatencySnapshots
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script

PUT = Script(
    "latency_put",
    """
-- KEYS: the org's snapshot hash
-- ARGV: oldest slot kept, ttl_ms, then (field, payload) pairs
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local oldest = tonumber(ARGV[1])
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local slot = tonumber(string.match(field, '^(-?%d+):'))
  if slot == nil or slot < oldest then
    redis.call('HDEL', KEYS[1], field)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""",
)

READ = Script(
    "latency_read",
    """
-- KEYS: the org's snapshot hash. Returns field, payload, field, payload, ...
return redis.call('HGETALL', KEYS[1])
""",
)

LATENCY_SCRIPTS = (PUT, READ)


class RedisLatencySnapshots(LatencySnapshots):
    """See the module docstring. Made by `RedisBroker.latency`."""

    def __init__(self, scripts: ScriptBatcher, layout: KeyLayout) -> None:
        self._scripts = scripts
        self._layout = layout

    async def put_many(
        self, node: str, snapshots: Sequence[tuple[str, int, bytes]], oldest_slot: int
    ) -> None:
        by_org: dict[str, list[bytes]] = {}
        for org, slot, payload in snapshots:
            by_org.setdefault(org, []).extend((f"{slot}:{node}".encode(), bytes(payload)))
        ttl_ms = b"%d" % math.ceil(SNAPSHOT_TTL * 1000)
        failure: BrokerUnavailable | None = None

        async def put(org: str, fields: list[bytes]) -> None:
            nonlocal failure
            key = self._layout.latency(org).encode()
            try:
                await self._scripts.call(
                    PUT, (key,), (b"%d" % oldest_slot, ttl_ms, *fields), write=True
                )
            except BrokerUnavailable as exc:  # re-raised once every org is done
                failure = failure or exc

        async with trio.open_nursery() as nursery:
            for org, fields in by_org.items():
                nursery.start_soon(put, org, fields)
        if failure is not None:
            raise failure

    async def read(self, org: str, oldest_slot: int) -> list[tuple[int, str, bytes]]:
        key = self._layout.latency(org).encode()
        flat = await self._scripts.call(READ, (key,), (), write=False)
        out: list[tuple[int, str, bytes]] = []
        for field, payload in zip(flat[::2], flat[1::2], strict=True):
            slot_text, _, node = str(field).partition(":")
            try:
                slot = int(slot_text)
            except ValueError:
                continue
            if slot >= oldest_slot:
                text = payload if isinstance(payload, str) else bytes(payload).decode()
                out.append((slot, node, text.encode()))
        out.sort()
        return out
