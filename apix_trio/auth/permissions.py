"""Channel patterns and what one connection may do.

Patterns are NATS-style (PROTOCOL.md, "Channel names and patterns"): a
pattern is 1-8 dot-separated tokens; `*` matches exactly one token, `>` as
the last token matches one or more tokens, any other token matches itself,
and in `perms` patterns the whole token `{sub}` stands for the
connection's `sub`. A pattern only ever matches a well-formed name (1-8
tokens of `[A-Za-z0-9_\\-:@]`, at most 200 characters), so a matcher never
says yes to something the name validator would refuse.

Each pattern compiles to one regular expression; a connection's patterns
of one kind are joined into a single alternation, so a check is one regex
match (and usually a dict hit: decisions are cached per connection).

Pure module: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apix_trio.auth.identity import Identity

MAX_TOKENS = 8
MAX_NAME_LENGTH = 200
SUB_TOKEN = "{sub}"
ADMIN_ROLE = "admin"

_TOKEN = r"[A-Za-z0-9_\-:@]+"
_TOKEN_RE = re.compile(_TOKEN)
_CACHE_SIZE = 64


class BadPattern(ValueError):
    """The text is not a valid pattern; the message says why."""


def parse_pattern(text: str, *, allow_sub: bool = False) -> tuple[str, ...]:
    """Validate a pattern and return its tokens.

    `{sub}` is accepted as a whole token only when `allow_sub` is true
    (`perms` patterns; namespace patterns have none). Raises BadPattern.
    """
    if not isinstance(text, str) or not text:
        raise BadPattern("a pattern must be a non-empty string")
    if len(text) > MAX_NAME_LENGTH:
        raise BadPattern(f"pattern longer than {MAX_NAME_LENGTH} characters")
    tokens = tuple(text.split("."))
    if len(tokens) > MAX_TOKENS:
        raise BadPattern(f"pattern has more than {MAX_TOKENS} tokens")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == last):
            continue
        if token == ">":
            raise BadPattern("'>' is only allowed as the last token")
        if token == SUB_TOKEN:
            if not allow_sub:
                raise BadPattern("'{sub}' is not allowed in this pattern")
            continue
        if _TOKEN_RE.fullmatch(token) is None:
            raise BadPattern(f"invalid pattern token {token[:40]!r}")
    return tokens


def _regex_source(tokens: Iterable[str]) -> str:
    parts = []
    for token in tokens:
        if token == "*":
            parts.append(_TOKEN)
        elif token == ">":
            parts.append(rf"{_TOKEN}(?:\.{_TOKEN})*")
        else:
            parts.append(re.escape(token))
    return r"\.".join(parts)


def _plausible(name: str) -> bool:
    """Cheap bounds a regex cannot express compactly (length, token count)."""
    return len(name) <= MAX_NAME_LENGTH and name.count(".") < MAX_TOKENS


class Pattern:
    """A compiled pattern. `matches(name)` is true for well-formed names only.

    A pattern whose `{sub}` was bound to a `sub` that is not a valid
    channel token never matches anything.
    """

    __slots__ = ("_regex", "source", "text")

    def __init__(self, text: str, source: str | None) -> None:
        self.text = text
        self.source = source  # regex source, None for "never matches"
        self._regex = re.compile(source) if source is not None else None

    def matches(self, name: str) -> bool:
        if self._regex is None or not _plausible(name):
            return False
        return self._regex.fullmatch(name) is not None

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def compile_namespace_pattern(text: str) -> Pattern:
    """A namespace (or configuration) pattern: `{sub}` there means any one
    user, so `user.{sub}` names every user's private channel (`user.*`)."""
    tokens = parse_pattern(text, allow_sub=True)
    return compile_pattern(".".join("*" if t == SUB_TOKEN else t for t in tokens))


