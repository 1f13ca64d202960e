"""Configuration loading: sources, precedence, validation lines, describe()."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from apix_trio.config import ConfigError, describe, load_settings, mask_url
from apix_trio.settings import (
    AuthSettings,
    BrokerSettings,
    ChannelOptions,
    Namespace,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "apix.example.toml"
DOCS = ROOT / "docs" / "configuration.md"
SECTIONS = [f.name for f in attrs.fields(Settings) if f.name != "namespaces"]


def load(
    config_path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    flags: dict[str, object] | None = None,
) -> Settings:
    return load_settings(
        config_path=str(config_path) if config_path is not None else None,
        environ=environ or {},
        flags=flags or {},
    )


def problems(**kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value.problems


def write_toml(tmp_path: Path, text: str, name: str = "apix.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------- sources ----


def test_no_sources_gives_the_model_defaults() -> None:
    assert load() == Settings()


def test_toml_values_are_loaded(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        ws_port = 9000
        allowed_origins = ["https://a.example.com", "http://localhost:3000"]
        shutdown_grace = 2.5
        node_id = "node-a"
        [broker]
        redis_url = "redis://127.0.0.1:6379/0"
        bus_shards = 4
        [auth]
        algorithms = ["ES256", "EdDSA"]
        leeway = 0
        [log]
        level = "debug"
        format = "console"
        [defaults]
        history_size = 0
        presence = true
        """,
    )
    settings = load(path)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.ws_port == 9000
    assert settings.server.allowed_origins == ("https://a.example.com", "http://localhost:3000")
    assert settings.server.shutdown_grace == 2.5
    assert settings.server.node_id == "node-a"
    assert settings.broker.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.broker.bus_shards == 4
    assert settings.auth.algorithms == ("ES256", "EdDSA")
    assert settings.auth.leeway == 0.0
    assert settings.log == attrs.evolve(settings.log, level="debug", format="console")
    assert settings.defaults == ChannelOptions(history_size=0, presence=True)
    # Untouched settings keep their defaults.
    assert settings.limits == Settings().limits
    assert settings.server.http_port == 8081


def test_integer_durations_become_floats(tmp_path: Path) -> None:
    settings = load(write_toml(tmp_path, "[heartbeat]\ninterval = 3\n"))
    assert settings.heartbeat.interval == 3.0
    assert isinstance(settings.heartbeat.interval, float)


def test_env_beats_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nws_port = 9000\nhost = "0.0.0.0"\n')
    settings = load(path, {"APIX_SERVER_WS_PORT": "9100"})
    assert settings.server.ws_port == 9100
    assert settings.server.host == "0.0.0.0"


def test_flags_beat_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nws_port = 9000\nhttp_port = 9001\n")
    settings = load(
        path,
        {"APIX_SERVER_WS_PORT": "9100", "APIX_BROKER_REDIS_URL": "redis://env:6379"},
        {"ws_port": 9200, "http_port": "9201", "redis_url": "rediss://flag:6380/1"},
    )
    assert settings.server.ws_port == 9200
    assert settings.server.http_port == 9201
    assert settings.broker.redis_url == "rediss://flag:6380/1"


def test_flags_given_as_none_are_ignored() -> None:
    settings = load(environ={"APIX_SERVER_WS_PORT": "9100"}, flags={"ws_port": None})
    assert settings.server.ws_port == 9100


def test_apix_config_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[broker]\nkey_prefix = "env-file"\n')
    assert load(environ={"APIX_CONFIG": str(path)}).broker.key_prefix == "env-file"


def test_config_path_beats_apix_config(tmp_path: Path) -> None:
    flag_file = write_toml(tmp_path, '[broker]\nkey_prefix = "flag"\n', "a.toml")
    env_file = write_toml(tmp_path, '[broker]\nkey_prefix = "env"\n', "b.toml")
    settings = load(flag_file, {"APIX_CONFIG": str(env_file)})
    assert settings.broker.key_prefix == "flag"


