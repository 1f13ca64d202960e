"""Typed client commands: one frozen attrs class per protocol op.

A command only exists once `codec.decode_command` validated it, so the I/O
layer can trust every field:

- `id` is an int (never a bool) within signed 64 bits;
- channel names, state keys and group names follow `names`;
- `since` is a valid event id; `"0"` (everything retained) arrives as `"0-0"`;
- JSON payloads (`Publish.data`, `StateSet.value`, `StatePatch.patch`) are
  compact JSON *text*, re-encoded by orjson, ready to store and to embed in
  pushes without parsing again (`orjson.Fragment`).

Every class carries its wire name as the class variable `op`.
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import attrs

DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000
MAX_ACK_IDS = 1000
DEFAULT_PRESENCE_LIMIT = 1000
MAX_PRESENCE_LIMIT = 10000


@attrs.frozen
class Resume:
    """`auth.resume`: the session to resume and the last event id the client
    saw per channel (client positions win over the server's)."""

    session: str
    positions: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Auth:
    op: ClassVar[str] = "auth"
    id: int
    token: str
    resume: Resume | None = None


@attrs.frozen
class Refresh:
    op: ClassVar[str] = "refresh"
    id: int
    token: str


@attrs.frozen
class Subscribe:
    op: ClassVar[str] = "subscribe"
    id: int
    channel: str
    since: str | None = None
    group: str | None = None
    presence: bool = False


@attrs.frozen
class Unsubscribe:
    op: ClassVar[str] = "unsubscribe"
    id: int
    channel: str
    group: str | None = None


@attrs.frozen
class Publish:
    op: ClassVar[str] = "publish"
    id: int
    channel: str
    data: str
    key: str | None = None


@attrs.frozen
class History:
    op: ClassVar[str] = "history"
    id: int
    channel: str
    since: str | None = None
    limit: int = DEFAULT_HISTORY_LIMIT


@attrs.frozen
class Ack:
    op: ClassVar[str] = "ack"
    id: int
    channel: str
    group: str
    ids: tuple[str, ...]


@attrs.frozen
class Presence:
    op: ClassVar[str] = "presence"
    id: int
    channel: str
    limit: int = DEFAULT_PRESENCE_LIMIT


@attrs.frozen
class StateGet:
    op: ClassVar[str] = "state.get"
    id: int
    key: str


@attrs.frozen
class StateSet:
    op: ClassVar[str] = "state.set"
    id: int
    key: str
    value: str
    version: int | None = None


@attrs.frozen
class StatePatch:
    op: ClassVar[str] = "state.patch"
    id: int
    key: str
    patch: str
    version: int | None = None


@attrs.frozen
class StateDelete:
    op: ClassVar[str] = "state.delete"
    id: int
    key: str
    version: int | None = None


@attrs.frozen
class StateSubscribe:
    op: ClassVar[str] = "state.subscribe"
    id: int
    key: str


@attrs.frozen
class StateUnsubscribe:
    op: ClassVar[str] = "state.unsubscribe"
    id: int
    key: str


@attrs.frozen
class Ping:
    op: ClassVar[str] = "ping"
    id: int


Command: TypeAlias = (
    Auth
    | Refresh
    | Subscribe
    | Unsubscribe
    | Publish
    | History
    | Ack
    | Presence
    | StateGet
    | StateSet
    | StatePatch
    | StateDelete
    | StateSubscribe
    | StateUnsubscribe
    | Ping
)

COMMAND_TYPES: tuple[type[Command], ...] = (
    Auth,
    Refresh,
    Subscribe,
    Unsubscribe,
    Publish,
    History,
    Ack,
    Presence,
    StateGet,
    StateSet,
    StatePatch,
    StateDelete,
    StateSubscribe,
    StateUnsubscribe,
    Ping,
)
"""Every command class, in PROTOCOL.md's order."""

OPS: frozenset[str] = frozenset(cls.op for cls in COMMAND_TYPES)
