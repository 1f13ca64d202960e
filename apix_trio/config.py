"""Load `Settings` from defaults, a TOML file, `APIX_*` variables and flags.

Theory of operation
-------------------
Sources, lowest to highest precedence (CONFIG.md): built-in defaults, the
TOML file, environment variables `APIX_<SECTION>_<KEY>`, command-line flags.
Every value a source *provides* is converted and range-checked right where it
appears, so a problem line always names the source that holds the bad value,
even when a higher source overrides it (a wrong value in a file is still
wrong). Problems are collected, never raised one by one; `load_settings`
raises one `ConfigError` carrying every line.

Accepted values are merged section by section into a plain tree, and one
cattrs converter structures that tree into the frozen `Settings` classes, so
missing keys take the model's defaults. `[[namespaces]]` exist only in TOML;
a key a namespace leaves out inherits the effective `[defaults]` value (after
environment overrides).

The conversion table is derived from the settings model: a field added to
`apix_trio.settings` is loadable from TOML and the environment at once, with
a type check; `_RULES` adds the range and shape checks.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import cattrs

from apix_trio.auth.permissions import BadPattern, parse_pattern
from apix_trio.settings import (
    ApiSettings,
    AuditSettings,
    AuthSettings,
    BrokerSettings,
    ChannelOptions,
    DeliverySettings,
    HeartbeatSettings,
    LimitSettings,
    LogSettings,
    PresenceSettings,
    ServerSettings,
    SessionSettings,
    Settings,
    StateSettings,
)

__all__ = ["ConfigError", "describe", "load_settings", "mask_url"]

REDACTED = "[redacted]"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_MODES = ("auto", "standalone", "cluster", "sentinel")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_WORKERS = 256
"""More node processes than this on one machine is a typo, not a plan."""

# Section name -> model class, in TOML/documentation order.
_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "broker": BrokerSettings,
    "auth": AuthSettings,
    "limits": LimitSettings,
    "heartbeat": HeartbeatSettings,
    "delivery": DeliverySettings,
    "sessions": SessionSettings,
    "presence": PresenceSettings,
    "api": ApiSettings,
    "state": StateSettings,
    "audit": AuditSettings,
    "log": LogSettings,
    "defaults": ChannelOptions,
}

# Flag key -> (section, key, flag spelling for problem lines).
_FLAGS: dict[str, tuple[str, str, str]] = {
    "ws_port": ("server", "ws_port", "--ws-port"),
    "http_port": ("server", "http_port", "--http-port"),
    "redis_url": ("broker", "redis_url", "--redis-url"),
    "workers": ("server", "workers", "--workers"),
}

_converter = cattrs.Converter()


class ConfigError(Exception):
    """The configuration is unusable.

    `problems` holds one line per problem, each naming the setting, the
    source and what is expected; `str()` joins them with newlines.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


class _Bad(Exception):
    """A value cannot be converted to its setting's type."""


# --------------------------------------------------------------- rules ----


@attrs.frozen
class _Rule:
    """How one setting is checked after conversion to its model type.

    `check` returns None when the value is fine, else a detail that replaces
    the default `got <value>` of the problem line. `secret` values never
    appear in problem lines.
    """

    expect: str
    check: Callable[[Any], str | None] = lambda _value: None
    secret: bool = False
    normalize: Callable[[Any], Any] = lambda value: value


def _fails(ok: Callable[[Any], bool]) -> Callable[[Any], str | None]:
    return lambda value: None if ok(value) else ""


def _int(lo: int, hi: int | None = None) -> _Rule:
    text = f"an integer {lo}-{hi}" if hi is not None else f"an integer >= {lo}"
    return _Rule(text, _fails(lambda v: v >= lo and (hi is None or v <= hi)))


def _seconds(*, zero_ok: bool = False) -> _Rule:
    if zero_ok:
        return _Rule("a number of seconds >= 0", _fails(lambda v: v >= 0))
    return _Rule("a number of seconds > 0", _fails(lambda v: v > 0))


def _number(lo: float, *, inclusive: bool) -> _Rule:
    op = ">=" if inclusive else ">"
    return _Rule(f"a number {op} {lo:g}", _fails(lambda v: v >= lo if inclusive else v > lo))


def _choice(choices: tuple[str, ...]) -> _Rule:
    """One of `choices`, in any letter case (stored in the case given here)."""
    return _Rule(
        "one of " + ", ".join(choices),
        _fails(lambda v: v.lower() in choices),
        normalize=lambda v: v.lower(),
    )


def _no_space(value: str) -> bool:
    return bool(value) and not any(c.isspace() for c in value)


_ORIGIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/\s?#]+$")


def _origins_ok(values: tuple[str, ...]) -> bool:
    return all(v == "null" or _ORIGIN_RE.match(v) for v in values)


def _algorithms_ok(values: tuple[str, ...]) -> bool:
    return bool(values) and all(v in JWT_ALGORITHMS for v in values)


def _redis_url_ok(value: str) -> bool:
    return value == "" or value.lower().startswith(REDIS_SCHEMES)


def _ws_path_ok(value: str) -> bool:
    return value.startswith("/") and _no_space(value) and "?" not in value and "#" not in value


def _key_files_problem(paths: tuple[str, ...]) -> str | None:
    unreadable = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                file.read(1)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            unreadable.append(f"{path!r} ({getattr(exc, 'strerror', None) or exc})")
    return "cannot read " + ", ".join(unreadable) if unreadable else None


def _pem_file_problem(path: str) -> str | None:
    return _key_files_problem((path,)) if path else None


def _check_tls_pair(out: _Collector) -> None:
    """`server.tls_cert` and `server.tls_key` come together or not at all."""
    server = out.values["server"]
    if bool(server.get("tls_cert")) != bool(server.get("tls_key")):
        out.problems.append(
            "server.tls_cert, server.tls_key: set both (TLS on both listeners) or neither"
        )


_PATTERN_EXPECT = (
    "a channel pattern (1-8 dot-separated tokens of [A-Za-z0-9_-:@] or '*', '>' only last)"
)


_RULES: dict[str, _Rule] = {
    "server.host": _Rule("a non-empty host or address", _fails(_no_space)),
    "server.ws_port": _int(0, 65535),
    "server.ws_path": _Rule(
        "a path starting with '/' (no spaces, '?' or '#')", _fails(_ws_path_ok)
    ),
    "server.http_port": _int(0, 65535),
    "server.allowed_origins": _Rule(
        "a list of origins like 'https://app.example.com' (scheme://host[:port], no path)",
        _fails(_origins_ok),
    ),
    "server.shutdown_grace": _seconds(),
    "server.node_id": _Rule("a non-empty name without spaces", _fails(_no_space)),
    "server.workers": _Rule(
        f"'auto' or an integer 1-{MAX_WORKERS}", _fails(lambda v: 1 <= v <= MAX_WORKERS)
    ),
    "server.tls_cert": _Rule("'' or a readable PEM certificate file", _pem_file_problem),
    "server.tls_key": _Rule("'' or a readable PEM private key file", _pem_file_problem),
    "broker.redis_url": _Rule(
        "'' (embedded broker) or a URL starting with " + ", ".join(REDIS_SCHEMES),
        _fails(_redis_url_ok),
    ),
    "broker.key_prefix": _Rule("a non-empty prefix without spaces", _fails(_no_space)),
    "broker.bus_shards": _int(1, 1024),
    "broker.publish_wait_replicas": _int(0),
    "broker.redis_mode": _choice(REDIS_MODES),
    "broker.sentinel_master": _Rule(
        "a master name without spaces", _fails(lambda v: not v or _no_space(v))
    ),
    "broker.operation_timeout": _seconds(),
    "auth.public_keys": _Rule("a list of readable PEM or JWKS files", _key_files_problem),
    "auth.dev_key_dir": _Rule("a non-empty directory path", _fails(bool)),
    "auth.algorithms": _Rule(
        "a non-empty list of " + ", ".join(JWT_ALGORITHMS), _fails(_algorithms_ok)
    ),
    "auth.leeway": _seconds(zero_ok=True),
    "auth.hmac_secret": _Rule("a string", secret=True),
    "auth.timeout": _seconds(),
    "auth.expiry_warning": _seconds(),
    "limits.max_message_bytes": _int(128, MAX_MESSAGE_BYTES),
    "limits.max_subscriptions": _int(1),
    "limits.outbox_size": _int(1),
    "limits.ops_per_second": _number(0, inclusive=False),
    "limits.max_connections_per_org": _int(0),
    "limits.bad_frames": _int(1),
    "limits.outbox_bytes": _int(1),
    "heartbeat.interval": _seconds(),
    "heartbeat.timeout": _seconds(),
    "delivery.retry_base": _seconds(),
    "delivery.retry_factor": _number(1, inclusive=True),
    "delivery.retry_max": _seconds(),
    "delivery.max_attempts": _int(1),
    "delivery.dedupe_window": _seconds(),
    "delivery.visibility_timeout": _seconds(),
    "delivery.group_prefetch": _int(1, 10_000),
    "sessions.ttl": _seconds(),
    "presence.ttl": _seconds(),
    "api.rate_per_org": _number(0, inclusive=False),
    "api.max_body_bytes": _int(1),
    "presence.max_members": _int(1),
    "state.max_value_bytes": _int(1),
    "state.max_keys_per_org": _int(1),
    "audit.max_entries": _int(1),
    "audit.ttl": _seconds(),
    "log.level": _choice(LOG_LEVELS),
    "log.format": _choice(LOG_FORMATS),
    "defaults.history_size": _int(0),
    "defaults.history_ttl": _seconds(),
}

