"""Presence in Redis: a few small keys per channel, changes on the bus.

Theory of operation
-------------------
A channel's presence lives in five keys in the hash slot of its
pseudo-channel `$presence.<channel>` (`keys.KeyLayout.presence`): members
(conn -> member JSON), join order (a zset scored by a join counter), nodes
(conn -> node incarnation), users (sub -> count) and meta (last position,
join counter). Each change is one Lua script that updates them, computes the
next position like `publish` computes an event id, and appends the change
to the slot's bus shard in the bus entry format of `bus.py` (channel
`$presence.<channel>`, `from` the sub, `key` the conn): change and fan-out
are one atomic step, so every node sees every change once, in order.

- `join`: already a member -> re-tag its node, nothing sent; `max_members`
  reached -> nothing; else add, and append the `join`;
- `leave`: remove and append the `leave` (nothing for a non-member);
- `reap`: per channel, remove every member of a dead node, one `leave` each;
- `members`: ZRANGE of the join order, HMGET, the counts, the last position.

A channel whose last member left keeps only its meta key (the last
position), expiring `TOMBSTONE_GRACE` later.

Node leases: the zset `<prefix>:{presence}:nodes`, incarnation -> expiry
(Redis TIME, ms). A reaper must find the channels where a dead node had
members without scanning the keyspace, so each node keeps an index set
`<prefix>:{presence}:idx:<node>` of `[org, channel]`. The index lives in
another slot than the channels, so it cannot change in the join script: the
node adds a channel to its index *before* its first join there, and removes
it after its last local member there left (`_Indexed` below: a count of
members and joins in flight, and a lock so a removal and a re-adding never
cross). An index entry without members is harmless (the reaper finds
nothing there); a member without an index entry cannot happen.

`reap`: the expired incarnations (ZRANGEBYSCORE), for each the channels of
its index (SSCAN), one reap script per channel (concurrently, so the batcher
pipelines them), then the lease and the index are dropped if the lease is
still expired. Reap scripts are atomic per channel: two reapers racing
remove and announce every member exactly once.

Error handling: `BrokerUnavailable` from the batcher passes through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import trio

from apix_trio.broker.model import TOMBSTONE_GRACE
from apix_trio.broker.presence import (
    JoinOutcome,
    JoinStatus,
    Leaver,
    PresenceStore,
    Snapshot,
    presence_channel,
)
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script

REAP_CONCURRENCY = 64
"""Channel reap scripts of one `reap` in flight at once."""
EXPIRED_PER_CALL = 16
"""Dead incarnations one `reap` handles (the next call takes the rest)."""
INDEX_PAGE = 500

# KEYS of every channel script: members, order, nodes, users, meta, bus, bus_seq.
# ARGV tail shared by the changing scripts: org, pseudo-channel, bus maxlen, tombstone ms.
_CHANGE = """
local members, order, nodes, users, meta, bus, bus_seq =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The next position after the channel's last one (as `publish` makes ids).
local function next_position(now)
  local last = redis.call('HGET', meta, 'last') or '0-0'
  local dash = string.find(last, '-', 1, true)
  local last_ms = tonumber(string.sub(last, 1, dash - 1))
  local last_seq = tonumber(string.sub(last, dash + 1))
  local ms, seq = now, 0
  if now <= last_ms then ms, seq = last_ms, last_seq + 1 end
  local ts = string.format('%.0f', ms)
  local id = ts .. '-' .. string.format('%.0f', seq)
  redis.call('HSET', meta, 'last', id)
  return id, ts
end

-- Append one change to the bus, in bus.py's entry format.
local function announce(kind, member, sub, conn, org, pseudo, maxlen, now)
  local id, ts = next_position(now)
  local n = string.format('%.0f', redis.call('INCR', bus_seq))
  local data = '{"' .. kind .. '":' .. member .. '}'
  local packed = cjson.encode({n, org, pseudo, id, ts, sub, conn, data})
  redis.call('XADD', bus, 'MAXLEN', '~', maxlen, '*', 'e', packed)
  return id
end

