"""Presence of the embedded broker (`PresenceStore` in memory).

Same observable semantics as the Redis implementation (`redis/presence.py`);
the contract suite runs against both.

A channel is a `_Channel`: its members by conn, in join order (a dict keeps
insertion order), the number of members per sub (for `users`) and its last
position. A change is handed to the broker's fan-out (`fan_out`, the
listener events go to) before the call returns, so changes reach the router
in position order. A channel that empties stays as a tombstone (its last
position) for `TOMBSTONE_GRACE`; `_sweep` forgets at most `_SWEEP_BATCH`
old tombstones per call, oldest first.

Leases run on `trio.current_time()` (timer tests use a MockClock); `since`,
positions and the change's `ts` use the broker's wall clock, as event ids
do. Every public coroutine checkpoints first and then runs without awaiting,
so each is atomic with respect to other tasks: concurrent reapers cannot
both remove a member.
"""

from __future__ import annotations

from collections.abc import Callable

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
from apix_trio.protocol import ids
from apix_trio.protocol.event import Event

FanOut = Callable[[str, str, Event], None]
"""`fan_out(org, channel, event)`: the embedded broker's listener call."""

_SWEEP_BATCH = 32

ChannelKey = tuple[str, str]


@attrs.define(eq=False)
class _Member:
    node: str
    sub: str
    conn: str
    text: str


@attrs.define(eq=False)
class _Channel:
    members: dict[str, _Member] = attrs.Factory(dict)
    subs: dict[str, int] = attrs.Factory(dict)
    last: ids.StreamId = ids.ZERO


def member_text(sub: str, conn: str, since: int, info: str | None) -> str:
    """The wire form of a member, compact JSON (info embedded as is)."""
    fields: dict[str, object] = {"sub": sub, "conn": conn, "since": since}
    if info is not None:
        fields["info"] = orjson.Fragment(info)
    return orjson.dumps(fields).decode()


class MemoryPresence(PresenceStore):
    """See the module docstring. Made by `MemoryBroker.presence`."""

    def __init__(self, fan_out: FanOut, wall_clock: Callable[[], float]) -> None:
        self._fan_out = fan_out
        self._wall_clock = wall_clock
        self._channels: dict[ChannelKey, _Channel] = {}
        self._emptied: dict[ChannelKey, float] = {}
        """Tombstones (channels without members) with when they emptied, oldest first."""
        self._leases: dict[str, float] = {}

    def _now_ms(self) -> int:
        return max(int(self._wall_clock() * 1000), 0)

    def _sweep(self) -> None:
        forget_before = self._wall_clock() - TOMBSTONE_GRACE
        for _ in range(_SWEEP_BATCH):
            oldest = next(iter(self._emptied.items()), None)
            if oldest is None or oldest[1] > forget_before:
                return
            del self._emptied[oldest[0]]
            del self._channels[oldest[0]]

    def _change(self, key: ChannelKey, state: _Channel, kind: str, member: _Member) -> str:
        state.last = ids.next_id(state.last, self._now_ms())
        position = ids.format_id(state.last)
        data = f'{{"{kind}":{member.text}}}'
        event = Event(id=position, ts=state.last[0], data=data, sender=member.sub, key=member.conn)
        self._fan_out(key[0], presence_channel(key[1]), event)
        return position

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
        await trio.lowlevel.checkpoint()
        self._sweep()
        key = (org, channel)
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _Channel()
        present = state.members.get(conn)
        if present is not None:
            present.node = node
            return JoinOutcome(JoinStatus.ALREADY, ids.format_id(state.last))
        if len(state.members) >= max_members:
            if not state.members and key not in self._emptied:
                del self._channels[key]
            return JoinOutcome(JoinStatus.FULL, ids.format_id(state.last))
        self._emptied.pop(key, None)
        member = _Member(node, sub, conn, member_text(sub, conn, self._now_ms(), info))
        state.members[conn] = member
        state.subs[sub] = state.subs.get(sub, 0) + 1
        return JoinOutcome(JoinStatus.JOINED, self._change(key, state, "join", member))

    async def leave(self, org: str, channel: str, conn: str) -> Leaver | None:
        await trio.lowlevel.checkpoint()
        self._sweep()
        return self._remove((org, channel), conn)

    def _remove(self, key: ChannelKey, conn: str) -> Leaver | None:
        state = self._channels.get(key)
        if state is None:
            return None
        member = state.members.pop(conn, None)
        if member is None:
            return None
        left = state.subs[member.sub] - 1
        if left:
            state.subs[member.sub] = left
        else:
            del state.subs[member.sub]
        self._change(key, state, "leave", member)
        if not state.members:
            self._emptied[key] = self._wall_clock()
        return Leaver(member.text, member.node)

    async def members(self, org: str, channel: str, limit: int) -> Snapshot:
        await trio.lowlevel.checkpoint()
        self._sweep()
        state = self._channels.get((org, channel))
        if state is None:
            return Snapshot("[]", 0, 0, ids.ZERO_TEXT)
        texts: list[str] = []
        for member in state.members.values():
            if len(texts) >= limit:
                break
            texts.append(member.text)
        return Snapshot(
            f"[{','.join(texts)}]", len(state.members), len(state.subs), ids.format_id(state.last)
        )

    async def register_node(self, node: str, ttl: float) -> None:
        await trio.lowlevel.checkpoint()
        self._leases[node] = trio.current_time() + ttl

    async def refresh_node(self, node: str, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        until = self._leases.get(node)
        if until is None or until <= now:
            return False
        self._leases[node] = now + ttl
        return True

    async def forget_node(self, node: str) -> None:
        await trio.lowlevel.checkpoint()
        self._leases.pop(node, None)

    async def reap(self) -> list[Leaver]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        dead = {node for node, until in self._leases.items() if until <= now}
        if not dead:
            return []
        removed: list[Leaver] = []
        for key, state in list(self._channels.items()):
            for conn in [c for c, member in state.members.items() if member.node in dead]:
                leaver = self._remove(key, conn)
                if leaver is not None:
                    removed.append(leaver)
        for node in dead:
            del self._leases[node]
        return removed
