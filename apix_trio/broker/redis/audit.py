"""Audit trails in Redis: one stream per org.

    <prefix>:<org>:audit   stream; entry fields t = type, u = sub,
                           j = the rest of the entry (JSON, `audit.encode_body`)

The org is escaped like every client-chosen key part (`keys.escape`), so no
org can name another's key; the internal org of the delivery canary
(`$apix`) is stored as `%24apix`, which no real org can produce. Each script
touches this one key (Redis Cluster safe without a hash tag).

Retention, in the append script: `XADD ... MAXLEN ~ <audit.max_entries>` per
entry, then `XTRIM MINID ~ <now - audit.ttl>`, then `PEXPIRE <audit.ttl>` (a
trail nobody writes to any more disappears when its newest entry is older
than the ttl). Times are Redis' own (`TIME`), the same clock that makes the
ids, so the ttl floor and the ids agree. `~` trims whole stream nodes, so a
trail may hold up to about a hundred entries more than `max_entries` and a
few entries past the ttl; pages hide entries past the ttl.

Paging is one script too (`PAGE`): it walks the stream in chunks, filters in
Lua, and stops at `limit` matches or `SCAN_BUDGET` examined entries, so one
call does a bounded amount of work inside Redis.

Every call goes through the broker's `ScriptBatcher` (pipelined with the
rest of the node's traffic). Error handling: `BrokerUnavailable` from the
batcher passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import trio

from apix_trio.broker.audit import (
    SCAN_BUDGET,
    AuditLog,
    AuditPage,
    AuditQuery,
    AuditRetention,
    decode_entry,
    encode_body,
)
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script
from apix_trio.observability.audit import AuditRecord

APPEND = Script(
    "audit_append",
    """
-- KEYS: the org's audit stream
-- ARGV: max_entries, ttl_ms, then (type, sub, body) per entry. Returns the ids.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = {}
for i = 3, #ARGV, 3 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    't', ARGV[i], 'u', ARGV[i + 1], 'j', ARGV[i + 2])
end
local floor = now_ms - tonumber(ARGV[2])
if floor > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', floor))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return ids
""",
)

PAGE = Script(
    "audit_page",
    """
-- KEYS: the org's audit stream
-- ARGV: mode ('after' | 'latest'), since, limit, type mode ('' | 'eq' | 'prefix'),
--       type, has sub ('0' | '1'), sub, budget, ttl_ms
-- Returns {position, entries}; entries are [id, [t, type, u, sub, j, body]].
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[9])
local limit = tonumber(ARGV[3])
local budget = tonumber(ARGV[8])
local tmode, tval = ARGV[4], ARGV[5]
local hassub, sub = ARGV[6] == '1', ARGV[7]
local filtered = tmode ~= '' or hassub
local function wanted(f)
  if tmode == 'eq' and f[2] ~= tval then return false end
  if tmode == 'prefix' and string.sub(f[2], 1, #tval) ~= tval then return false end
  if hassub and f[4] ~= sub then return false end
  return true
end
local function ms(id)
  return tonumber(string.match(id, '^(%d+)'))
end
local out = {}
local examined = 0
local function chunk()
  if filtered then return math.min(256, budget - examined) end
  return limit - #out
end
if ARGV[1] == 'after' then
  local position = ARGV[2]
  local start = '(' .. ARGV[2]
  while #out < limit and examined < budget do
    local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', chunk())
    if #entries == 0 then break end
    for _, e in ipairs(entries) do
      examined = examined + 1
      position = e[1]
      if ms(e[1]) >= floor and wanted(e[2]) then
        out[#out + 1] = e
      end
      if #out >= limit or examined >= budget then break end
    end
    start = '(' .. position
  end
  return {position, out}
end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 0 then return {'0-0', out} end
local finish = '+'
local done = false
while not done and #out < limit and examined < budget do
  local entries = redis.call('XREVRANGE', KEYS[1], finish, '-', 'COUNT', chunk())
  if #entries == 0 then break end
  for _, e in ipairs(entries) do
    if ms(e[1]) < floor then done = true break end
    examined = examined + 1
    finish = '(' .. e[1]
    if wanted(e[2]) then out[#out + 1] = e end
    if #out >= limit or examined >= budget then break end
  end
end
local ordered = {}
for i = #out, 1, -1 do ordered[#ordered + 1] = out[i] end
return {top[1][1], ordered}
""",
)

AUDIT_SCRIPTS = (APPEND, PAGE)


def _ms(seconds: float) -> bytes:
    return b"%d" % max(1, math.ceil(seconds * 1000))


class RedisAuditLog(AuditLog):
    """See the module docstring. Made by `RedisBroker.audit`."""

    def __init__(self, scripts: ScriptBatcher, layout: KeyLayout) -> None:
        self._scripts = scripts
        self._layout = layout

    def key(self, org: str) -> str:
        return self._layout.audit(org)

    async def append_many(
        self, records: Sequence[AuditRecord], retention: AuditRetention
    ) -> list[str]:
        by_org: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            by_org.setdefault(record.org, []).append(index)
        stored: list[str] = [""] * len(records)
        failure: BrokerUnavailable | None = None

        async def append(org: str, indexes: list[int]) -> None:
            nonlocal failure
            args: list[bytes] = [b"%d" % max(1, retention.max_entries), _ms(retention.ttl)]
            for index in indexes:
                record = records[index]
                args += [record.type.encode(), record.sub.encode(), encode_body(record)]
            try:
                reply = await self._scripts.call(
                    APPEND, (self.key(org).encode(),), tuple(args), write=True
                )
            except BrokerUnavailable as exc:  # re-raised once every org is done
                failure = failure or exc
                return
            for index, entry_id in zip(indexes, reply, strict=True):
                stored[index] = str(entry_id)

        async with trio.open_nursery() as nursery:
            for org, indexes in by_org.items():
                nursery.start_soon(append, org, indexes)
        if failure is not None:
            raise failure
        return stored

    async def page(self, org: str, query: AuditQuery, retention: AuditRetention) -> AuditPage:
        wanted = query.type or ""
        type_mode = ""
        if wanted.endswith("*"):
            type_mode, wanted = "prefix", wanted[:-1]
        elif wanted:
            type_mode = "eq"
        args = (
            b"after" if query.since is not None else b"latest",
            (query.since or "0-0").encode(),
            b"%d" % query.limit,
            type_mode.encode(),
            wanted.encode(),
            b"1" if query.sub is not None else b"0",
            (query.sub or "").encode(),
            b"%d" % SCAN_BUDGET,
            _ms(retention.ttl),
        )
        position, raw = await self._scripts.call(PAGE, (self.key(org).encode(),), args, write=False)
        return AuditPage(tuple(_entry(item) for item in raw or ()), str(position))


def _entry(item: Sequence[Any]) -> dict[str, Any]:
    entry_id, fields = item
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return decode_entry(entry_id, values.get("t", ""), values.get("u", ""), values.get("j", "{}"))
