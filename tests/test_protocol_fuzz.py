"""Property tests: whatever a client sends, the machine answers with a typed
command or a well-formed PROTOCOL.md error reply, and never raises."""

from __future__ import annotations

import json
from typing import Any

import attrs
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from apix_trio.protocol import (
    COMMAND_TYPES,
    OPS,
    Ack,
    Auth,
    CloseCode,
    ErrorCode,
    History,
    Publish,
    Rejection,
    ServerProtocol,
    StatePatch,
    StateSet,
    is_channel,
    is_group,
)
from apix_trio.protocol.ids import parse_id

FAST = settings(max_examples=300, deadline=None)
ERROR_CODES = {code.value for code in ErrorCode}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

plausible_strings = st.sampled_from(
    ["c", "chat.room42", "a..b", "", "0", "0-0", "1-0", "g", "x" * 201, "a.b.c.d.e.f.g.h.i"]
) | st.text(max_size=12)
field_values = json_values | plausible_strings | st.lists(plausible_strings, max_size=3)
FIELDS = [
    "id",
    "op",
    "token",
    "channel",
    "since",
    "group",
    "presence",
    "data",
    "key",
    "limit",
    "ids",
    "value",
    "patch",
    "version",
    "resume",
]


@st.composite
def frame_objects(draw: st.DrawFn) -> dict[str, Any]:
    """An object with an op and an id, and a few fields of random values."""
    obj: dict[str, Any] = {
        "op": draw(st.sampled_from(sorted(OPS)) | st.text(max_size=10)),
        "id": draw(st.integers(-(2**64), 2**64) | json_scalars),
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        obj[name] = draw(field_values)
    return obj


VALID_FRAMES = [
    '{"op":"auth","id":1,"token":"t","resume":{"session":"s","positions":{"c":"1-0"}}}',
    '{"op":"refresh","id":2,"token":"t"}',
    '{"op":"subscribe","id":3,"channel":"chat.room42","since":"0","group":"g","presence":true}',
    '{"op":"unsubscribe","id":4,"channel":"c","group":"g"}',
    '{"op":"publish","id":5,"channel":"c","data":{"a":[1,2]},"key":"k"}',
    '{"op":"history","id":6,"channel":"c","since":"1-0","limit":10}',
    '{"op":"ack","id":7,"channel":"c","group":"g","ids":["1-0","2-0"]}',
    '{"op":"presence","id":8,"channel":"c"}',
    '{"op":"state.get","id":9,"key":"k"}',
    '{"op":"state.set","id":10,"key":"k","value":{"x":1},"version":0}',
    '{"op":"state.patch","id":11,"key":"k","patch":{"x":null},"version":1}',
    '{"op":"state.subscribe","id":12,"key":"k"}',
    '{"op":"state.unsubscribe","id":13,"key":"k"}',
    '{"op":"state.delete","id":14,"key":"k","version":2}',
    '{"op":"ping","id":14}',
]


def to_json(value: Any) -> str:
    """JSON text; stdlib json, since it writes integers beyond 64 bits."""
    return json.dumps(value, ensure_ascii=len(repr(value)) % 2 == 0)


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """A valid frame with a few character-level edits."""
    text = draw(st.sampled_from(VALID_FRAMES))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        char = draw(st.characters())
        if kind == "insert":
            text = text[:position] + char + text[position:]
        elif kind == "delete":
            text = text[:position] + text[position + 1 :]
        elif kind == "replace":
            text = text[:position] + char + text[position + 1 :]
        else:
            text = text[:position]
    return text


@st.composite
def mutated_object(draw: st.DrawFn) -> str:
    """A valid frame with a field dropped, replaced or added at JSON level."""
    obj: dict[str, Any] = orjson.loads(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "replace", "add"]))
        if kind == "drop" and obj:
            del obj[draw(st.sampled_from(sorted(obj)))]
        elif kind == "replace" and obj:
            obj[draw(st.sampled_from(sorted(obj)))] = draw(field_values)
        else:
            obj[draw(st.sampled_from(FIELDS) | st.text(max_size=5))] = draw(field_values)
    return to_json(obj)


