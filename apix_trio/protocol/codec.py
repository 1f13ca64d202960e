"""Text frames to typed commands, and typed replies to text frames.

Decoding (`decode_command`) promises: it returns a fully validated command
(see `frames`) or raises `FrameError`; nothing else escapes for any input
string. Rules a client author can rely on:

- the frame must be a JSON object with an integer `id` (not a bool, within
  signed 64 bits); otherwise the error's `id` is None (`"id": null`);
- once the id is known every error echoes it: unknown or missing `op`,
  missing or invalid field;
- an optional field given as JSON `null` counts as absent (`"since": null`
  is "no since"). Required JSON payloads (`data`, `value`, `patch`) may be `null`;
- unknown extra fields are ignored.

Encoding promises: every encoder makes exactly one `orjson.dumps` call and
returns the frame as `str` (WebSocket text). Stored JSON text (event data,
state values) is embedded with `orjson.Fragment`, never parsed again, so an
event push is encoded once and sent as is to every subscriber. Encoders
raise `orjson.JSONEncodeError` only for values the caller should never pass
(non-JSON types); that is a bug, not a client error.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import orjson

from apix_trio.protocol import frames as f
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.event import Event
from apix_trio.protocol.ids import ZERO_TEXT, BadStreamId, parse_id
from apix_trio.protocol.names import (
    InvalidName,
    check_channel,
    check_group,
    check_idempotency_key,
    check_state_key,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_SESSION_LENGTH = 128


class PushKind(enum.StrEnum):
    """The `push` values of server-to-client pushes."""

    CONNECTED = "connected"
    EVENT = "event"
    PRESENCE = "presence"
    STATE = "state"
    TOKEN_EXPIRING = "token_expiring"
    UNSUBSCRIBED = "unsubscribed"


class FrameError(Exception):
    """A frame the protocol cannot accept.

    `id` is the frame's id when it was readable (None otherwise, sent as
    `"id": null`), `code` the reply's error code, `message` human text.
    """

    def __init__(self, id: int | None, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.code = code
        self.message = message


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: object) -> bool:
    return type(value) is int


# --------------------------------------------------------------- decoding


_MISSING: Any = object()


class _Fields:
    """Typed access to one frame's fields; every failure is a bad_request
    naming the field and echoing the frame's id."""

    __slots__ = ("id", "obj")

    def __init__(self, id: int, obj: dict[str, Any]) -> None:
        self.id = id
        self.obj = obj

    def fail(self, field: str, message: str) -> NoReturn:
        raise FrameError(self.id, ErrorCode.BAD_REQUEST, f"{field}: {message}")

    def required(self, field: str) -> Any:
        value = self.obj.get(field, _MISSING)
        if value is _MISSING or value is None:
            self.fail(field, "is required")
        return value

    def string(self, field: str) -> str:
        value = self.required(field)
        if not isinstance(value, str):
            self.fail(field, "must be a string")
        return value

    def optional_string(self, field: str) -> str | None:
        value = self.obj.get(field)
        if value is not None and not isinstance(value, str):
            self.fail(field, "must be a string")
        return value

    def checked(self, field: str, check: Callable[[str], str], value: str) -> str:
        try:
            return check(value)
        except InvalidName as exc:
            self.fail(field, str(exc))

    def channel(self) -> str:
        return self.checked("channel", check_channel, self.string("channel"))

    def state_key(self) -> str:
        return self.checked("key", check_state_key, self.string("key"))

    def group(self) -> str:
        return self.checked("group", check_group, self.string("group"))

    def optional_group(self) -> str | None:
        group = self.optional_string("group")
        return None if group is None else self.checked("group", check_group, group)

    def event_id(self, field: str, value: object, *, allow_zero: bool) -> str:
        """A valid `<ms>-<seq>` id; with `allow_zero`, `"0"` becomes `"0-0"`."""
        if not isinstance(value, str):
            self.fail(field, "must be an event id string")
        if value == "0":
            if allow_zero:
                return ZERO_TEXT
            self.fail(field, "'0' is not an event id here")
        try:
            parse_id(value)
        except BadStreamId as exc:
            self.fail(field, str(exc))
        return value

    def since(self) -> str | None:
        value = self.obj.get("since")
        return None if value is None else self.event_id("since", value, allow_zero=True)

    def optional_int(self, field: str, low: int, high: int) -> int | None:
        value = self.obj.get(field)
        if value is None:
            return None
        if not _is_int(value) or not low <= value <= high:
            self.fail(field, f"must be an integer from {low} to {high}")
        return int(value)

    def optional_bool(self, field: str) -> bool:
        value = self.obj.get(field)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(field, "must be true or false")
        return value

    def json_text(self, field: str, *, object_only: bool = False) -> str:
        """Compact JSON text of a required payload field (`null` allowed
        unless `object_only`)."""
        if field not in self.obj:
            self.fail(field, "is required")
        value = self.obj[field]
        if object_only and not isinstance(value, dict):
            self.fail(field, "must be a JSON object")
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            # orjson reads 1024 levels deep but writes only 254.
            self.fail(field, "is nested too deeply")

    def resume(self) -> f.Resume | None:
        value = self.obj.get("resume")
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail("resume", "must be an object")
        session = value.get("session")
        if not isinstance(session, str) or not 1 <= len(session) <= MAX_SESSION_LENGTH:
            self.fail("resume.session", f"must be a string of 1-{MAX_SESSION_LENGTH} characters")
        raw = value.get("positions")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail("resume.positions", "must be an object of channel: event id")
        positions = {}
        for channel, position in raw.items():
            self.checked("resume.positions", check_channel, channel)
            positions[channel] = self.event_id(
                f"resume.positions[{_show(channel)}]", position, allow_zero=True
            )
        return f.Resume(session=session, positions=positions)

    def ack_ids(self) -> tuple[str, ...]:
        value = self.required("ids")
        if not isinstance(value, list) or not 1 <= len(value) <= f.MAX_ACK_IDS:
            self.fail("ids", f"must be a list of 1-{f.MAX_ACK_IDS} event ids")
        return tuple(
            self.event_id(f"ids[{index}]", item, allow_zero=False)
            for index, item in enumerate(value)
        )


