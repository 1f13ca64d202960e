"""Connection leases in Redis: one sorted set per org, members scored by expiry.

    <prefix>:<org>:conns   zset  member = <node_id>:<conn id>, score = expiry (ms, Redis TIME)

Acquire is one Lua script (drop expired, count, add) so two nodes can never
both take the last slot. Scores use Redis' own clock, so node clocks do not
matter. The org is escaped like every other key part; no hash tag is needed
(each script touches one key), so this is Redis Cluster safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from apix_trio.broker.leases import ConnectionLeases
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import escape
from apix_trio.broker.redis.scripts import Script

ACQUIRE = Script(
    "lease_acquire",
    """
-- KEYS: org zset; ARGV: member, limit, ttl_ms. Returns 1 when leased.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
""",
)

REFRESH = Script(
    "lease_refresh",
    """
-- KEYS: org zset; ARGV: ttl_ms, members... Only members still present move.
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
""",
)

RELEASE = Script(
    "lease_release",
    """
-- KEYS: org zset; ARGV: members...
return redis.call('ZREM', KEYS[1], unpack(ARGV))
""",
)

COUNT = Script(
    "lease_count",
    """
-- KEYS: org zset. Live leases only.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
""",
)


class RedisLeases(ConnectionLeases):
    def __init__(self, scripts: ScriptBatcher, prefix: str) -> None:
        self._scripts = scripts
        self._prefix = prefix

    def _key(self, org: str) -> bytes:
        return f"{self._prefix}:{escape(org)}:conns".encode()

    async def acquire(self, org: str, member: str, limit: int, ttl: float) -> bool:
        args = (member.encode(), b"%d" % limit, b"%d" % int(ttl * 1000))
        reply = await self._scripts.call(ACQUIRE, (self._key(org),), args, write=True)
        return int(reply) == 1

    async def refresh(self, org: str, members: Sequence[str], ttl: float) -> None:
        if members:
            args = (b"%d" % int(ttl * 1000), *(m.encode() for m in members))
            await self._scripts.call(REFRESH, (self._key(org),), args, write=True)

    async def release(self, org: str, members: Sequence[str]) -> None:
        if members:
            args = tuple(m.encode() for m in members)
            await self._scripts.call(RELEASE, (self._key(org),), args, write=True)

    async def count(self, org: str) -> int:
        return int(await self._scripts.call(COUNT, (self._key(org),), (), write=False))