def test_lists_via_env(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "b.json"
    a.write_text("pem")
    b.write_text("{}")
    settings = load(
        environ={
            "APIX_AUTH_PUBLIC_KEYS": f"{a}, {b}",
            "APIX_AUTH_ALGORITHMS": "RS256,EdDSA",
            "APIX_SERVER_ALLOWED_ORIGINS": "https://x.example.com,",
        }
    )
    assert settings.auth.public_keys == (str(a), str(b))
    assert settings.auth.algorithms == ("RS256", "EdDSA")
    assert settings.server.allowed_origins == ("https://x.example.com",)


def test_empty_env_list_overrides_toml_list(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nallowed_origins = ["https://a.example.com"]\n')
    settings = load(path, {"APIX_SERVER_ALLOWED_ORIGINS": ""})
    assert settings.server.allowed_origins == ()


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("APIX_SERVER_SHUTDOWN_GRACE", "2.5", 2.5),
        ("APIX_AUTH_LEEWAY", "0", 0.0),
        ("APIX_DEFAULTS_PRESENCE", "yes", True),
        ("APIX_DEFAULTS_CLIENT_PUBLISH", "0", False),
        ("APIX_DEFAULTS_PRESENCE", "TRUE", True),
        ("APIX_LOG_LEVEL", "WARNING", "warning"),
        ("APIX_BROKER_REDIS_URL", "", ""),
        ("APIX_LIMITS_MAX_MESSAGE_BYTES", " 1024 ", 1024),
    ],
)
def test_env_value_forms(var: str, text: str, expected: object) -> None:
    section, key = var.removeprefix("APIX_").lower().split("_", 1)
    settings = load(environ={var: text})
    assert getattr(getattr(settings, section), key) == expected


def test_env_defaults_are_inherited_by_namespaces(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[defaults]\nhistory_ttl = 60\n[[namespaces]]\npattern = "chat.>"\npresence = true\n',
    )
    settings = load(path, {"APIX_DEFAULTS_HISTORY_SIZE": "7"})
    assert settings.defaults == ChannelOptions(history_size=7, history_ttl=60)
    assert settings.namespaces == (
        Namespace("chat.>", ChannelOptions(history_size=7, history_ttl=60, presence=True)),
    )


def test_namespaces_keep_file_order(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[[namespaces]]\npattern = "a.*"\n[[namespaces]]\npattern = "a.>"\n'
        '[[namespaces]]\npattern = ">"\n',
    )
    assert [ns.pattern for ns in load(path).namespaces] == ["a.*", "a.>", ">"]


def test_unrelated_and_allowed_env_vars_are_ignored() -> None:
    environ = {
        "APIX_CONFIG": "",
        "APIX_SOMETHING_ELSE": "1",
        "HOME": "/root",
        "apix_log_level": "x",
    }
    assert load(environ=environ) == Settings()


# ---------------------------------------------------------- bad values ----

LINE = re.compile(r"^(?P<name>[\w.\[\]]+): (?P<text>.+) \(from (?P<source>[^()]+)\)$")