_KIND_EXPECT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list of strings",
}


def _kind_of(annotation: Any) -> str:
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "str"
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...):
        return "list"
    raise TypeError(f"unsupported settings type {annotation!r}")


@attrs.frozen
class _Field:
    name: str  # "server.ws_port"
    kind: str
    rule: _Rule


def _build_fields() -> dict[str, dict[str, _Field]]:
    table: dict[str, dict[str, _Field]] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        table[section] = {}
        for field in attrs.fields(cls):
            name = f"{section}.{field.name}"
            kind = "workers" if name == "server.workers" else _kind_of(hints[field.name])
            rule = _RULES.get(name) or _Rule(_KIND_EXPECT[kind])
            table[section][field.name] = _Field(name, kind, rule)
    return table


_FIELDS = _build_fields()


# ---------------------------------------------------------- conversion ----

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _convert(kind: str, raw: Any, *, text: bool) -> Any:
    """Convert a native value (TOML, flags) or, with `text`, a string (env, flags)."""
    if kind == "workers":
        return _convert_workers(raw)
    if text and isinstance(raw, str) and kind != "str":
        return _convert_text(kind, raw)
    if kind == "bool" and isinstance(raw, bool):
        return raw
    if kind == "int" and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if kind == "float" and isinstance(raw, int | float) and not isinstance(raw, bool):
        if not math.isfinite(raw):
            raise _Bad()
        return float(raw)
    if kind == "str" and isinstance(raw, str):
        return raw
    if kind == "list" and isinstance(raw, list | tuple) and all(isinstance(v, str) for v in raw):
        return tuple(raw)
    raise _Bad()


def _convert_workers(raw: Any) -> int:
    """`server.workers`: an integer, or "auto" for one worker per core."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return os.cpu_count() or 1
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raise _Bad() from None
    raise _Bad()


def _convert_text(kind: str, text: str) -> Any:
    stripped = text.strip()
    try:
        if kind == "int":
            return int(stripped)
        if kind == "float":
            value = float(stripped)
            if not math.isfinite(value):
                raise _Bad()
            return value
    except ValueError:
        raise _Bad() from None
    if kind == "bool":
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _Bad()
    if kind == "list":
        return tuple(item.strip() for item in text.split(",") if item.strip())
    raise _Bad()


def _show(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a table"
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


class _Collector:
    """Accepted values per section, plus the problem lines."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        self.problems: list[str] = []

    def problem(self, name: str, text: str, source: str) -> None:
        self.problems.append(f"{name}: {text} (from {source})")

    def check(
        self, field: _Field, raw: Any, source: str, *, text: bool, label: str | None = None
    ) -> Any:
        """The converted value, or `_MISSING` after recording a problem."""
        name = label or field.name
        rule = field.rule
        try:
            value = _convert(field.kind, raw, text=text)
        except _Bad:
            shown = f"a {type(raw).__name__}" if rule.secret else _show(_mask_for_show(field, raw))
            self.problem(name, f"expected {rule.expect}, got {shown}", source)
            return _MISSING
        detail = rule.check(value)
        if detail is not None:
            got = detail or f"got {_show(_mask_for_show(field, raw))}"
            self.problem(name, f"expected {rule.expect}, {got}", source)
            return _MISSING
        return rule.normalize(value)

    def accept(self, field: _Field, raw: Any, source: str, *, text: bool) -> None:
        section, key = field.name.split(".", 1)
        value = self.check(field, raw, source, text=text)
        if value is not _MISSING:
            self.values[section][key] = value


_MISSING: Any = object()


def _mask_for_show(field: _Field, raw: Any) -> Any:
    if field.name == "broker.redis_url" and isinstance(raw, str):
        return mask_url(raw)
    return raw


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]}?" if close else ""


# --------------------------------------------------------------- TOML -----


def _read_toml(path: str, via: str, out: _Collector) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or exc
        out.problem("config", f"expected a readable TOML file, cannot read {path!r}: {reason}", via)
        return None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError
        out.problem("config", f"expected valid UTF-8 TOML, got {exc}", path)
        return None


