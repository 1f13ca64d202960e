"""The codec and the name rules, synchronously: frames in, typed commands out;
typed replies in, text out (PROTOCOL.md v1)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from apix_trio.protocol import (
    COMMAND_TYPES,
    OPS,
    Ack,
    Auth,
    ErrorCode,
    FrameError,
    History,
    InvalidName,
    Ping,
    Presence,
    Publish,
    PushKind,
    Refresh,
    Resume,
    StateDelete,
    StateGet,
    StatePatch,
    StateSet,
    StateSubscribe,
    StateUnsubscribe,
    Subscribe,
    Unsubscribe,
    channel_tokens,
    check_channel,
    check_group,
    check_idempotency_key,
    check_org,
    check_state_key,
    check_sub,
    compile_pattern,
    decode_command,
    encode_error,
    encode_event,
    encode_event_push,
    encode_event_push_bytes,
    encode_ok,
    encode_push,
    is_channel,
    is_group,
    is_org,
    is_sub,
    pattern_matches,
)
from apix_trio.protocol.event import Event


def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


def decode_error(text: str) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_command(text)
    return info.value


# ------------------------------------------------------------- round trips

ROUND_TRIPS: list[tuple[dict[str, Any], object]] = [
    ({"op": "auth", "id": 1, "token": "t.o.k"}, Auth(1, "t.o.k")),
    (
        {
            "op": "auth",
            "id": 1,
            "token": "tok",
            "resume": {"session": "s1", "positions": {"chat.room42": "5-1", "a": "0"}},
        },
        Auth(1, "tok", Resume("s1", {"chat.room42": "5-1", "a": "0-0"})),
    ),
    (
        {"op": "auth", "id": 1, "token": "tok", "resume": {"session": "s"}},
        Auth(1, "tok", Resume("s")),
    ),
    ({"op": "auth", "id": 1, "token": "tok", "resume": None}, Auth(1, "tok")),
    ({"op": "refresh", "id": 2, "token": "new"}, Refresh(2, "new")),
    ({"op": "subscribe", "id": 3, "channel": "chat.room42"}, Subscribe(3, "chat.room42")),
    (
        {
            "op": "subscribe",
            "id": 3,
            "channel": "c",
            "since": "17-3",
            "group": "workers",
            "presence": True,
        },
        Subscribe(3, "c", "17-3", "workers", True),
    ),
    ({"op": "subscribe", "id": 3, "channel": "c", "since": "0"}, Subscribe(3, "c", "0-0")),
    (
        {"op": "subscribe", "id": 3, "channel": "c", "since": None, "group": None},
        Subscribe(3, "c"),
    ),
    ({"op": "unsubscribe", "id": 4, "channel": "c"}, Unsubscribe(4, "c")),
    ({"op": "unsubscribe", "id": 4, "channel": "c", "group": "g"}, Unsubscribe(4, "c", "g")),
    (
        {"op": "publish", "id": 5, "channel": "c", "data": {"b": [1, 2.5, None], "a": "é"}},
        Publish(5, "c", '{"b":[1,2.5,null],"a":"é"}'),
    ),
    ({"op": "publish", "id": 5, "channel": "c", "data": None}, Publish(5, "c", "null")),
    (
        {"op": "publish", "id": 5, "channel": "c", "data": "x", "key": "k1"},
        Publish(5, "c", '"x"', "k1"),
    ),
    ({"op": "history", "id": 6, "channel": "c"}, History(6, "c", None, 100)),
    (
        {"op": "history", "id": 6, "channel": "c", "since": "1-0", "limit": 1000},
        History(6, "c", "1-0", 1000),
    ),
    (
        {"op": "ack", "id": 7, "channel": "c", "group": "g", "ids": ["1-0", "2-5"]},
        Ack(7, "c", "g", ("1-0", "2-5")),
    ),
    ({"op": "presence", "id": 8, "channel": "c"}, Presence(8, "c")),
    ({"op": "presence", "id": 8, "channel": "c"}, Presence(8, "c", 1000)),
    ({"op": "presence", "id": 8, "channel": "c", "limit": 10000}, Presence(8, "c", 10000)),
    ({"op": "presence", "id": 8, "channel": "c", "limit": None}, Presence(8, "c", 1000)),
    ({"op": "state.get", "id": 9, "key": "doc.1"}, StateGet(9, "doc.1")),
    ({"op": "state.set", "id": 10, "key": "k", "value": [1]}, StateSet(10, "k", "[1]")),
    (
        {"op": "state.set", "id": 10, "key": "k", "value": None, "version": 0},
        StateSet(10, "k", "null", 0),
    ),
    (
        {"op": "state.patch", "id": 11, "key": "k", "patch": {"a": None}, "version": 3},
        StatePatch(11, "k", '{"a":null}', 3),
    ),
    # RFC 7396: any JSON value is a merge patch (a non-object one replaces the value).
    ({"op": "state.patch", "id": 11, "key": "k", "patch": [1]}, StatePatch(11, "k", "[1]")),
    ({"op": "state.patch", "id": 11, "key": "k", "patch": None}, StatePatch(11, "k", "null")),
    ({"op": "state.delete", "id": 15, "key": "doc.1"}, StateDelete(15, "doc.1")),
    ({"op": "state.delete", "id": 15, "key": "k", "version": 0}, StateDelete(15, "k", 0)),
    ({"op": "state.subscribe", "id": 12, "key": "k"}, StateSubscribe(12, "k")),
    ({"op": "state.unsubscribe", "id": 13, "key": "k"}, StateUnsubscribe(13, "k")),
    ({"op": "ping", "id": 14}, Ping(14)),
    ({"op": "ping", "id": -(2**63)}, Ping(-(2**63))),
    ({"op": "ping", "id": 2**63 - 1, "extra": {"ignored": True}}, Ping(2**63 - 1)),
]


@pytest.mark.parametrize(("fields", "expected"), ROUND_TRIPS)
def test_decode_every_op(fields: dict[str, Any], expected: object) -> None:
    assert decode_command(frame(**fields)) == expected


def test_round_trips_cover_every_op() -> None:
    assert {type(expected) for _, expected in ROUND_TRIPS} == set(COMMAND_TYPES)
    assert {cls.op for cls in COMMAND_TYPES} == OPS
    assert len(OPS) == 15


def test_publish_data_is_compact_json_text_that_round_trips() -> None:
    data = {"nested": {"list": [1, -2, 3.25, True, False, None, "ü😀"]}, "n": 2**64 - 1}
    text = f'{{"op":"publish", "id":1, "channel":"c", "data": {orjson.dumps(data).decode()}}}'
    command = decode_command(text)
    assert isinstance(command, Publish)
    assert " " not in command.data
    assert orjson.loads(command.data) == data


# ------------------------------------------------------------- frame errors


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"id": 1,}',
        '{"op":"ping","id":NaN}',
        '{"op":"ping","id":1,"x":Infinity}',
        '{"op":"ping","id":1,"x":1e400}',
        '"\\ud800"',
        "[" * 2000 + "]" * 2000,
    ],
)
def test_invalid_json_is_bad_request_with_null_id(text: str) -> None:
    error = decode_error(text)
    assert (error.id, error.code) == (None, ErrorCode.BAD_REQUEST)
    assert error.message


@pytest.mark.parametrize("text", ["[]", "1", '"ping"', "null", "true", '[{"op":"ping","id":1}]'])
def test_non_object_is_bad_request_with_null_id(text: str) -> None:
    error = decode_error(text)
    assert (error.id, error.code) == (None, ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize(
    "id_json",
    [
        "null",
        "true",
        "false",
        '"1"',
        "1.0",
        "1.5",
        "[1]",
        "{}",
        str(2**63),
        str(-(2**63) - 1),
        str(2**64),
    ],
)
def test_missing_or_non_integer_id_is_null(id_json: str) -> None:
    error = decode_error(f'{{"op":"ping","id":{id_json}}}')
    assert (error.id, error.code) == (None, ErrorCode.BAD_REQUEST)
    error = decode_error('{"op":"ping"}')
    assert (error.id, error.code) == (None, ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize("op", [None, 1, "PING", "state", "state.del", "", "subscribe "])
def test_missing_or_unknown_op_echoes_id(op: object) -> None:
    fields: dict[str, Any] = {"id": 42}
    if op is not None:
        fields["op"] = op
    error = decode_error(frame(**fields))
    assert (error.id, error.code) == (42, ErrorCode.BAD_REQUEST)


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"op": "auth"}, "token"),
    ({"op": "auth", "token": 5}, "token"),
    ({"op": "auth", "token": None}, "token"),
    ({"op": "auth", "token": "t", "resume": "s"}, "resume"),
    ({"op": "auth", "token": "t", "resume": {}}, "resume.session"),
    ({"op": "auth", "token": "t", "resume": {"session": ""}}, "resume.session"),
    ({"op": "auth", "token": "t", "resume": {"session": "s" * 129}}, "resume.session"),
    ({"op": "auth", "token": "t", "resume": {"session": "s", "positions": []}}, "resume.positions"),
    (
        {"op": "auth", "token": "t", "resume": {"session": "s", "positions": {"a..b": "1-0"}}},
        "resume.positions",
    ),
    (
        {"op": "auth", "token": "t", "resume": {"session": "s", "positions": {"a": "x"}}},
        "resume.positions",
    ),
    (
        {"op": "auth", "token": "t", "resume": {"session": "s", "positions": {"a": 1}}},
        "resume.positions",
    ),
    ({"op": "refresh"}, "token"),
    ({"op": "subscribe"}, "channel"),
    ({"op": "subscribe", "channel": 1}, "channel"),
    ({"op": "subscribe", "channel": ""}, "channel"),
    ({"op": "subscribe", "channel": "a b"}, "channel"),
    ({"op": "subscribe", "channel": "c", "since": "abc"}, "since"),
    ({"op": "subscribe", "channel": "c", "since": 5}, "since"),
    ({"op": "subscribe", "channel": "c", "since": "01-0"}, "since"),
    ({"op": "subscribe", "channel": "c", "since": "1-0 "}, "since"),
    ({"op": "subscribe", "channel": "c", "since": f"{2**64}-0"}, "since"),
    ({"op": "subscribe", "channel": "c", "group": ""}, "group"),
    ({"op": "subscribe", "channel": "c", "group": "a.b"}, "group"),
    ({"op": "subscribe", "channel": "c", "group": "g" * 65}, "group"),
    ({"op": "subscribe", "channel": "c", "presence": 1}, "presence"),
    ({"op": "subscribe", "channel": "c", "presence": "true"}, "presence"),
    ({"op": "unsubscribe", "channel": "c", "group": 3}, "group"),
    ({"op": "publish", "channel": "c"}, "data"),
    ({"op": "publish", "data": 1}, "channel"),
    ({"op": "publish", "channel": "c", "data": 1, "key": ""}, "key"),
    ({"op": "publish", "channel": "c", "data": 1, "key": "k" * 129}, "key"),
    ({"op": "publish", "channel": "c", "data": 1, "key": 7}, "key"),
    ({"op": "history", "channel": "c", "limit": 0}, "limit"),
    ({"op": "history", "channel": "c", "limit": 1001}, "limit"),
    ({"op": "history", "channel": "c", "limit": True}, "limit"),
    ({"op": "history", "channel": "c", "limit": 10.0}, "limit"),
    ({"op": "presence", "channel": "c", "limit": 0}, "limit"),
    ({"op": "presence", "channel": "c", "limit": 10001}, "limit"),
    ({"op": "presence", "channel": "c", "limit": "5"}, "limit"),
    ({"op": "history", "channel": "c", "since": "1"}, "since"),
    ({"op": "ack", "channel": "c", "ids": ["1-0"]}, "group"),
    ({"op": "ack", "channel": "c", "group": "g"}, "ids"),
    ({"op": "ack", "channel": "c", "group": "g", "ids": []}, "ids"),
    ({"op": "ack", "channel": "c", "group": "g", "ids": "1-0"}, "ids"),
    ({"op": "ack", "channel": "c", "group": "g", "ids": ["1-0"] * 1001}, "ids"),
    ({"op": "ack", "channel": "c", "group": "g", "ids": ["1-0", "0"]}, "ids[1]"),
    ({"op": "ack", "channel": "c", "group": "g", "ids": ["1-0", 2]}, "ids[1]"),
    ({"op": "presence"}, "channel"),
    ({"op": "state.get"}, "key"),
    ({"op": "state.get", "key": "a.b.c.d.e.f.g.h.i"}, "key"),
    ({"op": "state.set", "key": "k"}, "value"),
    ({"op": "state.set", "key": "k", "value": 1, "version": -1}, "version"),
    ({"op": "state.set", "key": "k", "value": 1, "version": "1"}, "version"),
    ({"op": "state.set", "key": "k", "value": 1, "version": False}, "version"),
    ({"op": "state.patch", "key": "k"}, "patch"),
    ({"op": "state.delete"}, "key"),
    ({"op": "state.delete", "key": "k", "version": -1}, "version"),
    ({"op": "state.delete", "key": "k", "version": True}, "version"),
    ({"op": "state.patch", "key": "k", "patch": {}, "version": 1.5}, "version"),
    ({"op": "state.subscribe", "key": None}, "key"),
    ({"op": "state.unsubscribe", "key": ""}, "key"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS)
def test_invalid_field_is_bad_request_echoing_id(fields: dict[str, Any], field: str) -> None:
    error = decode_error(frame(id=99, **fields))
    assert (error.id, error.code) == (99, ErrorCode.BAD_REQUEST)
    assert error.message.startswith(f"{field}")


def test_too_deep_payload_is_bad_request() -> None:
    deep = "[" * 300 + "]" * 300
    error = decode_error(f'{{"op":"publish","id":3,"channel":"c","data":{deep}}}')
    assert (error.id, error.code) == (3, ErrorCode.BAD_REQUEST)
    assert error.message.startswith("data")


def test_error_messages_do_not_echo_huge_input() -> None:
    error = decode_error(frame(id=1, op="x" * 10_000))
    assert len(error.message) < 100
    error = decode_error(frame(id=1, op="subscribe", channel="y" * 10_000))
    assert len(error.message) < 300


# ------------------------------------------------------------- encoders


def test_encode_ok() -> None:
    text = encode_ok(7, {"channel": "c", "position": "0-0", "recovered": True, "replayed": 0})
    assert isinstance(text, str)
    assert orjson.loads(text) == {
        "id": 7,
        "ok": True,
        "result": {"channel": "c", "position": "0-0", "recovered": True, "replayed": 0},
    }
    assert orjson.loads(encode_ok(1, {})) == {"id": 1, "ok": True, "result": {}}


def test_encode_error_with_extras_and_null_id() -> None:
    assert orjson.loads(encode_error(None, ErrorCode.BAD_REQUEST, "nope")) == {
        "id": None,
        "ok": False,
        "error": {"code": "bad_request", "message": "nope"},
    }
    assert orjson.loads(encode_error(3, ErrorCode.RATE_LIMITED, "slow", retry_after=1.5)) == {
        "id": 3,
        "ok": False,
        "error": {"code": "rate_limited", "message": "slow", "retry_after": 1.5},
    }
    conflict = orjson.loads(encode_error(4, ErrorCode.CONFLICT, "stale", version=12))
    assert conflict["error"] == {"code": "conflict", "message": "stale", "version": 12}


def test_encode_push() -> None:
    assert orjson.loads(encode_push(PushKind.TOKEN_EXPIRING, exp=123)) == {
        "push": "token_expiring",
        "exp": 123,
    }
    state = encode_push("state", key="k", version=2, value=orjson.Fragment('{"a":1}'))
    assert orjson.loads(state) == {"push": "state", "key": "k", "version": 2, "value": {"a": 1}}


def test_encode_event_push_embeds_data_and_omits_missing_key() -> None:
    event = Event(id="1732550000123-0", ts=1732550000123, data='{"any":"json"}', sender="alice")
    text = encode_event_push("chat.room42", event)
    assert text == (
        '{"push":"event","channel":"chat.room42","event":{"id":"1732550000123-0",'
        '"ts":1732550000123,"data":{"any":"json"},"from":"alice"}}'
    )
    assert encode_event_push_bytes("chat.room42", event) == text.encode()


def test_encode_event_push_with_key_and_group_extra() -> None:
    event = Event(id="5-0", ts=5, data="[1,2]", sender="bob", key="k-1")
    pushed = orjson.loads(encode_event_push("jobs", event, {"group": "w", "attempt": 2}))
    assert pushed == {
        "push": "event",
        "channel": "jobs",
        "event": {"id": "5-0", "ts": 5, "data": [1, 2], "from": "bob", "key": "k-1"},
        "group": "w",
        "attempt": 2,
    }


def test_history_result_with_fragments() -> None:
    events = [Event("1-0", 1, '"a"', "x"), Event("2-0", 2, "null", "y", "k")]
    text = encode_ok(9, {"events": [encode_event(e) for e in events], "position": "2-0"})
    assert orjson.loads(text)["result"] == {
        "events": [
            {"id": "1-0", "ts": 1, "data": "a", "from": "x"},
            {"id": "2-0", "ts": 2, "data": None, "from": "y", "key": "k"},
        ],
        "position": "2-0",
    }


def test_published_data_survives_to_the_push_byte_for_byte() -> None:
    command = decode_command('{"op":"publish","id":1,"channel":"c","data":{ "x" : [ 1 , "ü" ] }}')
    assert isinstance(command, Publish)
    pushed = encode_event_push("c", Event("1-0", 1, command.data, "s"))
    assert '"data":{"x":[1,"ü"]}' in pushed


# ------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "chat.room42",
        "user.alice",
        "A-Z_0:9@x",
        "a.b.c.d.e.f.g.h",
        "x" * 200,
        ".".join(["y" * 24] * 8),  # 199 chars, 8 tokens
    ],
)
def test_valid_channels(name: str) -> None:
    assert is_channel(name)
    assert check_channel(name) == name
    assert check_state_key(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "a b",
        "a/b",
        "a*",
        "*",
        ">",
        "{sub}",
        "a.b.c.d.e.f.g.h.i",
        "x" * 201,
        ".".join(["y" * 25] * 8),  # 207 chars
        "café",
        "\uff58",  # fullwidth x
        "١٢",
        "a\n",
        "a\x00",
    ],
)
def test_invalid_channels(name: str) -> None:
    assert not is_channel(name)
    with pytest.raises(InvalidName):
        check_channel(name)
    with pytest.raises(InvalidName, match="state key"):
        check_state_key(name)
    with pytest.raises(ValueError):
        check_channel(name)


def test_org_rules() -> None:
    for org in ["a", "acme", "0", "a-b_c", "a" * 63]:
        assert is_org(org) and check_org(org) == org
    for org in ["", "A", "-a", "_a", "a" * 64, "a.b", "aé", "a\n"]:
        assert not is_org(org)
        with pytest.raises(InvalidName):
            check_org(org)


def test_sub_rules() -> None:
    for sub in ["alice", "auth0|123", "a b", "é😀", "x" * 128]:
        assert is_sub(sub) and check_sub(sub) == sub
    for sub in ["", "x" * 129, "a\nb", "a\x00", "\x7f", "a\u2028"]:
        assert not is_sub(sub)
        with pytest.raises(InvalidName):
            check_sub(sub)


def test_group_and_key_rules() -> None:
    assert is_group("g") and is_group("w-1:@_" + "x" * 58)
    for group in ["", "a.b", "a b", "x" * 65, "é"]:
        assert not is_group(group)
        with pytest.raises(InvalidName):
            check_group(group)
    assert check_idempotency_key("k") == "k"
    assert check_idempotency_key("é" * 128) == "é" * 128
    for key in ["", "k" * 129]:
        with pytest.raises(InvalidName):
            check_idempotency_key(key)


def matches(pattern: str, channel: str, sub: str = "alice") -> bool:
    return pattern_matches(compile_pattern(pattern), channel_tokens(check_channel(channel)), sub)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("chat.room42", "chat.room42", True),
        ("chat.room42", "chat.room43", False),
        ("chat.room42", "chat", False),
        ("chat.room42", "chat.room42.x", False),
        ("chat.*", "chat.room42", True),
        ("chat.*", "chat", False),
        ("chat.*", "chat.a.b", False),
        ("*.room", "chat.room", True),
        ("*", "anything", True),
        ("*", "a.b", False),
        ("chat.>", "chat.a", True),
        ("chat.>", "chat.a.b.c", True),
        ("chat.>", "chat", False),
        (">", "a", True),
        (">", "a.b.c.d.e.f.g.h", True),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("user.{sub}", "user.alice", True),
        ("user.{sub}", "user.bob", False),
        ("user.{sub}", "user.alice.inbox", False),
        ("user.{sub}.>", "user.alice.inbox", True),
        ("{sub}.*", "alice.x", True),
        ("Chat.*", "chat.x", False),
    ],
)
def test_pattern_matching(pattern: str, channel: str, expected: bool) -> None:
    assert matches(pattern, channel) is expected


@pytest.mark.parametrize("sub", ["a.b", "a b", "café", "", "a/b", "*", ">", "{sub}"])
def test_sub_outside_token_syntax_never_matches_sub_token(sub: str) -> None:
    compiled = compile_pattern("user.{sub}")
    for channel in ["user.a.b", "user.a", "user.b", "user.x"]:
        assert not pattern_matches(compiled, channel_tokens(channel), sub)
    assert not pattern_matches(compiled, ("user", sub), sub)


def test_compile_pattern_returns_tokens() -> None:
    assert compile_pattern("user.{sub}.>") == ("user", "{sub}", ">")
    assert compile_pattern("a.b.c.d.e.f.g.*") == ("a", "b", "c", "d", "e", "f", "g", "*")


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "a..b",
        ".a",
        "a.",
        ">.a",
        "a.>.b",
        "a*",
        "a.b*",
        "{sub}x",
        "{SUB}",
        "{user}",
        ">>",
        "**",
        "a.b.c.d.e.f.g.h.i",
        "x" * 201,
        "café.*",
    ],
)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(InvalidName):
        compile_pattern(pattern)
