"""Event routes: publish to one channel, broadcast to many, read history,
and the older `POST /api/v1/publish` (admin; channel in the body)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import trio
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.http import backend as b
from apix_trio.http.deps import Admin, AnyCaller, api_state, require
from apix_trio.http.errors import ApiError, ErrorBody, json_response
from apix_trio.http.models import (
    BroadcastBody,
    BroadcastResult,
    HistoryPage,
    LegacyPublishBody,
    PublishBody,
    Published,
)
from apix_trio.protocol.codec import encode_event
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.ids import BadStreamId, parse_id

router = APIRouter(prefix="/api/v1", tags=["events"])
SINCE = "An event id, or 0 for the oldest kept: the first `limit` events after it"
LIMIT = "1-1000; without `since`, the newest `limit` events"

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429, 503)
}
Channel = Annotated[str, Path(description="A channel name (PROTOCOL.md syntax), URL-encoded.")]


@router.post(
    "/channels/{channel}/events",
    response_model=Published,
    responses=ERRORS,
    summary="Publish one event (perms.pub); answered once stored",
)
async def publish_event(
    request: Request,
    who: AnyCaller,
    body: PublishBody,
    channel: Channel,
) -> Response:
    hub = api_state(request).hub
    b.channel_name(channel)
    b.check_publish(hub, who, channel)
    data = b.event_data(hub, body.data)
    with b.backend(hub):
        published = await b.publish(hub, who, channel, data, body.key)
    return json_response(200, orjson.dumps(b.published_json(published)))


@router.post(
    "/publish",
    response_model=Published,
    responses=ERRORS,
    summary="Publish one event, channel in the body (admin; older form of the route above)",
)
async def publish_legacy(request: Request, body: LegacyPublishBody, who: Admin) -> Response:
    hub = api_state(request).hub
    channel = b.channel_name(body.channel)
    b.check_publish(hub, who, channel)
    data = b.event_data(hub, body.data)
    with b.backend(hub):
        published = await b.publish(hub, who, channel, data, body.key)
    return json_response(200, orjson.dumps(b.published_json(published)))


@router.post(
    "/broadcast",
    response_model=BroadcastResult,
    responses=ERRORS,
    summary="Publish one event to 1-100 channels (perms.pub on each); results in request order",
)
async def broadcast(request: Request, body: BroadcastBody, who: AnyCaller) -> Response:
    hub = api_state(request).hub
    for channel in body.channels:
        b.channel_name(channel)  # any invalid name fails the whole request
    data = b.event_data(hub, body.data)
    results: list[dict[str, Any]] = [{"channel": channel} for channel in body.channels]

    async def one(entry: dict[str, Any]) -> None:
        channel = entry["channel"]
        try:
            b.check_publish(hub, who, channel)
            published = await b.publish(hub, who, channel, data, body.key)
        except ApiError as exc:
            entry["error"] = {"code": str(exc.code), "message": exc.message}
        except BrokerUnavailable:
            hub.metrics.broker_unavailable.inc()
            entry["error"] = {"code": "unavailable", "message": "backend unavailable, retry later"}
        else:
            entry.update(b.published_json(published))

    with trio.move_on_after(b.UNAVAILABLE_BOUND):
        async with trio.open_nursery() as nursery:
            for entry in results:
                nursery.start_soon(one, entry)
    for entry in results:
        if "id" not in entry and "error" not in entry:  # cut off by the bound
            entry["error"] = {"code": "unavailable", "message": "backend unavailable, retry later"}
    return json_response(200, orjson.dumps({"results": results}))


@router.get(
    "/channels/{channel}/events",
    response_model=HistoryPage,
    responses=ERRORS,
    summary="Read history (perms.sub), like the history op",
)
async def history(
    request: Request,
    who: AnyCaller,
    channel: Channel,
    since: Annotated[str | None, Query(description=SINCE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description=LIMIT)] = 100,
) -> Response:
    hub = api_state(request).hub
    b.channel_name(channel)
    require(who, who.permissions.can_subscribe(channel), "sub", channel)
    if since is not None:
        try:
            parse_id(since)
        except BadStreamId as exc:
            raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None
    retention = hub.namespaces.retention(channel)
    with b.backend(hub):
        if since is not None:
            page = await hub.broker.read_after(who.org, channel, since, limit, retention)
        else:
            page = await hub.broker.read_latest(who.org, channel, limit, retention)
    body = {"events": [encode_event(event) for event in page.events], "position": page.position}
    return json_response(200, orjson.dumps(body))