@pytest.mark.parametrize(
    ("var", "text", "expect"),
    [
        ("APIX_SERVER_WS_PORT", "abc", "expected an integer 0-65535, got 'abc'"),
        ("APIX_SERVER_HTTP_PORT", "65536", "expected an integer 0-65535, got '65536'"),
        ("APIX_SERVER_WS_PORT", "80.5", "expected an integer 0-65535"),
        ("APIX_SERVER_WS_PATH", "ws", "expected a path starting with '/'"),
        ("APIX_SERVER_HOST", "", "expected a non-empty host"),
        ("APIX_SERVER_NODE_ID", "", "expected a non-empty name"),
        ("APIX_SERVER_SHUTDOWN_GRACE", "0", "expected a number of seconds > 0, got '0'"),
        ("APIX_SERVER_ALLOWED_ORIGINS", "https://a.example.com/", "expected a list of origins"),
        ("APIX_BROKER_REDIS_URL", "http://h:6379", "expected '' (embedded broker) or a URL"),
        ("APIX_BROKER_BUS_SHARDS", "0", "expected an integer 1-1024, got '0'"),
        ("APIX_BROKER_BUS_SHARDS", "2000", "expected an integer 1-1024"),
        ("APIX_BROKER_PUBLISH_WAIT_REPLICAS", "-1", "expected an integer >= 0"),
        ("APIX_BROKER_KEY_PREFIX", "", "expected a non-empty prefix"),
        ("APIX_AUTH_ALGORITHMS", "RS256,HS256", "expected a non-empty list of RS256, ES256, EdDSA"),
        ("APIX_AUTH_ALGORITHMS", "", "expected a non-empty list of RS256, ES256, EdDSA"),
        ("APIX_AUTH_LEEWAY", "-1", "expected a number of seconds >= 0"),
        ("APIX_AUTH_TIMEOUT", "-5", "expected a number of seconds > 0"),
        ("APIX_AUTH_TIMEOUT", "nan", "expected a number of seconds > 0, got 'nan'"),
        ("APIX_AUTH_EXPIRY_WARNING", "soon", "expected a number of seconds > 0"),
        ("APIX_LIMITS_MAX_MESSAGE_BYTES", "100", "expected an integer 128-16777216"),
        ("APIX_LIMITS_MAX_MESSAGE_BYTES", "16777217", "expected an integer 128-16777216"),
        ("APIX_LIMITS_OUTBOX_SIZE", "0", "expected an integer >= 1"),
        ("APIX_LIMITS_BAD_FRAMES", "0", "expected an integer >= 1"),
        ("APIX_LIMITS_OPS_PER_SECOND", "0", "expected a number > 0"),
        ("APIX_LIMITS_MAX_CONNECTIONS_PER_ORG", "-1", "expected an integer >= 0"),
        ("APIX_HEARTBEAT_INTERVAL", "0", "expected a number of seconds > 0"),
        ("APIX_DELIVERY_RETRY_FACTOR", "0.5", "expected a number >= 1"),
        ("APIX_DELIVERY_MAX_ATTEMPTS", "0", "expected an integer >= 1"),
        ("APIX_SESSIONS_TTL", "inf", "expected a number of seconds > 0"),
        ("APIX_LOG_LEVEL", "loud", "expected one of debug, info, warning, error, got 'loud'"),
        ("APIX_LOG_FORMAT", "xml", "expected one of json, console, got 'xml'"),
        ("APIX_DEFAULTS_HISTORY_SIZE", "-1", "expected an integer >= 0"),
        ("APIX_DEFAULTS_PRESENCE", "maybe", "expected true or false, got 'maybe'"),
    ],
)
def test_bad_env_value_names_setting_and_source(var: str, text: str, expect: str) -> None:
    [line] = problems(environ={var: text})
    match = LINE.match(line)
    assert match, line
    assert match["name"] == var.removeprefix("APIX_").lower().replace("_", ".", 1)
    assert match["source"] == var
    assert expect in match["text"]


def test_the_documented_example_line() -> None:
    assert problems(environ={"APIX_SERVER_WS_PORT": "abc"}) == [
        "server.ws_port: expected an integer 0-65535, got 'abc' (from APIX_SERVER_WS_PORT)"
    ]


@pytest.mark.parametrize(
    ("toml", "name", "expect"),
    [
        ('[server]\nws_port = "9000"', "server.ws_port", "expected an integer 0-65535, got '9000'"),
        ("[server]\nws_port = true", "server.ws_port", "got True"),
        ("[server]\nws_port = 80.0", "server.ws_port", "got 80.0"),
        ("[server]\nws_port = 70000", "server.ws_port", "got 70000"),
        ("[server]\nhost = 1", "server.host", "got 1"),
        ('[server]\nallowed_origins = "https://a.b"', "server.allowed_origins", "got 'https://a"),
        ("[auth]\nalgorithms = [1]", "auth.algorithms", "got [1]"),
        ("[auth]\nleeway = -0.5", "auth.leeway", "expected a number of seconds >= 0"),
        ('[heartbeat]\ntimeout = "10"', "heartbeat.timeout", "expected a number of seconds > 0"),
        ("[heartbeat]\ntimeout = { a = 1 }", "heartbeat.timeout", "got a table"),
        ('[defaults]\npresence = "yes"', "defaults.presence", "expected true or false"),
        ("[log]\nlevel = 1", "log.level", "expected one of debug, info, warning, error"),
    ],
)
def test_bad_toml_value_names_setting_and_file(
    tmp_path: Path, toml: str, name: str, expect: str
) -> None:
    path = write_toml(tmp_path, toml + "\n")
    [line] = problems(config_path=path)
    match = LINE.match(line)
    assert match, line
    assert (match["name"], match["source"]) == (name, str(path))
    assert expect in match["text"]


