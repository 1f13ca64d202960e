"""Who a verified token speaks for: the `Identity` every layer above auth reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson

PERM_KINDS = ("sub", "pub", "state")
MAX_INFO_BYTES = 1024
"""The largest `info` claim, serialized (PROTOCOL.md: at most 1 KiB)."""


def no_perms() -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(PERM_KINDS, ())


@attrs.frozen
class Identity:
    """Who a verified token speaks for.

    `perms` always has the keys "sub", "pub" and "state" (empty tuples when
    the token grants nothing); `payload` is the whole verified payload as the
    token carried it (JSON), and `claims` that payload decoded. Every
    connection holds its Identity for its lifetime, so the decoded form is
    made on demand rather than kept (a few hundred bytes per connection).
    `info` is the optional `info` claim as compact JSON text (an object of
    at most `MAX_INFO_BYTES`), shown to others in presence; None when absent.
    """

    org: str
    sub: str
    exp: int
    roles: tuple[str, ...] = ()
    perms: Mapping[str, tuple[str, ...]] = attrs.field(factory=no_perms)
    payload: bytes = attrs.field(default=b"{}", repr=False)
    info: str | None = attrs.field(default=None, repr=False)

    @property
    def claims(self) -> Mapping[str, Any]:
        """The verified payload, decoded (a new dict on every call)."""
        claims: dict[str, Any] = orjson.loads(self.payload)
        return claims