def _apply_toml(doc: dict[str, Any], source: str, out: _Collector) -> list[tuple[str, dict]]:
    """Accept the sections of `doc`; return the raw namespace tables."""
    namespaces: list[tuple[str, dict]] = []
    for section, body in doc.items():
        if section == "namespaces":
            namespaces = _namespace_tables(body, source, out)
            continue
        fields = _FIELDS.get(section)
        if fields is None:
            owner = [f"{s}.{section}" for s, keys in _FIELDS.items() if section in keys]
            hint = f"; did you mean {owner[0]}?" if owner else _suggest(section, _FIELDS)
            what = "unknown setting at top level" if owner else "unknown section"
            out.problem(section, what + hint, source)
            continue
        if not isinstance(body, dict):
            out.problem(section, f"expected a table [{section}], got {_show(body)}", source)
            continue
        for key, raw in body.items():
            field = fields.get(key)
            if field is None:
                out.problem(f"{section}.{key}", "unknown setting" + _suggest(key, fields), source)
            else:
                out.accept(field, raw, source, text=False)
    return namespaces


def _namespace_tables(body: Any, source: str, out: _Collector) -> list[tuple[str, dict]]:
    if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
        out.problem(
            "namespaces", f"expected an array of tables [[namespaces]], got {_show(body)}", source
        )
        return []
    return [(f"namespaces[{i}]", table) for i, table in enumerate(body)]


def _build_namespaces(
    tables: list[tuple[str, dict]], defaults: dict[str, Any], source: str, out: _Collector
) -> list[dict[str, Any]]:
    option_fields = _FIELDS["defaults"]
    built: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for label, table in tables:
        options = dict(defaults)
        ok = True
        pattern = table.get("pattern", _MISSING)
        if pattern is _MISSING:
            detail: str | None = "got nothing"
        elif not isinstance(pattern, str):
            detail = f"got {_show(pattern)}"
        else:
            try:
                parse_pattern(pattern, allow_sub=True)  # the matcher's grammar ({sub}: any user)
                detail = None
            except BadPattern as exc:
                detail = f"got {_show(pattern)} ({exc})"
        if detail is not None:
            out.problem(f"{label}.pattern", f"expected {_PATTERN_EXPECT}, {detail}", source)
            ok = False
        elif pattern in seen:
            out.problem(
                f"{label}.pattern",
                f"expected a pattern not used before, got "
                f"{pattern!r} (already {seen[pattern]}, which wins)",
                source,
            )
            ok = False
        else:
            seen[pattern] = label
        for key, raw in table.items():
            if key == "pattern":
                continue
            field = option_fields.get(key)
            if field is None:
                out.problem(
                    f"{label}.{key}",
                    "unknown setting" + _suggest(key, [*option_fields, "pattern"]),
                    source,
                )
                ok = False
                continue
            value = out.check(field, raw, source, text=False, label=f"{label}.{key}")
            if value is _MISSING:
                ok = False
            else:
                options[key] = value
        if ok:
            built.append({"pattern": pattern, "options": options})
    return built


# -------------------------------------------------- environment, flags ----


def _apply_environ(environ: Mapping[str, str], out: _Collector) -> None:
    prefixes = {f"APIX_{section.upper()}_": section for section in _SECTIONS}
    for var in sorted(environ):
        if not var.startswith("APIX_") or var == "APIX_CONFIG":
            continue
        if var.startswith("APIX_NAMESPACES"):
            out.problem(
                "namespaces", "has no environment form; set [[namespaces]] in the TOML file", var
            )
            continue
        for prefix, section in prefixes.items():
            if var.startswith(prefix):
                key = var[len(prefix) :].lower()
                field = _FIELDS[section].get(key)
                if field is None:
                    names = [f"APIX_{section.upper()}_{k.upper()}" for k in _FIELDS[section]]
                    out.problem(f"{section}.{key}", "unknown setting" + _suggest(var, names), var)
                else:
                    out.accept(field, environ[var], var, text=True)
                break


def _apply_flags(flags: Mapping[str, object], out: _Collector) -> None:
    for key, raw in flags.items():
        if raw is None:  # flag not given
            continue
        target = _FLAGS.get(key)
        if target is None:
            out.problem(
                f"flags.{key}", "unknown flag; expected one of " + ", ".join(_FLAGS), "command line"
            )
            continue
        section, name, spelling = target
        out.accept(_FIELDS[section][name], raw, spelling, text=True)


# ---------------------------------------------------------- public API ----