-- Remove a member (present) and announce its leave; returns {member, node}.
local function remove(conn, org, pseudo, maxlen, tombstone_ms, now)
  local member = redis.call('HGET', members, conn)
  local node = redis.call('HGET', nodes, conn) or ''
  local sub = cjson.decode(member)['sub']
  redis.call('HDEL', members, conn)
  redis.call('ZREM', order, conn)
  redis.call('HDEL', nodes, conn)
  if redis.call('HINCRBY', users, sub, -1) <= 0 then
    redis.call('HDEL', users, sub)
  end
  announce('leave', member, sub, conn, org, pseudo, maxlen, now)
  if redis.call('HLEN', members) == 0 then
    redis.call('PEXPIRE', meta, tombstone_ms)
  end
  return {member, node}
end
"""

JOIN = Script(
    "presence_join",
    _CHANGE
    + """
-- ARGV: org, pseudo, maxlen, tombstone_ms, conn, node, sub, head, tail, max_members
-- head .. since .. tail is the member's JSON.
-- Returns {'joined' | 'already' | 'full', position, previous node (already)}.
local org, pseudo, maxlen = ARGV[1], ARGV[2], ARGV[3]
local conn, node, sub = ARGV[5], ARGV[6], ARGV[7]
local previous = redis.call('HGET', nodes, conn)
if previous then
  redis.call('HSET', nodes, conn, node)
  return {'already', redis.call('HGET', meta, 'last') or '0-0', previous}
end
if redis.call('HLEN', members) >= tonumber(ARGV[10]) then
  return {'full', redis.call('HGET', meta, 'last') or '0-0', ''}
end
local now = now_ms()
local member = ARGV[8] .. string.format('%.0f', now) .. ARGV[9]
local n = redis.call('HINCRBY', meta, 'n', 1)
redis.call('PERSIST', meta)
redis.call('HSET', members, conn, member)
redis.call('ZADD', order, n, conn)
redis.call('HSET', nodes, conn, node)
redis.call('HINCRBY', users, sub, 1)
return {'joined', announce('join', member, sub, conn, org, pseudo, maxlen, now), ''}
""",
)

LEAVE = Script(
    "presence_leave",
    _CHANGE
    + """
-- ARGV: org, pseudo, maxlen, tombstone_ms, conn. Returns {member, node} or false.
if redis.call('HEXISTS', members, ARGV[5]) == 0 then
  return false
end
return remove(ARGV[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], now_ms())
""",
)

REAP_CHANNEL = Script(
    "presence_reap_channel",
    _CHANGE
    + """