def test_bad_flag_names_the_flag() -> None:
    assert problems(flags={"ws_port": -1}) == [
        "server.ws_port: expected an integer 0-65535, got -1 (from --ws-port)"
    ]
    [line] = problems(flags={"redis_url": "mysql://x"})
    assert line.startswith("broker.redis_url: expected ") and line.endswith("(from --redis-url)")


def test_unknown_flag_is_a_problem() -> None:
    [line] = problems(flags={"wsport": 1})
    assert line.startswith("flags.wsport: unknown flag")


def test_bad_value_is_reported_even_when_overridden(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nws_port = -1\n")
    [line] = problems(config_path=path, environ={"APIX_SERVER_WS_PORT": "9000"})
    assert line.startswith("server.ws_port:") and line.endswith(f"(from {path})")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    [line] = problems(config_path=missing)
    assert line.startswith(f"config: expected a readable TOML file, cannot read '{missing}'")
    assert line.endswith("(from --config)")
    [line] = problems(environ={"APIX_CONFIG": str(missing)})
    assert line.endswith("(from APIX_CONFIG)")


def test_unparsable_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server\nws_port = 1\n")
    [line] = problems(config_path=path)
    assert line.startswith("config: expected valid UTF-8 TOML, got ")
    assert line.endswith(f"(from {path})") and "\n" not in line


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    [line] = problems(config_path=path)
    assert line.startswith("config: expected valid UTF-8 TOML, got ")


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    [line] = problems(config_path=tmp_path)
    assert line.startswith("config: expected a readable TOML file") and "(from --config)" in line


def test_public_key_path_with_nul_byte_is_a_problem(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[auth]\npublic_keys = ["a\\u0000b.pem"]\n')
    [line] = problems(config_path=path)
    assert line.startswith("auth.public_keys: expected a list of readable PEM or JWKS files")


def test_unreadable_public_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_text("pem")
    keys = f"{good},{tmp_path / 'missing.pem'},{tmp_path}"
    [line] = problems(environ={"APIX_AUTH_PUBLIC_KEYS": keys})
    assert line.startswith("auth.public_keys: expected a list of readable PEM or JWKS files")
    assert "missing.pem" in line and str(tmp_path) in line
    assert "good.pem" not in line
    assert line.endswith("(from APIX_AUTH_PUBLIC_KEYS)")


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nws_port = "x"\n[log]\nlevel = "loud"\n')
    lines = problems(
        config_path=path,
        environ={"APIX_BROKER_BUS_SHARDS": "0", "APIX_AUTH_TIMEOUT": "-1"},
        flags={"http_port": 99999},
    )
    assert len(lines) == 5
    assert {line.split(":")[0] for line in lines} == {
        "server.ws_port",
        "log.level",
        "broker.bus_shards",
        "auth.timeout",
        "server.http_port",
    }
    assert all("\n" not in line for line in lines)


def test_config_error_text_is_one_line_per_problem() -> None:
    error = ConfigError(["a: x (from y)", "b: z (from w)"])
    assert str(error) == "a: x (from y)\nb: z (from w)"
    assert error.problems == ["a: x (from y)", "b: z (from w)"]


# -------------------------------------------------------- unknown keys ----


def test_unknown_toml_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nwsport = 9000\n")
    assert problems(config_path=path) == [
        f"server.wsport: unknown setting; did you mean ws_port? (from {path})"
    ]


def test_unknown_toml_section_and_top_level_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'ws_port = 1\n[servers]\nhost = "x"\n')
    lines = problems(config_path=path)
    assert lines == [
        f"ws_port: unknown setting at top level; did you mean server.ws_port? (from {path})",
        f"servers: unknown section; did you mean server? (from {path})",
    ]


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    [line] = problems(config_path=write_toml(tmp_path, "server = 5\n"))
    assert line.startswith("server: expected a table [server], got 5")


def test_unknown_env_var_in_known_section() -> None:
    [line] = problems(environ={"APIX_SERVER_WSPORT": "9000"})
    assert line == (
        "server.wsport: unknown setting; did you mean APIX_SERVER_WS_PORT? "
        "(from APIX_SERVER_WSPORT)"
    )


def test_namespaces_have_no_env_form() -> None:
    [line] = problems(environ={"APIX_NAMESPACES": "chat.>"})
    assert line.startswith("namespaces: has no environment form")


# ---------------------------------------------------------- namespaces ----


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "chat.>.x",
        "chat..x",
        "chat room",
        "chat.#",
        ".".join("a" * 9),
        "a" * 201,
        ">.x",
        "user.{sub}x",  # {sub} is a whole token or nothing
    ],
)
def test_bad_namespace_pattern(tmp_path: Path, pattern: str) -> None:
    path = write_toml(tmp_path, f"[[namespaces]]\npattern = {json.dumps(pattern)}\n")
    [line] = problems(config_path=path)
    assert line.startswith("namespaces[0].pattern: expected a channel pattern (1-8 dot-separated")
    assert line.endswith(f"(from {path})")
    assert "\n" not in line


