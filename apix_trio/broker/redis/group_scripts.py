"""The Lua scripts of Redis consumer groups (`redis/groups.py`).

Each script touches one key, the channel stream (`KEYS[1]`), so each is one
hash slot and Redis Cluster safe. They run through the broker's
`ScriptBatcher` (EVALSHA, pipelined with everything else; reloaded on
NOSCRIPT).

A group that does not exist (NOGROUP: never created because the stream did
not exist at `join`, or deleted with an expired stream) reads as empty in
every script; `read_new` creates it at "0" once the stream exists again: a
stream that was (re)created after the group was joined holds only events
published after that, none of which the group has seen.

Ids of claimed entries come with their delivery count, read back with
`XPENDING <id> <id> 1` (XCLAIM and XAUTOCLAIM do not return it). Redis 7.0 or
later: XCLAIM and XAUTOCLAIM drop pending entries whose event was deleted
(trimmed), which is what makes "trimmed ones are acked" hold.
"""

from __future__ import annotations

from apix_trio.broker.redis.scripts import Script

CHUNK = 500
"""Ids per XCLAIM inside a script (Lua's unpack has a stack limit)."""

SCAN_BUDGET = 10_000
"""PEL entries `claim_idle` may examine per call looking for idle ones."""

_COMMON = """
local function failed(reply)
  return type(reply) == 'table' and reply.err ~= nil
end
local function nogroup(reply)
  return failed(reply) and string.find(reply.err, 'NOGROUP', 1, true) ~= nil
end
-- redis.pcall(head..., ids[first..last], tail...): Lua expands only the
-- last argument of a call, so the arguments are built as one table.
local function pcall_with(head, ids, first, last, tail)
  local args = {}
  for _, word in ipairs(head) do args[#args + 1] = word end
  for i = first, math.min(last, #ids) do args[#args + 1] = ids[i] end
  for _, word in ipairs(tail) do args[#args + 1] = word end
  return redis.pcall(unpack(args))
end
-- XCLAIM of ids in chunks; calls each(reply) per chunk; false on NOGROUP
local function xclaim(stream, group, consumer, ids, tail, each)
  for first = 1, #ids, CHUNK do
    local reply = pcall_with({'XCLAIM', stream, group, consumer, 0}, ids, first,
                             first + CHUNK - 1, tail)
    if nogroup(reply) then return false end
    if failed(reply) then error(reply) end
    each(reply)
  end
  return true
end
-- appends {id, fields, attempt} for each claimed entry (deleted ones are
-- not returned by XCLAIM/XAUTOCLAIM in Redis 7)
local function with_attempts(stream, group, entries, out)
  for _, entry in ipairs(entries) do
    if entry then
      local p = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
      if #p > 0 then
        out[#out + 1] = {entry[1], entry[2], p[1][4]}
      end
    end
  end
end
""".replace("CHUNK", str(CHUNK))

JOIN = Script(
    "group_join",
    """
-- KEYS: stream; ARGV: group. Returns 1 when created, 0 when it existed or
-- the stream does not exist (read_new creates the group with the stream).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$')
if type(reply) == 'table' and reply.err then
  if string.find(reply.err, 'BUSYGROUP', 1, true) then return 0 end
  return reply
end
return 1
""",
)

READ_NEW = Script(
    "group_read_new",
    _COMMON
    + """
-- KEYS: stream; ARGV: group, consumer1, count1, consumer2, count2, ...
-- Returns {{consumer index (0-based), id, fields}, ...} in id order.
local stream, group = KEYS[1], ARGV[1]
local names, left, total = {}, {}, 0
for i = 2, #ARGV, 2 do
  names[#names + 1] = ARGV[i]
  left[#left + 1] = tonumber(ARGV[i + 1])
  total = total + tonumber(ARGV[i + 1])
end
if total < 1 then return {} end
local function read()
  return redis.pcall('XREADGROUP', 'GROUP', group, names[1], 'COUNT', total,
                     'STREAMS', stream, '>')
end
local reply = read()
if nogroup(reply) then
  if redis.call('EXISTS', stream) == 0 then return {} end
  redis.call('XGROUP', 'CREATE', stream, group, '0')
  reply = read()
end
if failed(reply) then return reply end
if not reply then return {} end
local out, claims, at = {}, {}, 1
for i, entry in ipairs(reply[1][2]) do
  while left[at] < 1 do at = at % #names + 1 end
  left[at] = left[at] - 1
  out[i] = {at - 1, entry[1], entry[2]}
  if at > 1 then
    claims[at] = claims[at] or {}
    table.insert(claims[at], entry[1])
  end
  at = at % #names + 1
end
-- read as the first consumer, then moved: JUSTID keeps the count at 1
for index, ids in pairs(claims) do
  xclaim(stream, group, names[index], ids, {'JUSTID'}, function(_) end)
end
return out
""",
)

CLAIM = Script(
    "group_claim",
    _COMMON
    + """
-- KEYS: stream; ARGV: group, consumer, id... Returns {{id, fields, attempt}...}.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local out = {}
if not xclaim(stream, group, consumer, ids, {}, function(reply)
  with_attempts(stream, group, reply, out)
end) then
  return {}
end
return out
""",
)

