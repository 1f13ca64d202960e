"""Reading an org's audit trail from outside the server: `apix-trio audit`.

Two sources give the same pages (`{"entries": [...], "position"}`,
`broker/audit.py` for the paging rules):

- `open_redis_pages(settings, org)`: straight from Redis, with the broker's
  own store (`broker.redis.audit`), for operators on the Redis network;
- `open_http_pages(url, token)`: through `GET /api/v1/audit` of a node's
  HTTP API with an admin token (the trail is then the token's org).

`print_trail` prints each entry as one JSON line and, with `follow`, keeps
asking for the entries after the last position every `interval` seconds
(`tail -f` for the trail).

Error handling: `AuditReadError` (a refused request, an unreachable server,
Redis down) with a message for the command line; `BadAuditQuery` for bad
parameters.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio

from apix_trio.broker.audit import AuditQuery, AuditRetention
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.settings import Settings

PageSource = Callable[[AuditQuery], Awaitable[dict[str, Any]]]
HTTP_TIMEOUT = 10.0


class AuditReadError(Exception):
    """The trail could not be read; `str()` says why (no token in it)."""


@asynccontextmanager
async def open_redis_pages(settings: Settings, org: str) -> AsyncIterator[PageSource]:
    """Pages of `org`'s trail read from `settings.broker.redis_url`.

    Resource handling: the Redis connections are closed on exit.
    """
    from apix_trio.broker.redis.events import open_redis_broker

    retention = AuditRetention(settings.audit.max_entries, settings.audit.ttl)
    async with open_redis_broker(settings) as broker:

        async def page(query: AuditQuery) -> dict[str, Any]:
            try:
                return (await broker.audit.page(org, query, retention)).as_json()
            except BrokerUnavailable as exc:
                raise AuditReadError(f"redis: {exc}") from None

        yield page


def audit_url(base_url: str, query: AuditQuery) -> str:
    """`<base_url>/api/v1/audit?...` for the query (absent parameters left out)."""
    params = {"since": query.since, "limit": query.limit, "type": query.type, "sub": query.sub}
    encoded = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{base_url.rstrip('/')}/api/v1/audit?{encoded}"


def _get_json(url: str, token: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: dict[str, Any] = orjson.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        try:
            error = orjson.loads(exc.read()).get("error", {})
            detail = f"{error.get('code')}: {error.get('message')}"
        except (orjson.JSONDecodeError, AttributeError):
            detail = exc.reason
        raise AuditReadError(f"HTTP {exc.code} ({detail})") from None
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as exc:
        raise AuditReadError(f"cannot read {url.split('?')[0]}: {exc}") from None


@asynccontextmanager
async def open_http_pages(
    base_url: str, token: str, *, request_timeout: float = HTTP_TIMEOUT
) -> AsyncIterator[PageSource]:
    """Pages read through a node's `GET /api/v1/audit` (an admin token's org);
    each request gives up after `request_timeout` seconds."""

    async def page(query: AuditQuery) -> dict[str, Any]:
        url = audit_url(base_url, query)
        return await trio.to_thread.run_sync(
            _get_json, url, token, request_timeout, abandon_on_cancel=True
        )

    await trio.lowlevel.checkpoint()
    yield page


async def print_trail(
    page: PageSource,
    query: AuditQuery,
    *,
    emit: Callable[[str], None],
    follow: bool = False,
    interval: float = 1.0,
) -> int:
    """Emit every entry of the query's pages as a JSON line; how many.

    Without `follow`: the one page the query asks for. With it: that page,
    then every new entry, forever (cancel to stop).
    """
    body = await page(query)
    printed = 0
    while True:
        for entry in body["entries"]:
            emit(orjson.dumps(entry).decode())
            printed += 1
        if not follow:
            return printed
        position = str(body["position"])
        if not body["entries"]:
            await trio.sleep(interval)
        query = AuditQuery(since=position, limit=query.limit, type=query.type, sub=query.sub)
        body = await page(query)
