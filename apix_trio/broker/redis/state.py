"""State values in Redis (`StateStore` on Redis), changes fanned out on the bus.

Keys (`keys.KeyLayout.state`), all of one org in one hash slot:

    <prefix>:{b<s>}:<org>:v:<key>   hash  n = version, v = value (compact JSON text,
                                          "null" after a delete); never expires
    <prefix>:{b<s>}:<org>:vn        string: the org's keys with a value

Every change is one Lua script (`CHANGE`) on the key, the org counter and
the slot's bus shard: it checks the expected version, keeps the counter
(refusing a new value past `max_keys_per_org`), writes the new version and
value, and appends the change to the bus (`bus.py`'s entry format, channel
`$state.<key>`, id `<version>-0`), atomically. So every node's bus reader
sees each key's changes in version order, and a change is on the bus exactly
when it was made.

Merge patches are computed here, in Python, not in Lua: Redis' cjson would
round numbers to 14 significant digits and cannot tell `{}` from `[]`. The
change stays atomic by compare-and-set: `patch` reads the value and its
version, computes the result, and writes it with that version expected; when
another change came in between (and the caller gave no version) it reads
again and retries, at most `PATCH_ATTEMPTS` times. The patch thus applies
to exactly the version it replaces, as the memory broker's does.

Sizes are checked in Python before the script runs (the value text is what
is stored, byte for byte).

Error handling: `BrokerUnavailable` from the batcher passes through (also
after `PATCH_ATTEMPTS` lost races); the script's refusals become
`StateConflict` and `StateLimitExceeded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.scripts import Script
from apix_trio.broker.state import (
    NULL,
    StateConflict,
    StateLimitExceeded,
    StateLimits,
    StateStore,
    StateValue,
    check_size,
    patch_data,
    set_data,
    state_channel,
)
from apix_trio.protocol.mergepatch import merge_patch_text

PATCH_ATTEMPTS = 64
"""Reads and compare-and-sets of one patch before it gives up as unavailable."""

GET = Script(
    "state_get",
    """
-- KEYS: value hash. Returns {version, value}.
local cur = redis.call('HMGET', KEYS[1], 'n', 'v')
return {tonumber(cur[1] or '0'), cur[2] or 'null'}
""",
)

COUNT = Script(
    "state_count",
    """
-- KEYS: org counter. Returns the org's keys with a value.
return tonumber(redis.call('GET', KEYS[1]) or '0')
""",
)

CHANGE = Script(
    "state_change",
    """
-- KEYS: value hash, org counter, bus, bus_seq
-- ARGV: org, pseudo-channel, sender, expected version ('' = any),
--       new value (JSON text, 'null' = none), fan-out data (JSON text),
--       max keys with a value ('' = no check), bus_maxlen
-- Returns {'ok', new version}, {'conflict', current version} or
-- {'limit', count}.
local key, counter, bus, bus_seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cur = redis.call('HMGET', key, 'n', 'v')
local version = tonumber(cur[1] or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= version then
  return {'conflict', version}
end
local had = cur[2] and cur[2] ~= 'null'
local has = ARGV[5] ~= 'null'
if has and not had then
  local count = tonumber(redis.call('GET', counter) or '0')
  if ARGV[7] ~= '' and count >= tonumber(ARGV[7]) then
    return {'limit', count}
  end
  redis.call('INCR', counter)
elseif had and not has then
  redis.call('DECR', counter)
end
version = version + 1
local vtext = string.format('%.0f', version)
redis.call('HSET', key, 'n', vtext, 'v', ARGV[5])

-- the change goes out on the bus like an event (bus.py's entry format)
local t = redis.call('TIME')
local ts = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local n = string.format('%.0f', redis.call('INCR', bus_seq))
local packed = cjson.encode({n, ARGV[1], ARGV[2], vtext .. '-0', ts, ARGV[3], cjson.null, ARGV[6]})
redis.call('XADD', bus, 'MAXLEN', '~', ARGV[8], '*', 'e', packed)
return {'ok', version}
""",
)

STATE_SCRIPTS: Sequence[Script] = (GET, COUNT, CHANGE)


class RedisState(StateStore):
    """See the module docstring. Made by `RedisBroker.state`."""

    def __init__(self, scripts: ScriptBatcher, layout: KeyLayout, bus_maxlen: int) -> None:
        self._scripts = scripts
        self._layout = layout
        self._bus_maxlen = b"%d" % bus_maxlen

    async def get(self, org: str, key: str) -> StateValue:
        keys = self._layout.state(org)
        version, value = await self._scripts.call(
            GET, (keys.value(key).encode(),), (), write=False, durable_read=True
        )
        return StateValue(str(value), int(version))

    async def count(self, org: str) -> int:
        keys = self._layout.state(org)
        return int(await self._scripts.call(COUNT, (keys.count.encode(),), (), write=False))

    async def set(
        self,
        org: str,
        key: str,
        value: str,
        *,
        version: int | None,
        sender: str,
        limits: StateLimits,
    ) -> int:
        check_size(value, limits)
        return await self._change(org, key, value, set_data(value), version, sender, limits)

    async def delete(self, org: str, key: str, *, version: int | None, sender: str) -> int:
        return await self._change(org, key, NULL, set_data(NULL), version, sender, None)

    async def patch(
        self,
        org: str,
        key: str,
        patch: str,
        *,
        version: int | None,
        sender: str,
        limits: StateLimits,
    ) -> int:
        data = patch_data(patch)
        for _ in range(PATCH_ATTEMPTS):
            current = await self.get(org, key)
            if version is not None and version != current.version:
                raise StateConflict(current.version)
            value = merge_patch_text(current.value, patch)
            check_size(value, limits)
            try:
                return await self._change(org, key, value, data, current.version, sender, limits)
            except StateConflict:
                if version is not None:
                    raise
            await trio.lowlevel.checkpoint()
        raise BrokerUnavailable(f"state key changed under {PATCH_ATTEMPTS} patch attempts")

    async def _change(
        self,
        org: str,
        key: str,
        value: str,
        data: str,
        expected: int | None,
        sender: str,
        limits: StateLimits | None,
    ) -> int:
        keys = self._layout.state(org)
        names = (
            keys.value(key).encode(),
            keys.count.encode(),
            keys.bus.encode(),
            keys.bus_seq.encode(),
        )
        args = (
            org.encode(),
            state_channel(key).encode(),
            sender.encode(),
            b"" if expected is None else b"%d" % expected,
            value.encode(),
            data.encode(),
            b"" if limits is None else b"%d" % limits.max_keys_per_org,
            self._bus_maxlen,
        )
        outcome, number = _pair(await self._scripts.call(CHANGE, names, args, write=True))
        if outcome == "ok":
            return number
        if outcome == "conflict":
            raise StateConflict(number)
        assert limits is not None
        raise StateLimitExceeded(limits.max_keys_per_org)


def _pair(reply: Any) -> tuple[str, int]:
    outcome, number = reply
    return str(outcome), int(number)
