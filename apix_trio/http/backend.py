"""Shared steps of routes that reach the broker: name checks, the
`unavailable` bound, and publishing on behalf of a caller."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import trio

from apix_trio.broker.model import BrokerUnavailable, Published
from apix_trio.gateway.hub import Hub
from apix_trio.http.deps import Caller
from apix_trio.http.errors import ApiError
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.names import InvalidName, check_channel, check_group

UNAVAILABLE_BOUND = 4.5
"""Seconds before a request waiting on the broker answers 503 (HTTP_API: within 5 s)."""


def channel_name(name: str) -> str:
    """`name` if it is a valid channel name, else ApiError 400."""
    try:
        return check_channel(name)
    except InvalidName as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None


def group_name(name: str) -> str:
    try:
        return check_group(name)
    except InvalidName as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None


@contextmanager
def backend(hub: Hub) -> Iterator[None]:
    """Broker trouble (or no answer within the bound) -> ApiError 503."""
    bound = min(UNAVAILABLE_BOUND, hub.settings.broker.operation_timeout + 0.5)
    try:
        with trio.fail_after(bound):
            yield
    except (BrokerUnavailable, trio.TooSlowError):
        hub.metrics.broker_unavailable.inc()
        raise ApiError(ErrorCode.UNAVAILABLE, "backend unavailable, retry later") from None


def event_data(hub: Hub, data: Any) -> str:
    """The JSON text of a publish's `data`: 400 when it cannot be JSON,
    413 over `limits.max_message_bytes` (the largest WebSocket message)."""
    try:
        text = orjson.dumps(data).decode()
    except orjson.JSONEncodeError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"data is not storable JSON: {exc}") from None
    limit = hub.settings.limits.max_message_bytes
    if len(text) > limit:
        raise ApiError(ErrorCode.TOO_LARGE, f"data is larger than {limit} bytes")
    return text


def check_publish(hub: Hub, caller: Caller, channel: str) -> None:
    """ApiError 403 unless `caller` may publish on `channel`: a `perms.pub`
    pattern (or admin), and, for non-admins, a namespace that lets clients
    publish (`client_publish`)."""
    if not caller.permissions.can_publish(channel):
        raise ApiError(ErrorCode.FORBIDDEN, f"no permission to pub on {channel}")
    if not caller.is_admin and not hub.namespaces.options(channel).client_publish:
        raise ApiError(ErrorCode.FORBIDDEN, f"clients may not publish on {channel}")


async def publish(hub: Hub, caller: Caller, channel: str, data: str, key: str | None) -> Published:
    """Store one event from `caller` (its `from` is the token's `sub`).

    Error handling: BrokerUnavailable passes through (callers wrap `backend`).
    """
    published = await hub.broker.publish(
        caller.org,
        channel,
        data,
        sender=caller.sub,
        key=key,
        retention=hub.namespaces.retention(channel),
    )
    if published.duplicate:
        hub.metrics.duplicates.inc()
    else:
        hub.metrics.published.inc()
    return published


def published_json(published: Published) -> dict[str, Any]:
    event = published.event
    return {"id": event.id, "ts": event.ts, "duplicate": published.duplicate}
