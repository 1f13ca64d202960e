"""The fan-out side of the Redis broker: read every bus shard, call the listener.

Theory of operation
-------------------
Every publish appends a full copy of its event to its bus shard
`<prefix>:{b<shard>}:bus`, as one field `e` holding the JSON array
`[seq, org, channel, id, ts, from, key|null, data]` (one string per entry
keeps the reader's parsing cheap); `seq` is the shard's entry counter.
Every node runs one `BusReader`, which issues one `XREAD COUNT n BLOCK ms
STREAMS <all shards> <last id of each>` at a time on its own connection, and
hands each entry to the listener in order. A channel lives on one shard, and
the script appends to the channel stream and the bus together, so the
listener sees each channel's events in id order.

Where it starts: at the end of every shard (the last entry when the broker
opens), resolved into concrete ids so that a read that times out and is
repeated misses nothing. After a failed read (Redis down, connection lost,
timeout) it waits with capped backoff and resumes from the last id it handed
on: nothing live is lost (the bus keeps `bus_maxlen` entries per shard) and
nothing is doubled.

Discontinuities are detected, not skipped silently:

- a sequence gap (`seq` jumps by more than one): the shard was trimmed past
  the reader (it fell more than `bus_maxlen` entries behind); the missed
  events are gone from the bus (their channel streams may still hold them);
- a sequence that does not increase, or a shard whose end is *before* the
  reader's position after a reconnect: the bus was recreated (FLUSHALL, a
  restart without persistence, failover to a replica that lagged); the
  reader moves to the new end.

Both are logged as errors and counted (`BusStatistics.gaps`, `.resets`,
`.lost`); see docs/redis.md for what an operator should do.

The connection is the reader's own (`resp.RedisConnection`, trio-native,
hiredis parsing, replies left as bytes for orjson): each read is bounded by
the BLOCK time plus `operation_timeout`; a read that fails or times out drops
the connection, and the next attempt opens a new one. No silent retries (a
retried XREAD is harmless, but a silent one hides outages from `ok`).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import trio

from apix_trio.broker.model import BrokerUnavailable, Listener
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import RedisConnection, ReplyError, open_connection, parse_url
from apix_trio.broker.redis.support import RedisTuning, backoff_delay, pack_command, pack_words
from apix_trio.observability.logs import get_logger
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event

log = get_logger(__name__)

_NO_ENTRY = ("0-0", None)


@attrs.frozen
class BusStatistics:
    events: int
    """Bus entries handed to the listener."""
    reads: int
    """Successful XREAD calls."""
    failures: int
    """Failed reads and position lookups (each followed by a backoff)."""
    gaps: int
    """Times a shard was found trimmed past the reader."""
    lost: int
    """Bus entries skipped by those gaps (known from the sequence numbers)."""
    resets: int
    """Times a shard was found recreated (FLUSHALL, restart without data)."""


@attrs.define(eq=False)
class _Shard:
    name: str
    position: str
    seq: int | None


class BusReader:
    """Reads the bus shards of one broker and calls `listener` per event."""

    def __init__(self, url: str, layout: KeyLayout, timeout: float, tuning: RedisTuning) -> None:
        self.listener: Listener | None = None
        self.ok = False
        self._address = parse_url(url)
        self._names = layout.buses()
        self._encoded_names = [name.encode() for name in self._names]
        self._timeout = timeout
        self._tuning = tuning
        self._events = 0
        self._reads = 0
        self._failures = 0
        self._gaps = 0
        self._lost = 0
        self._resets = 0
        self._start_tails: list[tuple[str, int | None]] | None = None
        """Where to start when known before the first read (else: the ends
        the first connection finds)."""
        self.failure = ""
        """Why the last attempt to read failed ("" while reading)."""
        self.positioned = False
        """Whether the reader knows where it starts (where the bus ended when
        it first asked). Until then nothing published is known to reach the
        listener, so a subscription's replay cannot be joined to the live
        stream without a gap: the broker refuses reads meanwhile (see
        `RedisBroker._read`)."""

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            events=self._events,
            reads=self._reads,
            failures=self._failures,
            gaps=self._gaps,
            lost=self._lost,
            resets=self._resets,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Read the bus forever. Reports started once it knows where the bus
        ends, or after the first failure to learn it.

        Resource handling: owns its connection, closed after each failure
        and when cancelled.
        """
        shards: list[_Shard] | None = None
        failures = 0
        started = False
        last_error = ""
        while True:
            connection: RedisConnection | None = None
            tails: list[tuple[str, int | None]] | None = None
            try:
                with trio.move_on_after(self._timeout):
                    connection = await self._connect()
                    tails = await self._tails(connection)
                if connection is None or tails is None:
                    raise BrokerUnavailable(
                        f"redis bus positions: no answer within {self._timeout:g} s"
                    )
                if shards is None:
                    start = self._start_tails or tails
                    self.positioned = True
                    shards = [
                        _Shard(name, position, seq)
                        for name, (position, seq) in zip(self._names, start, strict=True)
                    ]
                else:
                    self._check_tails(shards, tails)
                if failures:
                    log.info("redis_bus_reading", after_failures=failures, **self._where())
                self.ok = True
                failures = 0
                last_error = self.failure = ""
                if not started:
                    started = True
                    task_status.started()
                await self._read_forever(connection, shards)
            except BrokerUnavailable as exc:
                if self.ok or failures == 0 or str(exc) != last_error:
                    log.warning("redis_bus_read_failed", error=str(exc))
                last_error = self.failure = str(exc)
                self.ok = False
                self._failures += 1
                failures += 1
                if not started:
                    started = True
                    task_status.started()
                if connection is not None:
                    await connection.aclose()
                    connection = None
                await trio.sleep(
                    backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
                )
            finally:
                if connection is not None:
                    await connection.aclose()

    async def _read_forever(self, connection: RedisConnection, shards: list[_Shard]) -> None:
        by_name = {shard.name.encode(): (index, shard) for index, shard in enumerate(shards)}
        read_timeout = self._tuning.bus_block_ms / 1000 + self._timeout
        # The command is packed once; only the positions of shards that moved change.
        words = (
            b"XREAD", b"COUNT", b"%d" % self._tuning.bus_count,
            b"BLOCK", b"%d" % self._tuning.bus_block_ms, b"STREAMS", *self._encoded_names,
        )  # fmt: skip
        head = b"*%d\r\n%s" % (len(words) + len(shards), pack_words(words))
        positions = [pack_words((shard.position.encode(),)) for shard in shards]
        vet = self._vet_command()
        while True:
            reply: Any = None
            verdict: Any = None
            answered = False
            with trio.move_on_after(read_timeout):
                await connection.send(head + b"".join(positions) + vet)
                reply = await connection.read_reply()
                if vet:
                    verdict = await connection.read_reply()
                answered = True
            if not answered:
                raise BrokerUnavailable(f"redis bus read: no answer within {read_timeout:g} s")
            if isinstance(reply, ReplyError):
                raise BrokerUnavailable(f"redis bus read failed: {reply}")
            if vet:
                self._vet(verdict)
            self._reads += 1
            self.ok = True
            for name, entries in reply or ():
                index, shard = by_name[name]
                for entry_id, fields in entries:
                    self._handle(shard, entry_id, fields)
                if entries:
                    last = entries[-1][0]
                    shard.position = last.decode()
                    positions[index] = pack_words((last,))

    def _handle(self, shard: _Shard, entry_id: bytes, fields: list[bytes]) -> None:
        try:
            raw = fields[1] if fields[0] == b"e" else fields[fields.index(b"e", 0, -1) + 1]
            seq_text, org, channel, event_id, ts, sender, key, data = orjson.loads(raw)
            seq = int(seq_text)
            event = Event(id=event_id, ts=int(ts), data=data, sender=sender, key=key)
        except (KeyError, ValueError, TypeError, IndexError):
            log.error("redis_bus_bad_entry", shard=shard.name, entry=entry_id.decode())
            return
        previous, shard.seq = shard.seq, seq
        if previous is not None and seq != previous + 1:
            if seq > previous:
                self._gaps += 1
                self._lost += seq - previous - 1
                log.error(
                    "redis_bus_gap",
                    shard=shard.name,
                    lost=seq - previous - 1,
                    hint="the reader fell more than bus_maxlen entries behind",
                )
            else:
                self._resets += 1
                log.error("redis_bus_recreated", shard=shard.name, seq=seq, previous=previous)
        self._events += 1
        listener = self.listener
        if listener is not None:
            try:
                listener(org, channel, event)
            except Exception:
                log.exception("listener_failed", org=org, channel=channel, id=event.id)

    def _vet_command(self) -> bytes:
        """A command pipelined after every XREAD on this connection (empty:
        none); Redis runs it right after the read returns, and `_vet` judges
        its reply before the read's entries are handed on."""
        return b""

    def _vet(self, verdict: Any) -> None:
        """Raise BrokerUnavailable when the read just made must not be
        handed on (see `_vet_command`); its entries are then read again on
        the next connection."""

    def _where(self) -> dict[str, str]:
        """Log fields naming where this reader reads."""
        return {"address": f"{self._address.host}:{self._address.port}"}

    async def _connect(self) -> RedisConnection:
        """The connection to read on (subclasses may pick another server)."""
        return await open_connection(self._address, decode=False)

    def _check_tails(self, shards: list[_Shard], tails: list[tuple[str, int | None]]) -> None:
        """After a reconnect: a shard that now ends before our position was
        recreated (or rolled back); continue from its new end."""
        for shard, (tail, seq) in zip(shards, tails, strict=True):
            if ids.parse_id(tail) < ids.parse_id(shard.position):
                self._resets += 1
                log.error(
                    "redis_bus_rolled_back", shard=shard.name, position=shard.position, end=tail
                )
                shard.position, shard.seq = tail, seq

    async def _tails(self, connection: RedisConnection) -> list[tuple[str, int | None]]:
        """The last entry id and sequence of every shard (one pipelined round trip)."""
        await connection.send(
            b"".join(
                pack_command(b"XREVRANGE", name, b"+", b"-", b"COUNT", b"1")
                for name in self._encoded_names
            )
        )
        tails: list[tuple[str, int | None]] = []
        for _ in self._encoded_names:
            entries = await connection.read_reply()
            if isinstance(entries, ReplyError):
                raise BrokerUnavailable(f"redis bus positions failed: {entries}")
            if entries:
                entry_id, fields = entries[0]
                try:
                    seq: int | None = int(orjson.loads(fields[1])[0])
                except (ValueError, TypeError, IndexError):
                    seq = None
                tails.append((entry_id.decode(), seq))
            else:
                tails.append(_NO_ENTRY)
        return tails
