"""The audit trail store: one append-only trail per org, paged like `history`.

The interface; memory and Redis implementations live beside it
(`memory/audit.py`, `redis/audit.py`) with one contract suite
(`tests/test_audit_store.py`). The node's writer that feeds it is
`apix_trio.observability.audit`.

Entries are `AuditRecord`s given an id `<ms>-<seq>` (a stream id, increasing
per org) when stored. Retention (`AuditRetention`, from `audit.max_entries`
and `audit.ttl`): a trail keeps at least its newest `max_entries` entries
(trimming may be approximate, as Redis' `MAXLEN ~` is: a few more may stay)
and hides and then drops entries whose id is older than `ttl` seconds.

Paging (`page`, HTTP_API.md `GET /api/v1/audit`): entries oldest first.

- with `since`: the first `limit` matching entries with an id after it
  (`"0"`: from the oldest kept); `position` is the id of the last entry the
  page *examined* (matching or not), or `since` itself when there was none,
  so `since=position` continues without skipping or repeating anything;
- without `since`: the newest `limit` matching entries; `position` is the
  trail's newest id (`"0-0"` when empty), so a follower continues from there.

Filters: `type` (exact, or a prefix when it ends with `*`: `admin.*`) and
`sub` (exact). A filtered page examines at most `SCAN_BUDGET` entries, so a
filter that matches nothing costs a bounded amount of work; the page then
holds fewer than `limit` entries and `position` tells where to go on.

Error handling: every method raises `BrokerUnavailable` for backend trouble;
`page` raises `ids.BadStreamId` for a malformed `since` (validate first:
`parse_query`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson

from apix_trio.observability.audit import AuditRecord
from apix_trio.protocol import ids

SCAN_BUDGET = 10_000
"""Entries one filtered page examines at most."""
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


@attrs.frozen
class AuditRetention:
    max_entries: int = 100_000
    ttl: float = 2_592_000.0


@attrs.frozen
class AuditQuery:
    """A validated page request (see `parse_query`)."""

    since: str | None = None
    limit: int = DEFAULT_LIMIT
    type: str | None = None
    sub: str | None = None


@attrs.frozen
class AuditPage:
    entries: tuple[dict[str, Any], ...]
    position: str

    def as_json(self) -> dict[str, Any]:
        """The body of `GET /api/v1/audit`."""
        return {"entries": list(self.entries), "position": self.position}


class BadAuditQuery(ValueError):
    """A query parameter is invalid; `str()` says which and why (HTTP 400)."""


def parse_query(
    since: str | None = None,
    limit: str | int | None = None,
    type: str | None = None,
    sub: str | None = None,
) -> AuditQuery:
    """Validate raw query parameters (strings from a URL, or values).

    Empty strings count as absent. Raises BadAuditQuery: `since` not `"0"`
    or an id, `limit` not an integer 1-1000.
    """
    if since == "":
        since = None
    if since is not None:
        try:
            since = ids.format_id(ids.parse_id(since))
        except ids.BadStreamId as exc:
            raise BadAuditQuery(f"since: {exc}") from None
    if limit is None or limit == "":
        count = DEFAULT_LIMIT
    else:
        try:
            count = int(limit)
        except (TypeError, ValueError):
            raise BadAuditQuery("limit: expected an integer 1-1000") from None
        if not 1 <= count <= MAX_LIMIT:
            raise BadAuditQuery("limit: expected an integer 1-1000")
    return AuditQuery(since=since, limit=count, type=type or None, sub=sub or None)


def matches(query: AuditQuery, type: str, sub: str) -> bool:
    """Whether an entry of `type` by `sub` passes the query's filters."""
    wanted = query.type
    if wanted is not None:
        if wanted.endswith("*"):
            if not type.startswith(wanted[:-1]):
                return False
        elif type != wanted:
            return False
    return query.sub is None or sub == query.sub


class AuditLog(abc.ABC):
    """The org audit trails of one backend (see the module docstring)."""

    @abc.abstractmethod
    async def append_many(
        self, records: Sequence[AuditRecord], retention: AuditRetention
    ) -> list[str]:
        """Store the records (any orgs, in order per org); their ids.

        Not atomic as a whole: on BrokerUnavailable some may be stored.
        """

    @abc.abstractmethod
    async def page(self, org: str, query: AuditQuery, retention: AuditRetention) -> AuditPage:
        """One page of `org`'s trail (see the module docstring)."""


# -- the stored form (shared by the stores that keep entries as text) -----------


def encode_body(record: AuditRecord) -> bytes:
    """The entry without id, type and sub (stored beside it as separate fields)."""
    return orjson.dumps(
        {
            "ts": record.ts,
            "conn": record.conn,
            "node": record.node,
            "ip": record.ip,
            "detail": record.detail,
        }
    )


def decode_entry(entry_id: str, type: str, sub: str, body: bytes | str) -> dict[str, Any]:
    """The JSON entry from its stored parts; a malformed body keeps id, type, sub."""
    try:
        raw = orjson.loads(body)
        if not isinstance(raw, Mapping):
            raise TypeError("not an object")
    except (orjson.JSONDecodeError, TypeError):
        raw = {}
    detail = raw.get("detail")
    return {
        "id": entry_id,
        "ts": raw.get("ts", int(entry_id.partition("-")[0] or 0)),
        "type": type,
        "sub": sub,
        "conn": raw.get("conn", ""),
        "node": raw.get("node", ""),
        "ip": raw.get("ip", ""),
        "detail": detail if isinstance(detail, dict) else {},
    }