def compile_pattern(text: str, *, sub: str | None = None) -> Pattern:
    """Compile a pattern; with `sub`, `{sub}` tokens are bound to it.

    Without `sub`, a `{sub}` token is an error (namespace and configuration
    patterns). Raises BadPattern for invalid syntax.
    """
    tokens = parse_pattern(text, allow_sub=sub is not None)
    if sub is not None and SUB_TOKEN in tokens:
        if _TOKEN_RE.fullmatch(sub) is None:
            return Pattern(text, None)
        tokens = tuple(sub if token == SUB_TOKEN else token for token in tokens)
    return Pattern(text, _regex_source(tokens))


class _Rule:
    """Patterns of one kind, joined into one regex, with a bounded cache."""

    __slots__ = ("_cache", "_regex")

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        sources = [p.source for p in patterns if p.source is not None]
        joined = "|".join(f"(?:{source})" for source in sources)
        self._regex = re.compile(joined) if sources else None
        self._cache: dict[str, bool] = {}

    def allows(self, name: str) -> bool:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        allowed = (
            self._regex is not None and _plausible(name) and self._regex.fullmatch(name) is not None
        )
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[name] = allowed
        return allowed


SHARED_LIMIT = 1024
"""Distinct Permissions kept for sharing (`Permissions.from_identity`)."""
_SHARED: dict[
    tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], str | None, bool], Permissions
] = {}


class Permissions:
    """What one connection may subscribe to, publish to and use as state.

    Built from an identity (`from_identity`), shared by the identities with
    the same perms, and immutable once built. `admin` grants
    everything; keeping an admin inside its own org is the job of the
    org-scoped naming elsewhere, not of this class. Names are checked
    within the connection's org, without the org prefix.
    """

    __slots__ = ("_publish", "_state", "_subscribe", "admin")

    def __init__(
        self,
        *,
        subscribe: Iterable[Pattern] = (),
        publish: Iterable[Pattern] = (),
        state: Iterable[Pattern] = (),
        admin: bool = False,
    ) -> None:
        self.admin = admin
        self._subscribe = _Rule(subscribe)
        self._publish = _Rule(publish)
        self._state = _Rule(state)

    @classmethod
    def from_identity(cls, identity: Identity) -> Permissions:
        """Compile an identity's `perms`, binding `{sub}` to its `sub`.

        Invalid patterns are skipped (they grant nothing); the verifier
        already rejects tokens carrying them. Identities with the same
        perms, roles and (when a pattern has `{sub}`) sub share one
        Permissions: it never changes once built (its answers are cached,
        and the same for every holder), and most connections of a node
        carry a handful of distinct perms. At most `SHARED_LIMIT` are kept.
        """
        perms = identity.perms
        sub_pub_state = (
            tuple(perms.get("sub", ())),
            tuple(perms.get("pub", ())),
            tuple(perms.get("state", ())),
        )
        binds_sub = any(SUB_TOKEN in text for texts in sub_pub_state for text in texts)
        admin = ADMIN_ROLE in identity.roles
        key = (sub_pub_state, identity.sub if binds_sub else None, admin)
        shared = _SHARED.get(key)
        if shared is not None:
            return shared

        def compiled(texts: tuple[str, ...]) -> list[Pattern]:
            patterns = []
            for text in texts:
                try:
                    patterns.append(compile_pattern(text, sub=identity.sub))
                except BadPattern:
                    continue
            return patterns

        subscribe, publish, state = sub_pub_state
        permissions = cls(
            subscribe=compiled(subscribe),
            publish=compiled(publish),
            state=compiled(state),
            admin=admin,
        )
        if len(_SHARED) >= SHARED_LIMIT:
            _SHARED.clear()
        _SHARED[key] = permissions
        return permissions

    def can_subscribe(self, channel: str) -> bool:
        """Subscribe, history and presence on `channel` (`perms.sub`)."""
        return self.admin or self._subscribe.allows(channel)

    def can_publish(self, channel: str) -> bool:
        """Publish on `channel` (`perms.pub`)."""
        return self.admin or self._publish.allows(channel)

    def can_state(self, key: str) -> bool:
        """Read, write and subscribe to state `key` (`perms.state`)."""
        return self.admin or self._state.allows(key)
