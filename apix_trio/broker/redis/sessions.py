"""Session records in Redis: one hash per session, expiring `ttl` after its last save.

    <prefix>:<org>:s:<session>   hash  e = epoch, r = the record (JSON, see
                                       `sessions.encode_record`); PEXPIRE ttl

The org and the session id are escaped like every client-chosen key part
(`keys.escape`), so a session id sent in a `resume` can never name
another org's key. The key carries no hash tag: each command touches one key,
so it is Redis Cluster safe as it is.

Every operation is one small Lua script (the epoch check and the write must
be atomic), run through the broker's `ScriptBatcher`, which pipelines
concurrent calls: `save_many` issues its saves concurrently (at most
`SAVE_CONCURRENCY` at a time), so a flush of thousands of records costs a
handful of round trips. Publishes wait for `broker.publish_wait_replicas`
replicas; so do session saves (they are writes).

Error handling: `BrokerUnavailable` from the batcher (timeouts, Redis down,
too few replicas) passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.keys import check_prefix, escape
from apix_trio.broker.redis.scripts import Script
from apix_trio.broker.sessions import (
    SessionRecord,
    SessionStore,
    decode_record,
    encode_record,
)

SAVE_CONCURRENCY = 256
"""Saves of one `save_many` in flight at once (the batcher pipelines them)."""

SAVE = Script(
    "session_save",
    """
-- KEYS: session hash; ARGV: epoch, record, ttl_ms
-- Returns 1 when stored, 0 when the stored epoch is higher (fenced off).
local current = redis.call('HGET', KEYS[1], 'e')
if current and tonumber(current) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""",
)

LOAD = Script(
    "session_load",
    """
-- KEYS: session hash. Returns the record or false.
return redis.call('HGET', KEYS[1], 'r')
""",
)

DELETE = Script(
    "session_delete",
    """
-- KEYS: session hash
return redis.call('DEL', KEYS[1])
""",
)

SESSION_SCRIPTS = (SAVE, LOAD, DELETE)


class RedisSessionStore(SessionStore):
    """See the module docstring. Made by `RedisBroker.sessions`."""

    def __init__(self, scripts: ScriptBatcher, prefix: str) -> None:
        check_prefix(prefix)
        self._scripts = scripts
        self._prefix = prefix

    def key(self, org: str, session: str) -> str:
        return f"{self._prefix}:{escape(org)}:s:{escape(session)}"

    async def save(self, org: str, record: SessionRecord, ttl: float) -> bool:
        ttl_ms = b"%d" % max(1, math.ceil(ttl * 1000))
        reply = await self._scripts.call(
            SAVE,
            (self.key(org, record.session).encode(),),
            (b"%d" % record.epoch, encode_record(record), ttl_ms),
            write=True,
        )
        return int(reply) == 1

    async def save_many(self, items: Sequence[tuple[str, SessionRecord]], ttl: float) -> int:
        stored = 0
        failure: BaseException | None = None
        limiter = trio.CapacityLimiter(SAVE_CONCURRENCY)

        async def save_one(org: str, record: SessionRecord) -> None:
            nonlocal stored, failure
            async with limiter:
                try:
                    ok = await self.save(org, record, ttl)
                except BrokerUnavailable as exc:  # re-raised once all are done
                    failure = failure or exc
                    return
                stored += ok  # not `stored += await ...`: that reads `stored` first

        async with trio.open_nursery() as nursery:
            for org, record in items:
                nursery.start_soon(save_one, org, record)
        if failure is not None:
            raise failure
        return stored

    async def load(self, org: str, session: str) -> SessionRecord | None:
        reply = await self._scripts.call(LOAD, (self.key(org, session).encode(),), (), write=False)
        if not reply:
            return None
        return decode_record(session, reply)

    async def delete(self, org: str, session: str) -> None:
        await self._scripts.call(DELETE, (self.key(org, session).encode(),), (), write=True)
