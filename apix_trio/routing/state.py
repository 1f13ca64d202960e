"""One connection's watch on one state key, and the subscribe seam.

Theory of operation
-------------------
State changes arrive at the router like events, as events of the
pseudo-channel `$state.<key>` (`broker.state`), per key in version order
(the event id is `<version>-0`). The router builds each change's push frame
once (`encode_state_push`, registered for "$state") and offers it to every
`StateWatch` of that pseudo-channel on this node.

The seam (`state.subscribe`, and a resume restoring a key), like the replay
seam of `subscriptions`:

1. register the watch with the router first, parked: changes offered now
   are kept aside, nothing slips past unseen;
2. read the value and its version from the broker;
3. reply with them;
4. `go_live(version)`: deliver the parked changes with a higher version,
   then deliver directly.

Every delivered change advances `version` and anything not newer is
dropped, so a change the reply already shows is never pushed, and none after
it is missed (the router sees every change, in order, and the broker made
each change before it fanned it out). If more than `PENDING_LIMIT` changes
park during the read they are dropped and `go_live` reads the value again,
pushing it as one `{"push": "state", "key", "version", "value"}` (what a set
looks like) before the changes after it.

Pushes go through the connection's outbox like events (`enqueue_event`,
never blocking): a full outbox closes the connection as a slow consumer
(4009).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.state import (
    STATE_PREFIX,
    StateValue,
    change_id,
    set_data,
    state_channel,
)
from apix_trio.protocol.codec import PushKind
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import StreamId
from apix_trio.protocol.wire import text_frame

STATE_KIND = STATE_PREFIX.rstrip(".")
"""The router's internal-channel kind of state changes ("$state")."""

PENDING_LIMIT = 10_000
"""Changes parked during one read before the watch reads again instead."""

_PUSH_HEAD = b'{"push":"' + PushKind.STATE.value.encode() + b'","key":'


def encode_state_push(pseudo_channel: str, event: Event) -> bytes:
    """`{"push": "state", "key", "version", "value"|"patch"}` as JSON bytes,
    from a change event (its data is `{"value"|"patch": ...}`, embedded as is:
    nothing is parsed)."""
    key = pseudo_channel[len(STATE_PREFIX) :]
    version = event.id.partition("-")[0]
    return (
        _PUSH_HEAD
        + orjson.dumps(key)
        + b',"version":'
        + version.encode()
        + b","
        + event.data[1:].encode()
    )


def state_result(current: StateValue) -> dict[str, object]:
    """`{"value", "version"}` of a reply, the value embedded as stored."""
    return {"value": orjson.Fragment(current.value), "version": current.version}


class StateSink(Protocol):
    """The connection a watch pushes to (`gateway.connection.Connection`)."""

    def enqueue_event(self, frame: bytes, ts: int | None, /) -> None:
        """Write or queue a frame; never blocks (a full outbox closes, 4009)."""
        ...


class StateWatch:
    """See the module docstring. Owned by one connection, registered with the
    router under `pseudo_channel`."""

    def __init__(self, conn: StateSink, key: str) -> None:
        self.conn = conn
        self.key = key
        self.pseudo_channel = state_channel(key)
        self.version = 0
        """The last version the connection was given (reply or push)."""
        self.live = False
        self._pending: list[tuple[int, bytes]] = []
        self._overflowed = False

    def offer(self, event_id: StreamId, event: Event, frame: bytes) -> None:
        version = event_id[0]
        if not self.live:
            if len(self._pending) < PENDING_LIMIT:
                self._pending.append((version, frame))
            else:
                self._pending.clear()
                self._overflowed = True
            return
        self._deliver(version, frame)

    def _deliver(self, version: int, frame: bytes) -> None:
        if version <= self.version:
            return
        self.version = version
        self.conn.enqueue_event(frame, None)

    async def go_live(self, version: int, reread: Callable[[], Awaitable[StateValue]]) -> None:
        """Deliver the parked changes after `version` (the one the reply
        carried), then deliver directly. `reread` reads the value again after
        an overflow (see the module docstring).

        Error handling: when `reread` raises BrokerUnavailable the watch goes
        live without it: the client sees the version gap (PROTOCOL: it then
        calls `state.get`).
        """
        if version > self.version:
            self.version = version
        while self._overflowed:
            self._overflowed = False
            try:
                current = await reread()
            except BrokerUnavailable:
                break  # the client sees a version gap and calls state.get
            if current.version > self.version:
                self.version = current.version
                event = Event(change_id(current.version), 0, set_data(current.value), "")
                self.conn.enqueue_event(
                    text_frame(encode_state_push(self.pseudo_channel, event)), None
                )
        parked, self._pending = self._pending, []
        for item in parked:
            self._deliver(*item)
        self.live = True