def load_settings(
    *, config_path: str | None, environ: Mapping[str, str], flags: Mapping[str, object]
) -> Settings:
    """Build the effective settings from every source, or report every problem.

    Precedence, lowest to highest: the model's defaults; the TOML file at
    `config_path`, else at `environ["APIX_CONFIG"]` when that is set and
    non-empty; `APIX_<SECTION>_<KEY>` variables of `environ`; `flags`
    (`ws_port`, `http_port`, `redis_url`; a None value means "not given").
    Nothing is read from `os.environ`; the only files read are the TOML file
    and the `auth.public_keys` files (opened to prove they are readable, then
    closed).

    Error handling: raises `ConfigError` whose `problems` lists every
    problem found across all sources, one line each, naming the setting, the
    source (file path, variable name or flag) and what is expected. Nothing
    else is raised for bad input.
    """
    out = _Collector()
    namespace_tables: list[tuple[str, dict]] = []
    toml_source = ""
    path, via = config_path, "--config"
    if not path and environ.get("APIX_CONFIG"):
        path, via = environ["APIX_CONFIG"], "APIX_CONFIG"
    if path:
        doc = _read_toml(path, via, out)
        if doc is not None:
            toml_source = path
            namespace_tables = _apply_toml(doc, path, out)
    _apply_environ(environ, out)
    _apply_flags(flags, out)
    _check_tls_pair(out)

    _check_workers_need_redis(out)
    _check_redis_mode(out)
    defaults = _converter.unstructure(ChannelOptions(**out.values["defaults"]))
    namespaces = _build_namespaces(namespace_tables, defaults, toml_source, out)
    if out.problems:
        raise ConfigError(out.problems)
    tree: dict[str, Any] = {section: values for section, values in out.values.items() if values}
    tree["namespaces"] = namespaces
    try:
        return _converter.structure(tree, Settings)
    except Exception as exc:  # a model invariant the rules above missed
        raise ConfigError([f"settings: cannot build the settings model: {exc}"]) from exc


def _check_workers_need_redis(out: _Collector) -> None:
    """Workers are separate processes: with the embedded broker each would hold
    its own events, so clients on different workers could not see each other."""
    workers = out.values["server"].get("workers", 1)
    if workers > 1 and not out.values["broker"].get("redis_url"):
        out.problem(
            "server.workers",
            f"expected 1 with the embedded broker, got {workers}: several workers share "
            "events only through Redis, so set broker.redis_url (or run one worker)",
            "the effective settings",
        )


def _check_redis_mode(out: _Collector) -> None:
    """Sentinel mode needs the master's name, and only it takes a list of hosts."""
    broker = out.values["broker"]
    mode = broker.get("redis_mode", "auto")
    url = broker.get("redis_url", "")
    if mode == "sentinel" and not broker.get("sentinel_master"):
        out.problem(
            "broker.sentinel_master",
            "expected the name of the master the sentinels monitor when broker.redis_mode "
            "is sentinel, got ''",
            "the effective settings",
        )
    if mode == "sentinel" and url and not url.lower().startswith(("redis://", "rediss://")):
        out.problem(
            "broker.redis_url",
            "expected redis://host:port[,host:port...] listing the sentinels when "
            f"broker.redis_mode is sentinel, got {mask_url(url)!r}",
            "the effective settings",
        )
    hosts = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
    if mode != "sentinel" and "," in hosts:
        out.problem(
            "broker.redis_url",
            "expected one host: a list of hosts is only for broker.redis_mode = sentinel "
            f"(mode {mode}), got {mask_url(url)!r}",
            "the effective settings",
        )


def mask_url(url: str) -> str:
    """`url` with any password (userinfo or `password=` query) replaced by [redacted].

    Over-masks rather than leaks when the URL is odd; never raises.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            rest = f"{user}:{REDACTED}@{host}"
        url = f"{scheme}://{rest}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", lambda m: m.group(1) + REDACTED, url)


def _plain(_instance: Any, _field: Any, value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def describe(settings: Settings) -> dict[str, Any]:
    """A JSON-safe dict of the effective settings, for the startup log line.

    Sections map to dicts of plain values (lists for tuples); `namespaces` is
    a list of `{"pattern": ..., **options}`. Secrets are masked:
    `auth.hmac_secret` (when set) and any password inside
    `broker.redis_url`.
    """
    data: dict[str, Any] = attrs.asdict(settings, value_serializer=_plain)
    if data["auth"]["hmac_secret"]:
        data["auth"]["hmac_secret"] = REDACTED
    data["broker"]["redis_url"] = mask_url(data["broker"]["redis_url"])
    data["namespaces"] = [{"pattern": ns["pattern"], **ns["options"]} for ns in data["namespaces"]]
    return data
