"""Names the protocol accepts: channels, state keys, orgs, subs, groups,
idempotency keys, and NATS-style permission patterns (PROTOCOL.md, "Channel
names and patterns").

Every function here is pure. `check_*` functions return their argument
unchanged when it is valid and raise `InvalidName` (a `ValueError`) with a
human-readable message otherwise; `is_*` twins answer with a bool.

Patterns
--------
A pattern is 1-8 dot-separated tokens, each one of:

- a channel token (`[A-Za-z0-9_\\-:@]+`): matches itself;
- `*`: matches exactly one token;
- `>`: only as the last token, matches one or more tokens;
- `{sub}`: matches a token equal to the connection's `sub`. A `sub` that is
  not itself a valid channel token (it contains a `.`, a space, ...) can
  never match `{sub}`, so `user.{sub}` never opens a channel to it.

`compile_pattern` validates once; `pattern_matches` is then a cheap walk
over the tokens, done on every subscribe/publish permission check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_CHANNEL_TOKENS = 8
MAX_CHANNEL_LENGTH = 200
MAX_SUB_LENGTH = 128
MAX_GROUP_LENGTH = 64
MAX_IDEMPOTENCY_KEY_LENGTH = 128

ANY_ONE = "*"
ONE_OR_MORE = ">"
SUB_TOKEN = "{sub}"

_TOKEN_CHAR = r"[A-Za-z0-9_\-:@]"
_TOKEN_RE = re.compile(_TOKEN_CHAR + "+")
_CHANNEL_RE = re.compile(rf"{_TOKEN_CHAR}+(?:\.{_TOKEN_CHAR}+){{0,{MAX_CHANNEL_TOKENS - 1}}}")
_ORG_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_GROUP_RE = re.compile(rf"{_TOKEN_CHAR}{{1,{MAX_GROUP_LENGTH}}}")

CompiledPattern = tuple[str, ...]

_CHANNEL_RULE = (
    f"1-{MAX_CHANNEL_TOKENS} dot-separated tokens of [A-Za-z0-9_-:@], "
    f"at most {MAX_CHANNEL_LENGTH} characters"
)


class InvalidName(ValueError):
    """A name or pattern breaks the protocol's syntax. `str(exc)` is a
    message fit for a client."""


def _show(value: str) -> str:
    """A short, escaped rendering of untrusted text for error messages."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def is_channel(name: str) -> bool:
    """True when `name` is a valid channel name (also the state key syntax)."""
    return len(name) <= MAX_CHANNEL_LENGTH and _CHANNEL_RE.fullmatch(name) is not None


def check_channel(name: str) -> str:
    """Return `name` if it is a valid channel name, else raise InvalidName."""
    if not is_channel(name):
        raise InvalidName(f"invalid channel name {_show(name)}: must be {_CHANNEL_RULE}")
    return name


def is_state_key(name: str) -> bool:
    """State keys use the channel syntax."""
    return is_channel(name)


def check_state_key(name: str) -> str:
    """Return `name` if it is a valid state key, else raise InvalidName."""
    if not is_channel(name):
        raise InvalidName(f"invalid state key {_show(name)}: must be {_CHANNEL_RULE}")
    return name


def is_org(org: str) -> bool:
    return _ORG_RE.fullmatch(org) is not None


def check_org(org: str) -> str:
    """Return `org` if it matches `[a-z0-9][a-z0-9_-]{0,62}`, else raise."""
    if not is_org(org):
        raise InvalidName(f"invalid org {_show(org)}: must match [a-z0-9][a-z0-9_-]{{0,62}}")
    return org


def is_sub(sub: str) -> bool:
    """1-128 printable characters (`str.isprintable`: no control, format,
    surrogate or separator characters other than the ASCII space)."""
    return 1 <= len(sub) <= MAX_SUB_LENGTH and sub.isprintable()


def check_sub(sub: str) -> str:
    if not is_sub(sub):
        raise InvalidName(
            f"invalid sub {_show(sub)}: must be 1-{MAX_SUB_LENGTH} printable characters"
        )
    return sub


def is_group(group: str) -> bool:
    return _GROUP_RE.fullmatch(group) is not None


def check_group(group: str) -> str:
    """Return `group` if it is 1-64 characters of [A-Za-z0-9_-:@], else raise."""
    if not is_group(group):
        raise InvalidName(
            f"invalid group name {_show(group)}: must be 1-{MAX_GROUP_LENGTH} "
            "characters of [A-Za-z0-9_-:@]"
        )
    return group


def is_idempotency_key(key: str) -> bool:
    return 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH


def check_idempotency_key(key: str) -> str:
    """Return `key` if it is 1-128 characters (any), else raise."""
    if not is_idempotency_key(key):
        raise InvalidName(
            f"invalid idempotency key: must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    return key


def channel_tokens(name: str) -> tuple[str, ...]:
    """The tokens of a (valid) channel name, for `pattern_matches`."""
    return tuple(name.split("."))


def compile_pattern(pattern: str) -> CompiledPattern:
    """Validate a pattern and return its tokens.

    Raises InvalidName when the pattern has no or more than 8 tokens, is
    longer than 200 characters, has an empty token, a token that is neither
    a channel token nor `*`, `>`, `{sub}`, or a `>` that is not last.
    """
    if not pattern or len(pattern) > MAX_CHANNEL_LENGTH:
        raise InvalidName(
            f"invalid pattern {_show(pattern)}: must be 1-{MAX_CHANNEL_LENGTH} characters"
        )
    tokens = tuple(pattern.split("."))
    if len(tokens) > MAX_CHANNEL_TOKENS:
        raise InvalidName(
            f"invalid pattern {_show(pattern)}: more than {MAX_CHANNEL_TOKENS} tokens"
        )
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token == ONE_OR_MORE:
            if index != last:
                raise InvalidName(
                    f"invalid pattern {_show(pattern)}: '>' is only allowed as the last token"
                )
        elif token not in (ANY_ONE, SUB_TOKEN) and _TOKEN_RE.fullmatch(token) is None:
            raise InvalidName(
                f"invalid pattern {_show(pattern)}: token {_show(token)} must be "
                "[A-Za-z0-9_-:@]+, '*', '>' or '{sub}'"
            )
    return tokens


def pattern_matches(compiled: CompiledPattern, channel: Sequence[str], sub: str) -> bool:
    """True when the tokens of a valid channel name match a compiled pattern
    for a connection whose subject is `sub`.

    `channel` must come from a valid name (`channel_tokens`): it cannot hold
    the wildcard tokens, so they are unambiguous here.
    """
    n_channel = len(channel)
    for index, token in enumerate(compiled):
        if token == ONE_OR_MORE:
            return n_channel > index
        if index >= n_channel:
            return False
        if token == ANY_ONE:
            continue
        if token == SUB_TOKEN:
            if channel[index] != sub or _TOKEN_RE.fullmatch(sub) is None:
                return False
            continue
        if channel[index] != token:
            return False
    return n_channel == len(compiled)
