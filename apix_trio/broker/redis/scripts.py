"""The broker's Lua scripts (run with EVALSHA; reloaded on NOSCRIPT).

Each script touches the keys of one channel and its bus shard only, all in
one hash slot (see `keys`). Ids are compared as numbers in Python, never
as strings in Lua; Lua only passes them through, except `publish`, which
computes the next id from the channel's last one (doubles hold a millisecond
timestamp and a sequence exactly).

The channel meta hash (`m`) is the channel's memory beyond its events:

- `last`: the last id the channel ever had (the tombstone: it outlives the
  stream by `TOMBSTONE_GRACE`);
- `del`: the highest id deleted while the stream existed (trimmed by
  `history_size`, or everything up to `last` when the stream expired or
  history is off).

When the stream key is gone, everything up to `last` is deleted. Redis' own
`max-deleted-entry-id` does not count trimming (only XDEL), which is why the
script trims exactly and records the highest trimmed id itself.
"""

from __future__ import annotations

import hashlib

import attrs


@attrs.frozen
class Script:
    name: str
    source: str
    sha: str = attrs.field()

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    @property
    def sha_bytes(self) -> bytes:
        return self.sha.encode()


# Resolve `last` and `del` of a channel: meta first; a stream without meta
# (the meta key was evicted or deleted by hand) falls back to XINFO STREAM,
# conservatively treating everything but its retained entries as deleted.
_STATE = """
local function channel_state(stream, meta)
  local m = redis.call('HMGET', meta, 'last', 'del')
  local length = redis.call('XLEN', stream)
  if length == 0 then
    -- no stream (XLEN of a missing key is 0; we never leave one empty)
    local last = m[1] or '0-0'
    return last, last, 0
  end
  if m[1] then
    return m[1], (m[2] or '0-0'), length
  end
  local raw = redis.call('XINFO', 'STREAM', stream)
  local info = {}
  for i = 1, #raw, 2 do info[raw[i]] = raw[i + 1] end
  local last = info['last-generated-id']
  local del = info['max-deleted-entry-id']
  if tonumber(info['entries-added']) > length then
    del = last
  end
  return last, del, length
end
"""

PUBLISH = Script(
    "publish",
    _STATE
    + """
-- KEYS: stream, meta, bus, bus_seq[, idempotency]
-- ARGV: org, channel, data, sender, key, history_size, history_ttl_ms,
--       tombstone_ttl_ms, dedupe_ms, bus_maxlen
-- Returns the new id (its ms are the event's ts) for a stored event, or
-- {id, ts, data, sender} of the first event for a duplicate key.
local stream, meta, bus, bus_seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local has_key = #KEYS == 5
if has_key then
  local first = redis.call('HMGET', KEYS[5], 'i', 't', 'd', 'f')
  if first[1] then
    return first
  end
end

local last, del, length = channel_state(stream, meta)
local dash = string.find(last, '-', 1, true)
local last_ms = tonumber(string.sub(last, 1, dash - 1))
local last_seq = tonumber(string.sub(last, dash + 1))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms, seq = now, 0
if now <= last_ms then
  ms, seq = last_ms, last_seq + 1
end
local ts = string.format('%.0f', ms)
local id = ts .. '-' .. string.format('%.0f', seq)

local fields = {'t', ts, 'd', ARGV[3], 'f', ARGV[4]}
if has_key then
  fields[7] = 'k'
  fields[8] = ARGV[5]
end

local history_size = tonumber(ARGV[6])
if history_size > 0 then
  if length >= history_size then
    -- exact trim, so the highest deleted id is known
    local gone = redis.call('XRANGE', stream, '-', '+', 'COUNT', length - history_size + 1)
    del = gone[#gone][1]
    redis.call('XADD', stream, 'MAXLEN', history_size, id, unpack(fields))
  else
    redis.call('XADD', stream, id, unpack(fields))
  end
  redis.call('PEXPIRE', stream, ARGV[7])
else
  if length > 0 then redis.call('DEL', stream) end
  del = id
end
redis.call('HSET', meta, 'last', id, 'del', del)
redis.call('PEXPIRE', meta, ARGV[8])

if has_key and tonumber(ARGV[9]) > 0 then
  redis.call('HSET', KEYS[5], 'i', id, 't', ts, 'd', ARGV[3], 'f', ARGV[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[9])
end

-- the bus entry carries the whole event in one field (one string to parse)
local n = string.format('%.0f', redis.call('INCR', bus_seq))
local key = cjson.null
if has_key then key = ARGV[5] end
local packed = cjson.encode({n, ARGV[1], ARGV[2], id, ts, ARGV[4], key, ARGV[3]})
redis.call('XADD', bus, 'MAXLEN', '~', ARGV[10], '*', 'e', packed)
return id
""",
)

READ = Script(
    "read",
    _STATE
    + """
-- KEYS: stream, meta
-- ARGV: mode ('after' | 'latest' | 'position'), since (canonical id), limit
-- Returns {last, del, since_is_stored, entries}.
local stream, meta = KEYS[1], KEYS[2]
local mode, since, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local last, del, length = channel_state(stream, meta)
if mode == 'position' or length == 0 then
  return {last, del, 0, {}}
end
if mode == 'latest' then
  if limit < 1 then return {last, del, 0, {}} end
  return {last, del, 0, redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit)}
end
-- inclusive, one more: the first entry tells whether `since` is stored
local entries = redis.call('XRANGE', stream, since, '+', 'COUNT', limit + 1)
local stored = 0
if #entries > 0 and entries[1][1] == since then
  stored = 1
  table.remove(entries, 1)
elseif #entries > limit then
  table.remove(entries)
end
return {last, del, stored, entries}
""",
)

SCRIPTS = (PUBLISH, READ)