CLAIM_IDLE = Script(
    "group_claim_idle",
    _COMMON
    + """
-- KEYS: stream; ARGV: group, consumer, min_idle_ms, count, released holder
-- Returns {{id, fields, attempt}...}: entries idle for min_idle (released
-- ones included: they show an idle time of years), oldest first, scanning
-- at most SCAN_BUDGET entries; then released ones beyond the scan.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local want = tonumber(ARGV[4])
local out = {}
local start, scanned = '0-0', 0
while #out < want and scanned < SCAN_BUDGET do
  local count = want - #out
  local reply = redis.pcall('XAUTOCLAIM', stream, group, consumer, ARGV[3], start,
                            'COUNT', count)
  if nogroup(reply) then return {} end
  if failed(reply) then return reply end
  with_attempts(stream, group, reply[2], out)
  start = reply[1]
  scanned = scanned + 10 * count
  if start == '0-0' then break end
end
if #out < want then
  local parked = redis.call('XPENDING', stream, group, '-', '+', want - #out, ARGV[5])
  local ids = {}
  for i, entry in ipairs(parked) do ids[i] = entry[1] end
  xclaim(stream, group, consumer, ids, {}, function(reply)
    with_attempts(stream, group, reply, out)
  end)
end
return out
""".replace("SCAN_BUDGET", str(SCAN_BUDGET)),
)

TOUCH = Script(
    "group_touch",
    _COMMON
    + """
-- KEYS: stream; ARGV: group, consumer, id... Returns the ids still held.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local held = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', stream, group, ARGV[i], ARGV[i], 1, consumer)
  if nogroup(p) then return {} end
  if failed(p) then return p end
  if #p > 0 then held[#held + 1] = ARGV[i] end
end
local out = {}
xclaim(stream, group, consumer, held, {'JUSTID'}, function(ids)
  for _, id in ipairs(ids) do out[#out + 1] = id end
end)
return out
""",
)

RELEASE = Script(
    "group_release",
    _COMMON
    + """
-- KEYS: stream; ARGV: group, consumer, holder, idle_ms. Returns how many.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local released = 0
for _ = 1, 10000 do
  local p = redis.pcall('XPENDING', stream, group, '-', '+', CHUNK, consumer)
  if nogroup(p) then return 0 end
  if failed(p) then return p end
  if #p == 0 then break end
  local ids = {}
  for i, entry in ipairs(p) do ids[i] = entry[1] end
  -- JUSTID: the attempt is counted by whoever claims it next. Deleted
  -- entries leave the PEL here too, so every round shrinks it.
  xclaim(stream, group, ARGV[3], ids, {'IDLE', ARGV[4], 'JUSTID'}, function(moved)
    released = released + #moved
  end)
end
redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
return released
""".replace("CHUNK", str(CHUNK)),
)

ACK = Script(
    "group_ack",
    """
-- KEYS: stream; ARGV: group, id... Returns how many were pending.
local reply = redis.pcall('XACK', KEYS[1], unpack(ARGV))
if type(reply) == 'table' and reply.err then
  if string.find(reply.err, 'NOGROUP', 1, true) then return 0 end
end
return reply
""",
)

ACK_MANY = Script(
    "group_ack_many",
    """
-- KEYS: stream; ARGV: group, n1, id1..., n2, id2..., ... (n ids per list).
-- Acks the lists one after the other; returns how many of each were pending.
local stream, group = KEYS[1], ARGV[1]
local counts, at = {}, 2
while at <= #ARGV do
  local n = tonumber(ARGV[at])
  local acked = 0
  for first = at + 1, at + n, CHUNK do
    local last = math.min(first + CHUNK - 1, at + n)
    local reply = redis.pcall('XACK', stream, group, unpack(ARGV, first, last))
    if type(reply) == 'table' and reply.err then
      if not string.find(reply.err, 'NOGROUP', 1, true) then return reply end
      reply = 0
    end
    acked = acked + reply
  end
  counts[#counts + 1] = acked
  at = at + n + 1
end
return counts
""".replace("CHUNK", str(CHUNK)),
)

PENDING = Script(
    "group_pending",
    """
-- KEYS: stream; ARGV: group, limit[, consumer]. Returns XPENDING's extended form.
local args = {'XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[2]}
if ARGV[3] then args[#args + 1] = ARGV[3] end
local reply = redis.pcall(unpack(args))
if type(reply) == 'table' and reply.err and string.find(reply.err, 'NOGROUP', 1, true) then
  return {}
end
return reply
""",
)

REMOVE_IDLE = Script(
    "group_remove_idle",
    """
-- KEYS: stream; ARGV: group, min_idle_ms. Returns the removed consumers.
local stream, group = KEYS[1], ARGV[1]
local info = redis.pcall('XINFO', 'CONSUMERS', stream, group)
if type(info) == 'table' and info.err then
  if string.find(info.err, 'NOGROUP', 1, true) then return {} end
  return info
end
local removed = {}
for _, consumer in ipairs(info) do
  local f = {}
  for i = 1, #consumer, 2 do f[consumer[i]] = consumer[i + 1] end
  if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
""",
)

GROUP_SCRIPTS = (
    JOIN, READ_NEW, CLAIM, CLAIM_IDLE, TOUCH, RELEASE, ACK, ACK_MANY, PENDING, REMOVE_IDLE,
)  # fmt: skip