def _auth(r: _Fields) -> f.Command:
    return f.Auth(r.id, r.string("token"), r.resume())


def _subscribe(r: _Fields) -> f.Command:
    return f.Subscribe(
        r.id, r.channel(), r.since(), r.optional_group(), r.optional_bool("presence")
    )


def _publish(r: _Fields) -> f.Command:
    key = r.optional_string("key")
    if key is not None:
        r.checked("key", check_idempotency_key, key)
    return f.Publish(r.id, r.channel(), r.json_text("data"), key)


def _history(r: _Fields) -> f.Command:
    limit = r.optional_int("limit", 1, f.MAX_HISTORY_LIMIT)
    return f.History(
        r.id, r.channel(), r.since(), f.DEFAULT_HISTORY_LIMIT if limit is None else limit
    )


def _presence(r: _Fields) -> f.Command:
    limit = r.optional_int("limit", 1, f.MAX_PRESENCE_LIMIT)
    return f.Presence(r.id, r.channel(), f.DEFAULT_PRESENCE_LIMIT if limit is None else limit)


def _state_set(r: _Fields) -> f.Command:
    return f.StateSet(
        r.id, r.state_key(), r.json_text("value"), r.optional_int("version", 0, INT64_MAX)
    )


def _state_patch(r: _Fields) -> f.Command:
    return f.StatePatch(
        r.id,
        r.state_key(),
        r.json_text("patch"),  # any JSON value (RFC 7396: a non-object replaces)
        r.optional_int("version", 0, INT64_MAX),
    )