-- ARGV: org, pseudo, maxlen, tombstone_ms, dead node. Returns {{member, node}...}.
local flat = redis.call('HGETALL', nodes)
local removed = {}
local now = now_ms()
for i = 1, #flat, 2 do
  if flat[i + 1] == ARGV[5] then
    removed[#removed + 1] = remove(flat[i], ARGV[1], ARGV[2], ARGV[3], ARGV[4], now)
  end
end
return removed
""",
)

MEMBERS = Script(
    "presence_members",
    """
-- KEYS: members, order, users, meta; ARGV: limit.
-- Returns {members as one JSON array text (join order), total, users, last position}.
local conns = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1)
local texts = {}
local step = 4000  -- unpack() takes a bounded number of arguments
for first = 1, #conns, step do
  local last = math.min(first + step - 1, #conns)
  local found = redis.call('HMGET', KEYS[1], unpack(conns, first, last))
  for _, text in ipairs(found) do
    if text then texts[#texts + 1] = text end
  end
end
return {'[' .. table.concat(texts, ',') .. ']', redis.call('ZCARD', KEYS[2]),
        redis.call('HLEN', KEYS[3]), redis.call('HGET', KEYS[4], 'last') or '0-0'}
""",
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

NODE_REGISTER = Script(
    "presence_node_register",
    _NOW
    + """
-- KEYS: nodes; ARGV: node, ttl_ms
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
""",
)

NODE_REFRESH = Script(
    "presence_node_refresh",
    _NOW
    + """
-- KEYS: nodes; ARGV: node, ttl_ms. 0 (nothing changed) when the lease expired.
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms or tonumber(until_ms) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
""",
)

NODE_EXPIRED = Script(
    "presence_node_expired",
    _NOW
    + """
-- KEYS: nodes; ARGV: count. Incarnations whose lease expired.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
""",
)

NODE_DROP = Script(
    "presence_node_drop",
    _NOW
    + """
-- KEYS: nodes, index; ARGV: node, only_if_expired (1|0).
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[2] == '1' and until_ms and tonumber(until_ms) > now then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
""",
)

INDEX_ADD = Script("presence_index_add", "return redis.call('SADD', KEYS[1], ARGV[1])")
INDEX_REMOVE = Script("presence_index_remove", "return redis.call('SREM', KEYS[1], ARGV[1])")
INDEX_SCAN = Script(
    "presence_index_scan",
    "return redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])",
)

PRESENCE_SCRIPTS = (
    JOIN,
    LEAVE,
    REAP_CHANNEL,
    MEMBERS,
    NODE_REGISTER,
    NODE_REFRESH,
    NODE_EXPIRED,
    NODE_DROP,
    INDEX_ADD,
    INDEX_REMOVE,
    INDEX_SCAN,
)


def _ms(seconds: float) -> bytes:
    return b"%d" % max(1, math.ceil(seconds * 1000))


@attrs.define(eq=False)
class _Indexed:
    """This process's members (and joins in flight) of one node in one channel."""

    count: int = 0
    indexed: bool = False
    lock: trio.Lock = attrs.Factory(trio.Lock)


_LocalKey = tuple[str, str, str]
"""(node, org, channel)"""


class RedisPresence(PresenceStore):
    """See the module docstring. Made by `RedisBroker.presence`."""

    def __init__(self, scripts: ScriptBatcher, layout: KeyLayout, bus_maxlen: int) -> None:
        self._scripts = scripts
        self._layout = layout
        self._maxlen = b"%d" % bus_maxlen
        self._tombstone = _ms(TOMBSTONE_GRACE)
        self._nodes_key = layout.presence_nodes().encode()
        self._local: dict[_LocalKey, _Indexed] = {}

    def _keys(self, org: str, channel: str) -> tuple[bytes, ...]:
        keys = self._layout.presence(org, channel)
        return tuple(
            name.encode()
            for name in (
                keys.members,
                keys.order,
                keys.nodes,
                keys.users,
                keys.meta,
                keys.bus,
                keys.bus_seq,
            )
        )

    def _change_args(self, org: str, channel: str) -> tuple[bytes, ...]:
        return (org.encode(), presence_channel(channel).encode(), self._maxlen, self._tombstone)

    def _index_key(self, node: str) -> bytes:
        return self._layout.presence_index(node).encode()

    # -- members -----------------------------------------------------------------

    async def join(
        self,
        org: str,
        channel: str,
        *,
        node: str,
        conn: str,
        sub: str,
        info: str | None,
        max_members: int,
    ) -> JoinOutcome:
        head = b'{"sub":' + orjson.dumps(sub) + b',"conn":' + orjson.dumps(conn) + b',"since":'
        tail = b"}" if info is None else b',"info":' + info.encode() + b"}"
        args = (
            *self._change_args(org, channel),
            conn.encode(),
            node.encode(),
            sub.encode(),
            head,
            tail,
            b"%d" % max_members,
        )
        key = (node, org, channel)
        entry = self._local.setdefault(key, _Indexed())
        entry.count += 1  # reserved before anything is sent: see the module docstring
        try:
            if not entry.indexed:
                async with entry.lock:
                    if not entry.indexed:
                        await self._scripts.call(
                            INDEX_ADD, (self._index_key(node),), (_entry(org, channel),), write=True
                        )
                        entry.indexed = True
        except BaseException:
            await self._release(key)
            raise
        # A join that fails from here on may have been made: the reservation
        # stays (an extra count only keeps a harmless index entry alive).
        status, position, previous = await self._scripts.call(
            JOIN, self._keys(org, channel), args, write=True
        )
        outcome = JoinOutcome(JoinStatus(status), position)
        if outcome.status is JoinStatus.FULL or (
            outcome.status is JoinStatus.ALREADY and previous == node
        ):
            await self._release(key)
        elif outcome.status is JoinStatus.ALREADY:
            await self._release((previous, org, channel))  # re-tagged from there
        return outcome

    async def _release(self, key: _LocalKey) -> None:
        """One member (or reservation) of `key` less; unindex after the last.

        A join that reserves meanwhile finds `indexed` false and waits for
        the lock, so its SADD follows the SREM."""
        entry = self._local.get(key)
        if entry is None:
            return
        entry.count -= 1
        if entry.count > 0:
            return
        if entry.indexed:
            with trio.CancelScope(shield=True):
                async with entry.lock:
                    if entry.count == 0 and entry.indexed:
                        entry.indexed = False
                        node, org, channel = key
                        await self._scripts.call(
                            INDEX_REMOVE,
                            (self._index_key(node),),
                            (_entry(org, channel),),
                            write=True,
                        )
        if entry.count == 0 and not entry.indexed and self._local.get(key) is entry:
            del self._local[key]

    async def leave(self, org: str, channel: str, conn: str) -> Leaver | None:
        args = (*self._change_args(org, channel), conn.encode())
        reply = await self._scripts.call(LEAVE, self._keys(org, channel), args, write=True)
        if not reply:
            return None
        member, node = reply
        await self._release_quietly((node, org, channel))
        return Leaver(member, node)

    async def _release_quietly(self, key: _LocalKey) -> None:
        """`_release` after a change that is already made: an index removal
        that fails leaves a harmless entry behind (see the module docstring)."""
        try:
            await self._release(key)
        except Exception:
            entry = self._local.get(key)
            if entry is not None and entry.count == 0 and not entry.indexed:
                del self._local[key]

    async def members(self, org: str, channel: str, limit: int) -> Snapshot:
        keys = self._layout.presence(org, channel)
        names = (keys.members, keys.order, keys.users, keys.meta)
        members_json, total, users, position = await self._scripts.call(
            MEMBERS, tuple(name.encode() for name in names), (b"%d" % limit,), write=False
        )
        return Snapshot(str(members_json), int(total), int(users), str(position))

    # -- node leases and reaping ---------------------------------------------------

    async def register_node(self, node: str, ttl: float) -> None:
        await self._scripts.call(
            NODE_REGISTER, (self._nodes_key,), (node.encode(), _ms(ttl)), write=True
        )

    async def refresh_node(self, node: str, ttl: float) -> bool:
        reply = await self._scripts.call(
            NODE_REFRESH, (self._nodes_key,), (node.encode(), _ms(ttl)), write=True
        )
        return int(reply) == 1

    async def forget_node(self, node: str) -> None:
        await self._scripts.call(
            NODE_DROP, (self._nodes_key, self._index_key(node)), (node.encode(), b"0"), write=True
        )
        for key in [key for key in self._local if key[0] == node]:
            del self._local[key]

    async def reap(self) -> list[Leaver]:
        expired = await self._scripts.call(
            NODE_EXPIRED, (self._nodes_key,), (b"%d" % EXPIRED_PER_CALL,), write=False
        )
        removed: list[Leaver] = []
        for node in expired or ():
            removed.extend(await self._reap_node(str(node)))
        return removed

    async def _reap_node(self, node: str) -> list[Leaver]:
        index = self._index_key(node)
        channels: list[tuple[str, str]] = []
        cursor = "0"
        while True:
            cursor, entries = await self._scripts.call(
                INDEX_SCAN, (index,), (cursor.encode(), b"%d" % INDEX_PAGE), write=False
            )
            channels.extend(_parse_entry(entry) for entry in entries)
            if str(cursor) == "0":
                break
        removed: list[Leaver] = []
        limiter = trio.CapacityLimiter(REAP_CONCURRENCY)

        async def reap_channel(org: str, channel: str) -> None:
            async with limiter:
                args = (*self._change_args(org, channel), node.encode())
                reply = await self._scripts.call(
                    REAP_CHANNEL, self._keys(org, channel), args, write=True
                )
            removed.extend(Leaver(member, dead) for member, dead in reply or ())

        async with trio.open_nursery() as nursery:
            for org, channel in dict.fromkeys(channels):
                nursery.start_soon(reap_channel, org, channel)
        await self._scripts.call(
            NODE_DROP, (self._nodes_key, index), (node.encode(), b"1"), write=True
        )
        return removed


def _entry(org: str, channel: str) -> bytes:
    return orjson.dumps([org, channel])


def _parse_entry(entry: Any) -> tuple[str, str]:
    org, channel = orjson.loads(entry)
    return str(org), str(channel)


__all__: Sequence[str] = ["PRESENCE_SCRIPTS", "RedisPresence"]
