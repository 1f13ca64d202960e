"""Who a verified token speaks for: the `Identity` every layer above auth reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

PERM_KINDS = ("sub", "pub", "state")
MAX_INFO_BYTES = 1024
"""The largest `info` claim, serialized (PROTOCOL.md: at most 1 KiB)."""


def no_perms() -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(PERM_KINDS, ())


@attrs.frozen
class Identity:
    """Who a verified token speaks for.

    `perms` always has the keys "sub", "pub" and "state" (empty tuples when
    the token grants nothing); `claims` is the whole verified payload.
    `info` is the optional `info` claim as compact JSON text (an object of
    at most `MAX_INFO_BYTES`), shown to others in presence; None when absent.
    """

    org: str
    sub: str
    exp: int
    roles: tuple[str, ...] = ()
    perms: Mapping[str, tuple[str, ...]] = attrs.field(factory=no_perms)
    claims: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    info: str | None = attrs.field(default=None, repr=False)
