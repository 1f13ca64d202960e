"""Structured logging: one JSON object per line (or console text), secrets redacted.

Theory of operation
-------------------
`configure_logging` installs one structlog pipeline for the whole process:

    contextvars -> level -> ts -> exception text -> redact -> render -> write

The bound-logger class comes from `structlog.make_filtering_bound_logger`, so
a call below the configured level is a method that returns None at once: no
event dict is built, no processor runs. Enabled calls go through a wrapper
that swallows every exception (a bad format string, an unserialisable value,
a closed stream): logging never raises into the caller. When the pipeline
itself fails, a minimal `log_failed` line is written instead, if possible.

Redaction happens once, after exception text is formatted and before
rendering, so it also covers bound and context-variable fields: a key named
token/authorization/password/secret/hmac_secret (or ending in `_<that>`, any
letter case, at any depth of nested dicts) becomes "[redacted]", and every
JWT-shaped substring (`eyJ...` three base64url segments) of any string
becomes "[redacted-jwt]".

`get_logger` hands out small proxies that follow the *current* configuration
(even when reconfigured later, e.g. a log level change on reload), while
still costing only an attribute check and a call when the level is off.
"""

from __future__ import annotations

import datetime
import enum
import re
import sys
import threading
import uuid
from collections.abc import Mapping
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

__all__ = [
    "LEVELS",
    "REDACTED",
    "REDACTED_JWT",
    "configure_logging",
    "get_logger",
    "redact_event",
    "redact_value",
]

REDACTED = "[redacted]"
REDACTED_JWT = "[redacted-jwt]"
LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
FORMATS = ("json", "console")

_SECRET_KEYS = frozenset({"token", "authorization", "password", "secret", "hmac_secret"})
_SECRET_SUFFIXES = tuple(f"_{key}" for key in _SECRET_KEYS)
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_DEPTH = 8
_PLAIN = (int, float, bool, type(None), datetime.datetime, datetime.date, uuid.UUID)


