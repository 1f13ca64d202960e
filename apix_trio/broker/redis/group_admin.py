"""Lua scripts for what operators ask of a consumer group: its consumers
(XINFO CONSUMERS) and the redrive cursor of its dead letters.

The cursor of every group of a channel lives in one hash in the channel's
slot (`KeyLayout.redrive_cursors`), field = group name. It has no TTL: one
small hash per channel whose dead letters were ever redriven, and losing it
would redrive old dead letters again after their idempotency keys expired.
"""

from __future__ import annotations

from apix_trio.broker.redis.scripts import Script

GROUP_INFO = Script(
    "group_info",
    """
-- KEYS: stream. ARGV: group. Returns false when the group does not exist,
-- else {{name, pending, idle_ms}, ...} by name.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return false end
local out = {}
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  out[#out + 1] = {info['name'], info['pending'], info['idle']}
end
return out
""",
)

REDRIVE_CURSOR = Script(
    "redrive_cursor",
    """
-- KEYS: cursor hash. ARGV: group. Returns the cursor, '0-0' when unset.
return redis.call('HGET', KEYS[1], ARGV[1]) or '0-0'
""",
)

ADVANCE_REDRIVE_CURSOR = Script(
    "redrive_advance",
    """
-- KEYS: cursor hash. ARGV: group, id. Moves the cursor to id unless it is
-- already there or beyond (ids compared as numbers); returns the cursor.
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local cms, cseq = parse(current)
  local nms, nseq = parse(ARGV[2])
  if cms > nms or (cms == nms and cseq >= nseq) then return current end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
""",
)
