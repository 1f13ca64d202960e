"""The bodies of the admin read routes `GET /api/v1/audit` and `GET /api/v1/latency`.

The HTTP layer authenticates (role `admin`), takes `org` from the token
only, and calls these with the raw query parameters; they return exactly the
JSON bodies HTTP_API.md specifies. Readiness is `Hub.readiness()`.

Error handling (for the HTTP layer to map):

- `BadAuditQuery`, `BadWindow` (both ValueError): 400 `bad_request`, with
  `str(exc)` as the message;
- `BrokerUnavailable`: 503 `unavailable` (the store's own operation timeout
  bounds the wait, `broker.operation_timeout`, 4 s by default).
"""

from __future__ import annotations

from typing import Any

from apix_trio.broker.audit import BadAuditQuery, parse_query
from apix_trio.gateway.hub import Hub, audit_retention
from apix_trio.observability.latency import BadWindow

__all__ = ["BadAuditQuery", "BadWindow", "audit_page", "latency_report"]


async def audit_page(
    hub: Hub,
    org: str,
    *,
    since: str | None = None,
    limit: str | int | None = None,
    type: str | None = None,
    sub: str | None = None,
) -> dict[str, Any]:
    """`{"entries": [...], "position"}`: one page of `org`'s audit trail,
    oldest first (`broker/audit.py` for paging and filters)."""
    query = parse_query(since=since, limit=limit, type=type, sub=sub)
    page = await hub.broker.audit.page(org, query, audit_retention(hub.settings))
    return page.as_json()


async def latency_report(hub: Hub, org: str, window: str | int | None = 60) -> dict[str, Any]:
    """`{"publish_to_deliver_ms": {"p50", "p95", "p99", "max", "count"},
    "publish_ack_ms": {...}}` for `org` over `window` seconds (60, 300 or
    900; default 60), across all nodes."""
    return await hub.latency.report(org, 60 if window in (None, "") else window)
