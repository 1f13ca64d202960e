"""The per-connection state machine: auth gating and the bad-frame streak."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from apix_trio.protocol import (
    Auth,
    CloseCode,
    ErrorCode,
    Ping,
    Rejection,
    ServerProtocol,
    Subscribe,
)

AUTH = '{"op":"auth","id":1,"token":"jwt"}'
PING = '{"op":"ping","id":2}'
MALFORMED = "{nope"


def authed(limit: int = 10) -> ServerProtocol:
    protocol = ServerProtocol(bad_frames_limit=limit)
    assert isinstance(protocol.receive_text(AUTH), Auth)
    protocol.mark_authenticated()
    return protocol


def rejected(result: object) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


def reply(rejection: Rejection) -> dict[str, Any]:
    parsed = orjson.loads(rejection.reply)
    assert isinstance(parsed, dict)
    return parsed


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ServerProtocol(0)


def test_new_connection_is_unauthenticated() -> None:
    protocol = ServerProtocol(10)
    assert not protocol.authenticated
    assert protocol.bad_frame_count == 0


def test_ops_before_auth_get_unauthenticated_and_the_connection_stays() -> None:
    protocol = ServerProtocol(2)
    for id in range(5):
        rejection = rejected(protocol.receive_text(f'{{"op":"subscribe","id":{id},"channel":"c"}}'))
        assert rejection.close is None
        assert rejection.code is ErrorCode.UNAUTHENTICATED
        body = reply(rejection)
        assert body["id"] == id
        assert body["ok"] is False
        assert body["error"]["code"] == "unauthenticated"
        assert body["error"]["message"]
    assert protocol.bad_frame_count == 0
    # The connection may still authenticate afterwards.
    assert protocol.receive_text(AUTH) == Auth(1, "jwt")
    protocol.mark_authenticated()
    assert protocol.authenticated
    assert protocol.receive_text(PING) == Ping(2)


def test_auth_is_returned_until_marked_so_a_failed_auth_can_be_retried() -> None:
    protocol = ServerProtocol(10)
    assert isinstance(protocol.receive_text(AUTH), Auth)
    # The I/O layer rejected the token (no mark_authenticated): retry works.
    assert isinstance(protocol.receive_text(AUTH), Auth)
    assert not protocol.authenticated


def test_malformed_before_auth_is_bad_request_not_unauthenticated() -> None:
    protocol = ServerProtocol(10)
    body = reply(rejected(protocol.receive_text('{"op":"ping"}')))
    assert body["id"] is None
    assert body["error"]["code"] == "bad_request"
    body = reply(rejected(protocol.receive_text('{"op":"bogus","id":3}')))
    assert (body["id"], body["error"]["code"]) == (3, "bad_request")
    assert protocol.bad_frame_count == 2


def test_second_auth_after_authentication_is_bad_request() -> None:
    protocol = authed()
    rejection = rejected(protocol.receive_text('{"op":"auth","id":5,"token":"again"}'))
    body = reply(rejection)
    assert (body["id"], body["error"]["code"]) == (5, "bad_request")
    assert "already authenticated" in body["error"]["message"]
    assert rejection.close is None
    assert protocol.bad_frame_count == 1


def test_commands_pass_through_after_auth() -> None:
    protocol = authed()
    assert protocol.receive_text('{"op":"subscribe","id":3,"channel":"c"}') == Subscribe(3, "c")


def test_bad_frames_in_a_row_close_with_1008() -> None:
    protocol = authed(limit=3)
    first = rejected(protocol.receive_text(MALFORMED))
    second = rejected(protocol.receive_text("[]"))
    third = rejected(protocol.receive_text('{"op":"nope","id":1}'))
    assert (first.close, second.close) == (None, None)
    assert third.close is CloseCode.POLICY_VIOLATION
    assert third.close == 1008
    assert reply(third)["error"]["code"] == "bad_request"
    assert protocol.bad_frame_count == 3


def test_good_frame_resets_the_streak() -> None:
    protocol = authed(limit=3)
    rejected(protocol.receive_text(MALFORMED))
    rejected(protocol.receive_text(MALFORMED))
    assert protocol.bad_frame_count == 2
    assert protocol.receive_text(PING) == Ping(2)
    assert protocol.bad_frame_count == 0
    assert rejected(protocol.receive_text(MALFORMED)).close is None
    assert rejected(protocol.receive_text(MALFORMED)).close is None
    assert rejected(protocol.receive_text(MALFORMED)).close is CloseCode.POLICY_VIOLATION


def test_limit_of_one_closes_on_first_bad_frame() -> None:
    protocol = authed(limit=1)
    assert rejected(protocol.receive_text(MALFORMED)).close is CloseCode.POLICY_VIOLATION


def test_unauthenticated_replies_do_not_count_but_do_reset() -> None:
    protocol = ServerProtocol(2)
    rejected(protocol.receive_text(MALFORMED))
    assert protocol.bad_frame_count == 1
    rejected(protocol.receive_text(PING))  # unauthenticated: a well-formed frame
    assert protocol.bad_frame_count == 0
    assert rejected(protocol.receive_text(MALFORMED)).close is None


def test_invalid_field_counts_as_bad() -> None:
    protocol = authed(limit=2)
    first = rejected(protocol.receive_text('{"op":"subscribe","id":1,"channel":"a..b"}'))
    assert reply(first)["id"] == 1
    second = rejected(protocol.receive_text('{"op":"history","id":2,"channel":"c","limit":0}'))
    assert second.close is CloseCode.POLICY_VIOLATION


def test_note_bad_request_counts_a_decoded_command_in_the_streak() -> None:
    protocol = authed(limit=3)
    rejected(protocol.receive_text(MALFORMED))
    assert isinstance(protocol.receive_text(PING), Ping)
    assert protocol.bad_frame_count == 0
    # The I/O layer answered that ping-like command with bad_request after all.
    assert protocol.note_bad_request() is None
    assert protocol.bad_frame_count == 2
    assert isinstance(protocol.receive_text(PING), Ping)
    assert protocol.note_bad_request() is CloseCode.POLICY_VIOLATION
    assert protocol.bad_frame_count == 3


def test_semantically_bad_commands_alone_reach_the_limit() -> None:
    protocol = authed(limit=3)
    closes = []
    for _ in range(3):
        assert isinstance(protocol.receive_text(PING), Ping)
        closes.append(protocol.note_bad_request())
    assert closes == [None, None, CloseCode.POLICY_VIOLATION]


def test_note_bad_request_after_a_good_answer_starts_a_new_streak() -> None:
    protocol = authed(limit=3)
    rejected(protocol.receive_text(MALFORMED))
    rejected(protocol.receive_text(MALFORMED))
    assert isinstance(protocol.receive_text(PING), Ping)  # answered ok
    assert isinstance(protocol.receive_text(PING), Ping)  # answered bad_request
    assert protocol.note_bad_request() is None
    assert protocol.bad_frame_count == 1