def test_namespace_pattern_must_be_a_string(tmp_path: Path) -> None:
    [line] = problems(config_path=write_toml(tmp_path, "[[namespaces]]\npattern = 5\n"))
    assert line.startswith("namespaces[0].pattern: expected a channel pattern")
    assert "got 5" in line


def test_namespace_problems(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [[namespaces]]
        history_size = 5
        [[namespaces]]
        pattern = "chat.>"
        history_sise = 5
        [[namespaces]]
        pattern = "a.>"
        history_ttl = 0
        [[namespaces]]
        pattern = "a.>"
        """,
    )
    lines = problems(config_path=path)
    assert [line.split(":")[0] for line in lines] == [
        "namespaces[0].pattern",
        "namespaces[1].history_sise",
        "namespaces[2].history_ttl",
        "namespaces[3].pattern",
    ]
    assert "did you mean history_size?" in lines[1]
    assert "already namespaces[2]" in lines[3]


def test_namespaces_must_be_an_array_of_tables(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[namespaces]\npattern = "chat.>"\n')
    [line] = problems(config_path=path)
    assert line.startswith("namespaces: expected an array of tables [[namespaces]]")


# ------------------------------------------------------ example, docs ----


def test_example_file_loads_and_shows_the_defaults() -> None:
    settings = load(EXAMPLE)
    for section in SECTIONS:
        if section == "server":
            assert attrs.evolve(settings.server, node_id="x") == attrs.evolve(
                Settings().server, node_id="x"
            )
        else:
            assert getattr(settings, section) == getattr(Settings(), section), section
    assert [ns.pattern for ns in settings.namespaces] == ["chat.>", "user.>"]
    chat = settings.namespaces[0].options
    assert chat == ChannelOptions(history_size=1000, history_ttl=86400, presence=True)


def test_example_file_lists_every_setting_and_env_var() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    for section in SECTIONS:
        for field in attrs.fields(type(getattr(Settings(), section))):
            if (section, field.name) == ("server", "node_id"):
                assert "# node_id = " in text
            else:
                assert field.name in doc[section], f"{section}.{field.name}"
            if section != "defaults":
                assert f"APIX_{section.upper()}_{field.name.upper()}" in text


def test_docs_list_every_setting_and_env_var() -> None:
    text = DOCS.read_text()
    for section in SECTIONS:
        for field in attrs.fields(type(getattr(Settings(), section))):
            assert f"`{section}.{field.name}`" in text, f"{section}.{field.name}"
            assert f"APIX_{section.upper()}_{field.name.upper()}" in text


# ------------------------------------------------------------ describe ----


def test_describe_is_json_safe_and_masks_secrets() -> None:
    settings = Settings(
        broker=BrokerSettings(redis_url="redis://user:s3cret@h:6379/0?password=p4ss&db=1"),
        auth=AuthSettings(hmac_secret="dev-secret", public_keys=("k.pem",)),
        namespaces=(Namespace("chat.>", ChannelOptions(presence=True)),),
    )
    data = describe(settings)
    text = json.dumps(data)
    assert "s3cret" not in text and "p4ss" not in text and "dev-secret" not in text
    assert data["auth"]["hmac_secret"] == "[redacted]"
    assert data["broker"]["redis_url"] == (
        "redis://user:[redacted]@h:6379/0?password=[redacted]&db=1"
    )
    assert data["auth"]["public_keys"] == ["k.pem"]
    assert data["namespaces"] == [
        {
            "pattern": "chat.>",
            "history_size": 100,
            "history_ttl": 3600.0,
            "presence": True,
            "client_publish": True,
        }
    ]
    assert data["server"]["ws_port"] == 8080


def test_describe_leaves_empty_secrets_empty() -> None:
    data = describe(Settings())
    assert data["auth"]["hmac_secret"] == ""
    assert data["broker"]["redis_url"] == ""


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:pw@h", "redis://:[redacted]@h"),
        ("rediss://u@h", "rediss://u@h"),
        ("unix:///run/redis.sock?password=x", "unix:///run/redis.sock?password=[redacted]"),
        ("redis://u:p@ss@h", "redis://u:[redacted]@h"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_problem_lines_never_show_secrets() -> None:
    [line] = problems(environ={"APIX_BROKER_REDIS_URL": "http://u:topsecret@h"})
    assert "topsecret" not in line


def test_namespace_pattern_may_use_sub_for_any_user(tmp_path):
    path = tmp_path / "apix.toml"
    path.write_text('[[namespaces]]\npattern = "user.{sub}"\nhistory_size = 500\n')
    settings = load_settings(config_path=str(path), environ={}, flags={})
    assert settings.namespaces[0].pattern == "user.{sub}"


# ---------------------------------------------------------- redis modes ----


def test_redis_mode_and_sentinel_master_load() -> None:
    assert load().broker.redis_mode == "auto"
    settings = load(
        environ={
            "APIX_BROKER_REDIS_MODE": "Sentinel",
            "APIX_BROKER_SENTINEL_MASTER": "mymaster",
            "APIX_BROKER_REDIS_URL": "redis://h1:26379,h2:26379",
        }
    )
    assert settings.broker.redis_mode == "sentinel"
    assert settings.broker.sentinel_master == "mymaster"
    cluster = load(environ={"APIX_BROKER_REDIS_MODE": "cluster"})
    assert cluster.broker.redis_mode == "cluster"


def test_redis_mode_problems_name_the_setting() -> None:
    (line,) = problems(environ={"APIX_BROKER_REDIS_MODE": "ring"})
    assert line.startswith("broker.redis_mode: expected one of auto, standalone, cluster, sentinel")
    assert "APIX_BROKER_REDIS_MODE" in line
    (line,) = problems(
        environ={"APIX_BROKER_REDIS_MODE": "sentinel", "APIX_BROKER_REDIS_URL": "redis://h:26379"}
    )
    assert line.startswith("broker.sentinel_master: expected the name of the master")
    (line,) = problems(environ={"APIX_BROKER_REDIS_URL": "redis://h1:26379,h2:26379"})
    assert line.startswith("broker.redis_url: expected one host")
    (line,) = problems(
        environ={
            "APIX_BROKER_REDIS_MODE": "sentinel",
            "APIX_BROKER_SENTINEL_MASTER": "m",
            "APIX_BROKER_REDIS_URL": "unix:///tmp/r.sock",
        }
    )
    assert line.startswith("broker.redis_url: expected redis://host:port[,host:port...]")
