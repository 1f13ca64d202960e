"""The connection directory in Redis (see `broker/directory.py`).

    <prefix>:{o:<org>}:dir:conns   hash  conn -> JSON [lease member, sub, since ms, node]
    <prefix>:{o:<org>}:dir:nodes   zset  lease member (<node>#<incarnation>) -> expiry (ms)

Both keys of an org share one hash slot (the `{o:<org>}` tag), so every
change is one script on one slot. Expiry uses Redis' own clock (TIME), so
node clocks do not matter. Both keys expire `2 x ttl` after the last write
or refresh: an org whose nodes all died leaves nothing behind.

`find` reads the whole hash of the org (HGETALL in the script): it is an
admin read, O(connections of the org); records of lapsed leases are deleted
on the way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import orjson

from apix_trio.broker.directory import (
    ConnectionDirectory,
    ConnectionListing,
    ConnectionRecord,
    NodeLease,
)
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ADD = Script(
    "directory_add",
    _NOW
    + """
-- KEYS: conns, nodes. ARGV: member, ttl_ms, then conn, record pairs.
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return 1
""",
)

REFRESH = Script(
    "directory_refresh",
    _NOW
    + """
-- KEYS: conns, nodes. ARGV: member, ttl_ms. Returns 1 when the lease was alive.
local ttl = tonumber(ARGV[2])
local until_ms = redis.call('ZSCORE', KEYS[2], ARGV[1])
local alive = until_ms and tonumber(until_ms) > now
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
end
if alive then return 1 end
return 0
""",
)

REMOVE = Script(
    "directory_remove",
    """
-- KEYS: conns. ARGV: conns.
return redis.call('HDEL', KEYS[1], unpack(ARGV))
""",
)

RELEASE = Script(
    "directory_release",
    """
-- KEYS: nodes. ARGV: member.
return redis.call('ZREM', KEYS[1], ARGV[1])
""",
)

FIND = Script(
    "directory_find",
    _NOW
    + """
-- KEYS: conns, nodes. ARGV: sub, conn, exclude node (each '' for none, else
-- '=' .. value), limit. Returns {total, record, record, ...} (first `limit`
-- by since, conn); deletes the records of lapsed leases.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local function wanted(arg)
  if arg == '' then return nil end
  return string.sub(arg, 2)
end
local sub, conn, exclude = wanted(ARGV[1]), wanted(ARGV[2]), wanted(ARGV[3])
local entries
if conn then
  local value = redis.call('HGET', KEYS[1], conn)
  if value then entries = {conn, value} else entries = {} end
else
  entries = redis.call('HGETALL', KEYS[1])
end
local alive = {}
local dead = {}
local live = {}
for i = 1, #entries, 2 do
  local record = cjson.decode(entries[i + 1])
  local member = record[1]
  if alive[member] == nil then
    alive[member] = redis.call('ZSCORE', KEYS[2], member) ~= false
  end
  if not alive[member] then
    dead[#dead + 1] = entries[i]
  elseif (not sub or record[2] == sub) and (not exclude or record[4] ~= exclude) then
    live[#live + 1] = {record[3], entries[i], entries[i + 1]}
  end
end
for i = 1, #dead, 1000 do
  redis.call('HDEL', KEYS[1], unpack(dead, i, math.min(i + 999, #dead)))
end
table.sort(live, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local out = {#live}
local limit = tonumber(ARGV[4])
for i = 1, math.min(limit, #live) do
  out[#out + 1] = live[i][2]
  out[#out + 1] = live[i][3]
end
return out
""",
)


def _ms(seconds: float) -> bytes:
    return b"%d" % max(1, math.ceil(seconds * 1000))


def _filter(value: str | None) -> bytes:
    return b"" if value is None else b"=" + value.encode()


class RedisDirectory(ConnectionDirectory):
    def __init__(self, scripts: ScriptBatcher, layout: KeyLayout) -> None:
        self._scripts = scripts
        self._layout = layout

    def _keys(self, org: str) -> tuple[bytes, bytes]:
        conns, nodes = self._layout.directory(org)
        return conns.encode(), nodes.encode()

    async def add(
        self, org: str, lease: NodeLease, records: Sequence[ConnectionRecord], ttl: float
    ) -> None:
        args: list[bytes] = [lease.member.encode(), _ms(ttl)]
        for record in records:
            value = orjson.dumps([lease.member, record.sub, record.since, lease.node])
            args += [record.conn.encode(), value]
        await self._scripts.call(ADD, self._keys(org), tuple(args), write=True)

    async def remove(self, org: str, conns: Sequence[str]) -> None:
        if conns:
            keys = self._keys(org)[:1]
            args = tuple(conn.encode() for conn in conns)
            await self._scripts.call(REMOVE, keys, args, write=True)

    async def refresh(self, org: str, lease: NodeLease, ttl: float) -> bool:
        args = (lease.member.encode(), _ms(ttl))
        return int(await self._scripts.call(REFRESH, self._keys(org), args, write=True)) == 1

    async def release(self, org: str, lease: NodeLease) -> None:
        keys = self._keys(org)[1:]
        await self._scripts.call(RELEASE, keys, (lease.member.encode(),), write=True)

    async def find(
        self,
        org: str,
        *,
        sub: str | None = None,
        conn: str | None = None,
        exclude_node: str | None = None,
        limit: int = 100,
    ) -> ConnectionListing:
        args = (_filter(sub), _filter(conn), _filter(exclude_node), b"%d" % max(limit, 0))
        reply = await self._scripts.call(FIND, self._keys(org), args, write=True)
        total, flat = int(reply[0]), reply[1:]
        records = []
        for conn_id, value in zip(flat[::2], flat[1::2], strict=True):
            _member, record_sub, since, node = orjson.loads(value)
            records.append(ConnectionRecord(str(conn_id), record_sub, node, int(since)))
        return ConnectionListing(tuple(records), total)