_DECODERS: dict[str, Callable[[_Fields], f.Command]] = {
    f.Auth.op: _auth,
    f.Refresh.op: lambda r: f.Refresh(r.id, r.string("token")),
    f.Subscribe.op: _subscribe,
    f.Unsubscribe.op: lambda r: f.Unsubscribe(r.id, r.channel(), r.optional_group()),
    f.Publish.op: _publish,
    f.History.op: _history,
    f.Ack.op: lambda r: f.Ack(r.id, r.channel(), r.group(), r.ack_ids()),
    f.Presence.op: _presence,
    f.StateGet.op: lambda r: f.StateGet(r.id, r.state_key()),
    f.StateSet.op: _state_set,
    f.StatePatch.op: _state_patch,
    f.StateDelete.op: lambda r: f.StateDelete(
        r.id, r.state_key(), r.optional_int("version", 0, INT64_MAX)
    ),
    f.StateSubscribe.op: lambda r: f.StateSubscribe(r.id, r.state_key()),
    f.StateUnsubscribe.op: lambda r: f.StateUnsubscribe(r.id, r.state_key()),
    f.Ping.op: lambda r: f.Ping(r.id),
}


def decode_command(text: str) -> f.Command:
    """Decode and validate one client text frame.

    Error handling: raises `FrameError` (always `bad_request`) for invalid
    JSON, a non-object, a missing/non-integer id (then `id` is None), a
    missing or unknown `op`, and a missing or invalid field.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError(None, ErrorCode.BAD_REQUEST, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(None, ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    id = obj.get("id")
    if not isinstance(id, int) or isinstance(id, bool) or not INT64_MIN <= id <= INT64_MAX:
        raise FrameError(
            None, ErrorCode.BAD_REQUEST, "id: is required and must be a 64-bit integer"
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise FrameError(id, ErrorCode.BAD_REQUEST, "op: is required and must be a string")
    decoder = _DECODERS.get(op)
    if decoder is None:
        raise FrameError(id, ErrorCode.BAD_REQUEST, f"unknown op {_show(op)}")
    return decoder(_Fields(id, obj))


# --------------------------------------------------------------- encoding


def encode_ok(id: int, result: Mapping[str, Any]) -> str:
    """`{"id": N, "ok": true, "result": {...}}`; `result` may hold Fragments."""
    return orjson.dumps({"id": id, "ok": True, "result": result}).decode()


def encode_error(id: int | None, code: ErrorCode, message: str, /, **extra: Any) -> str:
    """`{"id": N|null, "ok": false, "error": {"code", "message", **extra}}`.

    `extra` carries `retry_after` for rate_limited and `version` for conflict.
    """
    error = {"code": code.value, "message": message, **extra}
    return orjson.dumps({"id": id, "ok": False, "error": error}).decode()


def encode_push(kind: str, /, **fields: Any) -> str:
    """`{"push": kind, **fields}`; field values may be Fragments."""
    return orjson.dumps({"push": kind, **fields}).decode()


def encode_event(event: Event) -> dict[str, Any]:
    """The wire form of an event (`id`, `ts`, `data`, `from`, `key` when
    set), with `data` as a Fragment; embed it in `encode_ok` results."""
    wire: dict[str, Any] = {
        "id": event.id,
        "ts": event.ts,
        "data": orjson.Fragment(event.data),
        "from": event.sender,
    }
    if event.key is not None:
        wire["key"] = event.key
    return wire


def encode_event_push_bytes(
    channel: str, event: Event, extra: Mapping[str, Any] | None = None
) -> bytes:
    """`{"push": "event", "channel", "event": {...}, **extra}` as UTF-8 bytes,
    in one dumps: the hot path, for building a WebSocket frame once per event.

    `extra` (e.g. `{"group": g, "attempt": n}`) goes at the top level.
    """
    push: dict[str, Any] = {
        "push": PushKind.EVENT.value,
        "channel": channel,
        "event": encode_event(event),
    }
    if extra:
        push.update(extra)
    return orjson.dumps(push)


def encode_event_push(channel: str, event: Event, extra: Mapping[str, Any] | None = None) -> str:
    """`encode_event_push_bytes` as `str` (a WebSocket text message)."""
    return encode_event_push_bytes(channel, event, extra).decode()
