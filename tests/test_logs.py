"""Structured logging: line shape, redaction, level filtering, never raising."""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from apix_trio.observability.logs import (
    REDACTED,
    REDACTED_JWT,
    configure_logging,
    get_logger,
    redact_value,
)

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im1haW4ifQ.eyJzdWIiOiJhbGljZSIsIm9yZyI6ImFjbWUifQ.c2lnbmF0dXJl"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    structlog.contextvars.clear_contextvars()
    configure_logging("info", "json")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_shape(out: io.StringIO) -> None:
    get_logger("apix.test").bind(conn="c1", org="acme").info("subscribed", channel="chat.1", n=3)
    [line] = lines(out)
    assert list(line)[:3] == ["ts", "level", "event"]
    assert line["level"] == "info"
    assert line["event"] == "subscribed"
    assert line["logger"] == "apix.test"
    assert (line["conn"], line["org"], line["channel"], line["n"]) == ("c1", "acme", "chat.1", 3)
    ts = datetime.datetime.fromisoformat(line["ts"])
    assert line["ts"].endswith("Z") and ts.utcoffset() == datetime.timedelta(0)
    assert out.getvalue().count("\n") == 1


def test_context_variables_are_included(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(node="n1", sub="alice")
    get_logger("t").warning("slow_consumer")
    [line] = lines(out)
    assert (line["node"], line["sub"], line["level"]) == ("n1", "alice", "warning")


def test_exceptions_are_rendered_as_text(out: io.StringIO) -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        get_logger("t").exception("failed")
    [line] = lines(out)
    assert line["level"] == "error"
    assert "ValueError: bad thing" in line["exception"]


@pytest.mark.parametrize(
    "key", ["token", "authorization", "password", "secret", "hmac_secret", "Authorization"]
)
def test_secret_fields_are_redacted(out: io.StringIO, key: str) -> None:
    get_logger("t").info("auth", **{key: "hunter2"})
    [line] = lines(out)
    assert line[key] == REDACTED
    assert "hunter2" not in out.getvalue()


def test_secret_keys_are_redacted_when_nested_or_suffixed(out: io.StringIO) -> None:
    get_logger("t").info(
        "upgrade",
        headers={"Authorization": "Bearer abc", "Origin": "https://a.example.com"},
        refresh_token="r1",
        items=[{"password": "p"}],
    )
    [line] = lines(out)
    assert line["headers"] == {"Authorization": REDACTED, "Origin": "https://a.example.com"}
    assert line["refresh_token"] == REDACTED
    assert line["items"] == [{"password": REDACTED}]


def test_a_jwt_in_a_field_or_the_message_is_redacted(out: io.StringIO) -> None:
    log = get_logger("t")
    log.info(f"rejected Bearer {JWT} for alice", frame={"op": "auth", "jwt": JWT})
    log.info("rejected %s", JWT, detail=f"token was {JWT}.")
    log.bind(raw=JWT).info("bound")
    text = out.getvalue()
    assert "eyJ" not in text
    first, second, third = lines(out)
    assert first["event"] == f"rejected Bearer {REDACTED_JWT} for alice"
    assert first["frame"] == {"op": "auth", "jwt": REDACTED_JWT}
    assert second["event"] == f"rejected {REDACTED_JWT}"
    assert second["detail"] == f"token was {REDACTED_JWT}."
    assert third["raw"] == REDACTED_JWT


def test_a_jwt_inside_an_exception_is_redacted(out: io.StringIO) -> None:
    try:
        raise ValueError(f"cannot decode {JWT}")
    except ValueError as exc:
        get_logger("t").exception("failed", error=exc)
    assert "eyJ" not in out.getvalue()
    [line] = lines(out)
    assert line["error"] == f"cannot decode {REDACTED_JWT}"


def test_redact_value_keeps_plain_values() -> None:
    assert redact_value({"a": 1, "b": [True, None, 2.5], "c": ("x",)}) == {
        "a": 1,
        "b": [True, None, 2.5],
        "c": ["x"],
    }
    assert redact_value(b"eyJa.eyJb.c") == REDACTED_JWT
    assert redact_value("not.a.jwt") == "not.a.jwt"


def test_level_filtering() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream)
    try:
        log = get_logger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        assert [line["event"] for line in lines(stream)] == ["w", "e"]
    finally:
        configure_logging("info", "json")


def test_disabled_levels_do_no_work() -> None:
    calls = []

    class Costly:
        def __str__(self) -> str:
            calls.append(1)
            return "costly"

    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        log = get_logger("t")
        log.debug("hidden %s", Costly(), value=Costly())
        log.bind(conn="c1").debug("hidden", value=Costly())
        assert calls == [] and stream.getvalue() == ""
        log.info("shown", value=Costly())
        assert calls == [1]
    finally:
        configure_logging("info", "json")


def test_loggers_follow_reconfiguration() -> None:
    log = get_logger("made-early")
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    try:
        log.info("one")
        configure_logging("error", "json", second)
        log.info("dropped")
        log.error("two")
        assert [line["event"] for line in lines(first)] == ["one"]
        assert [line["event"] for line in lines(second)] == ["two"]
    finally:
        configure_logging("info", "json")


def test_console_format_is_redacted_too() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream)
    try:
        get_logger("t").info("auth", token="hunter2", conn="c1", note=f"jwt {JWT}")
        text = stream.getvalue()
        assert "auth" in text and "conn=c1" in text
        assert "hunter2" not in text and "eyJ" not in text
        assert REDACTED in text and REDACTED_JWT in text
    finally:
        configure_logging("info", "json")


def test_logging_never_raises(out: io.StringIO) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

        __repr__ = __str__

    log = get_logger("t")
    log.info("bad format %s %s", 1)  # too few arguments
    log.info("big", n=2**80, obj=Unprintable(), keys={1: "a"}, s={"x"})
    log.info(Unprintable())
    events = [line["event"] for line in lines(out)]
    assert events[0].startswith("bad format")
    assert lines(out)[1]["n"] == str(2**80)
    assert len(events) == 3
    out.close()
    log.error("stream closed")  # no exception


def test_unknown_level_or_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "json")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_a_failing_pipeline_writes_log_failed(out: io.StringIO) -> None:
    def broken(_logger: object, _method: str, _event_dict: dict[str, Any]) -> Any:
        raise RuntimeError("processor bug")

    structlog.configure(processors=[broken])
    get_logger("t").info(f"about {JWT}")  # no exception
    [line] = lines(out)
    assert (line["level"], line["event"], line["error"]) == ("error", "log_failed", "RuntimeError")
    assert line["failed_event"] == f"about {REDACTED_JWT}"