any_frame = (
    st.text()
    | st.text(st.characters(exclude_categories=()))  # lone surrogates too
    | json_values.map(to_json)
    | frame_objects().map(to_json)
    | mutated_text()
    | mutated_object()
)


def check_result(result: object, authenticated: bool) -> None:
    """The PROTOCOL.md shape of whatever receive_text returned."""
    if isinstance(result, Rejection):
        reply = orjson.loads(result.reply)
        assert set(reply) == {"id", "ok", "error"}
        assert reply["ok"] is False
        assert reply["id"] is None or type(reply["id"]) is int
        error = reply["error"]
        assert set(error) == {"code", "message"}
        assert error["code"] in ERROR_CODES
        assert error["code"] == result.code.value
        assert isinstance(error["message"], str) and error["message"]
        assert result.close in (None, CloseCode.POLICY_VIOLATION)
        if result.close is not None:
            assert result.code is ErrorCode.BAD_REQUEST
        return
    assert isinstance(result, COMMAND_TYPES)
    assert type(result.id) is int and -(2**63) <= result.id < 2**63
    assert authenticated != isinstance(result, Auth)
    check_command(result)


def check_command(command: Any) -> None:
    """Decoded fields keep the promises of `frames`."""
    fields = attrs.asdict(command, recurse=False)
    if "channel" in fields:
        assert is_channel(fields["channel"])
    if fields.get("group") is not None:
        assert is_group(fields["group"])
    if fields.get("since") is not None:
        parse_id(fields["since"])
        assert fields["since"] != "0"
    if isinstance(command, Publish):
        orjson.loads(command.data)
    if isinstance(command, StateSet):
        orjson.loads(command.value)
    if isinstance(command, StatePatch):
        # any JSON value (RFC 7396: a non-object patch replaces the value;
        # tests/test_protocol_codec.py, PROTOCOL.md `state.patch`)
        orjson.loads(command.patch)
    if isinstance(command, Ack):
        assert 1 <= len(command.ids) <= 1000
        for event_id in command.ids:
            parse_id(event_id)
    if isinstance(command, History):
        assert 1 <= command.limit <= 1000


@FAST
@given(text=any_frame, authenticated=st.booleans())
def test_receive_text_never_raises(text: str, authenticated: bool) -> None:
    protocol = ServerProtocol(bad_frames_limit=3)
    if authenticated:
        protocol.mark_authenticated()
    check_result(protocol.receive_text(text), authenticated)


BAD_FRAMES = ["{", "[]", '{"op":"ping"}', '{"op":"nope","id":1}', '{"op":"ack","id":2}']


@FAST
@given(
    frames=st.lists(
        st.sampled_from(VALID_FRAMES) | st.sampled_from(BAD_FRAMES) | any_frame, max_size=12
    ),
    limit=st.integers(1, 5),
)
def test_bad_frame_streak_matches_the_replies(frames: list[str], limit: int) -> None:
    protocol = ServerProtocol(bad_frames_limit=limit)
    protocol.mark_authenticated()
    streak = 0
    for text in frames:
        result = protocol.receive_text(text)
        check_result(result, authenticated=True)
        if isinstance(result, Rejection) and result.code is ErrorCode.BAD_REQUEST:
            streak += 1
        else:
            streak = 0
        assert protocol.bad_frame_count == streak
        closes = isinstance(result, Rejection) and result.close is CloseCode.POLICY_VIOLATION
        assert closes == (isinstance(result, Rejection) and streak >= limit)


@FAST
@given(
    id=st.integers(-(2**63), 2**63 - 1),
    data=json_values,
    key=st.none() | st.text(min_size=1, max_size=128),
)
def test_decoded_publish_data_round_trips(id: int, data: Any, key: str | None) -> None:
    protocol = ServerProtocol(bad_frames_limit=3)
    protocol.mark_authenticated()
    obj = {"op": "publish", "id": id, "channel": "c", "data": data, "key": key}
    result = protocol.receive_text(to_json(obj))
    assert isinstance(result, Publish), result
    assert (result.id, result.key) == (id, key)
    assert result.data == orjson.dumps(orjson.loads(to_json(data))).decode()