# ------------------------------------------------------------ redaction ----


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def _redact_text(text: str) -> str:
    return _JWT_RE.sub(REDACTED_JWT, text) if "eyJ" in text else text


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def redact_value(value: Any, _depth: int = 0) -> Any:
    """`value` with secrets removed, in a JSON-friendly shape.

    Strings lose JWT-shaped substrings; mappings lose the values of secret
    keys; lists, tuples and sets become lists; bytes are decoded; other
    objects (exceptions, paths, ...) become their `str()`, redacted. Numbers,
    booleans, None, dates and UUIDs pass unchanged. Never raises.
    """
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, enum.Enum):
        return redact_value(value.value, _depth + 1)
    if isinstance(value, _PLAIN):
        return value
    if _depth >= _MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_secret_key(key) else redact_value(item, _depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(item, _depth + 1) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return _redact_text(bytes(value).decode("utf-8", "replace"))
    return _redact_text(_safe_str(value))


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: `redact_value` applied to every field of the event."""
    return {
        key: REDACTED if _is_secret_key(key) else redact_value(value)
        for key, value in event_dict.items()
    }


# ------------------------------------------------------------ rendering ----


def _render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    line = {
        "ts": event_dict.pop("ts", None),
        "level": event_dict.pop("level", None),
        "event": event_dict.pop("event", None),
    }
    line.update(event_dict)
    try:
        return orjson.dumps(line, default=_safe_str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # JSONEncodeError: e.g. an int beyond 64 bits somewhere
        safe = {str(k): _json_safe(v) for k, v in line.items()}
        return orjson.dumps(safe, default=_safe_str, option=orjson.OPT_NON_STR_KEYS).decode()


def _json_safe(value: Any) -> Any:
    try:
        orjson.dumps(value, default=_safe_str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _safe_str(value)
    return value


class _LineWriter:
    """The wrapped logger: writes one line per call; never raises.

    `stream` None means whatever `sys.stderr` is at the time of the write.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            with self._lock:
                stream.write(message + "\n")
                stream.flush()
        except Exception:
            pass  # nowhere left to report to; the caller must not fail for a log line

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


def _write_failure(writer: Any, event: object, exc: BaseException) -> None:
    try:
        line = {
            "ts": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
            "level": "error",
            "event": "log_failed",
            "failed_event": _redact_text(_safe_str(event))[:200],
            "error": type(exc).__name__,
        }
        writer.msg(orjson.dumps(line).decode())
    except Exception:
        pass


# ------------------------------------------------ never-raising loggers ----


def _interpolate(event: Any, args: tuple[Any, ...]) -> Any:
    try:
        if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            return event % args[0]
        return event % args
    except Exception:
        return f"{_safe_str(event)} {_safe_str(args)}"


def _safe_proxy(self: Any, method_name: str, event: Any = None, **event_kw: Any) -> Any:
    try:
        args, kw = self._process_event(method_name, event, event_kw)
        return getattr(self._logger, method_name)(*args, **kw)
    except structlog.DropEvent:
        return None
    except Exception as exc:
        _write_failure(self._logger, event, exc)
        return None


def _level_method(name: str) -> Any:
    def method(self: Any, event: Any = None, *args: Any, **kw: Any) -> Any:
        if args:
            event = _interpolate(event, args)
        return self._proxy_to_logger(name, event, **kw)

    method.__name__ = name
    return method


def _safe_wrapper_class(min_level: int) -> type[FilteringBoundLogger]:
    """A filtering bound logger whose enabled methods never raise."""
    base = structlog.make_filtering_bound_logger(min_level)
    namespace: dict[str, Any] = {"_proxy_to_logger": _safe_proxy}
    for name, number in LEVELS.items():
        if number >= min_level:  # disabled levels keep the base class's no-op
            namespace[name] = _level_method(name)
    aliases = {"warn": "warning", "fatal": "critical", "msg": "info"}
    for alias, name in aliases.items():
        if name in namespace:
            namespace[alias] = namespace[name]

    def log(self: Any, level: int, event: Any = None, *args: Any, **kw: Any) -> Any:
        if level < min_level:
            return None
        name = next((n for n, v in LEVELS.items() if v >= level), "critical")
        return getattr(self, name)(event, *args, **kw)

    namespace["log"] = log
    return type(f"ApixBoundLogger{min_level}", (base,), namespace)


# ---------------------------------------------------------------- public ----


class _State:
    generation = 0
    configured = False


def bind_process_fields(**fields: Any) -> None:
    """Add `fields` to every log line of this process from now on (e.g. the
    node id of a worker, whose lines share the supervisor's stream)."""
    structlog.contextvars.bind_contextvars(**fields)


def configure_logging(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Install the process-wide logging pipeline.

    `level` is debug, info, warning or error (any case): calls below it do
    nothing. `fmt` "json" writes one orjson-rendered object per line with
    `ts` (ISO 8601 UTC), `level`, `event` first, then every bound field;
    "console" writes human-readable lines. `stream` defaults to `sys.stderr`
    as it is at each write. Loggers from `get_logger` follow this
    configuration from their next call on, even if created earlier; loggers
    already made with `.bind()` keep the configuration they were bound under.

    Error handling: raises ValueError for an unknown level or format (the
    configuration loader rejects those first); nothing else.
    """
    min_level = LEVELS.get(level.lower())
    if min_level is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    writer = _LineWriter(stream)
    if fmt == "json":
        renderer: Any = _render_json
    else:
        target = stream if stream is not None else sys.stderr
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(target, "isatty", lambda: False)()),
            timestamp_key="ts",
            exception_formatter=structlog.dev.plain_traceback,
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=_safe_wrapper_class(min_level),
        context_class=dict,
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=False,
    )
    _State.generation += 1
    _State.configured = True


class _Logger:
    """What `get_logger` returns: follows the current configuration.

    Offers the whole `FilteringBoundLogger` surface; `bind()` returns a
    regular structlog bound logger carrying the extra fields.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def _current(self) -> Any:
        if self._generation != _State.generation or self._bound is None:
            if not _State.configured:
                configure_logging("info", "json")
            self._bound = structlog.get_logger().bind(logger=self._name)
            self._generation = _State.generation
        return self._bound

    def bind(self, **fields: Any) -> FilteringBoundLogger:
        return self._current().bind(**fields)

    def debug(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().debug(event, *args, **kw)

    def info(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().info(event, *args, **kw)

    def warning(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().warning(event, *args, **kw)

    def error(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().error(event, *args, **kw)

    def critical(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().critical(event, *args, **kw)

    def exception(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().exception(event, *args, **kw)

    def log(self, level: int, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._current().log(level, event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        # The rest of the FilteringBoundLogger surface (new, unbind,
        # is_enabled_for, ...) from the current bound logger.
        return getattr(self._current(), name)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose lines carry `logger=<name>`; cheap to create at import time.

    Until `configure_logging` is called, the first call configures
    info/json/stderr. Never raises when logging.
    """
    return _Logger(name)
