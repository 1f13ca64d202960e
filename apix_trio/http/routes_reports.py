"""Read routes over what the node and the broker know: channel presence
(perms.sub), the org's audit trail and its publish latency (admin)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from apix_trio.gateway.reports import BadAuditQuery, BadWindow, audit_page, latency_report
from apix_trio.http import backend as b
from apix_trio.http.deps import Admin, AnyCaller, api_state, require
from apix_trio.http.errors import ApiError, ErrorBody, json_response
from apix_trio.protocol.codes import ErrorCode

router = APIRouter(prefix="/api/v1", tags=["reports"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 429, 503)
}
Channel = Annotated[str, Path(description="A channel name (PROTOCOL.md syntax), URL-encoded.")]


@router.get(
    "/channels/{channel}/presence",
    responses=ERRORS,
    summary="Who is on a channel (perms.sub), as the presence op",
)
async def presence(
    request: Request,
    who: AnyCaller,
    channel: Channel,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> Response:
    hub = api_state(request).hub
    b.channel_name(channel)
    require(who, who.permissions.can_subscribe(channel), "sub", channel)
    if not hub.namespaces.options(channel).presence:
        raise ApiError(ErrorCode.FORBIDDEN, f"presence is not enabled on {channel}")
    with b.backend(hub):
        snapshot = await hub.presence.store.members(who.org, channel, limit)
    body = {
        "members": orjson.Fragment(snapshot.members_json),
        "total": snapshot.total,
        "users": snapshot.users,
    }
    return json_response(200, orjson.dumps(body))


@router.get("/audit", responses=ERRORS, summary="The org's audit trail (admin), paged")
async def audit(
    request: Request,
    who: Admin,
    since: Annotated[str | None, Query(description="An entry id, or 0 for the oldest")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    type: Annotated[str | None, Query(description="Entry type; trailing * = prefix")] = None,
    sub: Annotated[str | None, Query()] = None,
) -> Response:
    hub = api_state(request).hub
    try:
        with b.backend(hub):
            page = await audit_page(hub, who.org, since=since, limit=limit, type=type, sub=sub)
    except BadAuditQuery as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None
    return json_response(200, orjson.dumps(page))


@router.get(
    "/latency",
    responses=ERRORS,
    summary="Publish -> deliver and publish -> ack latency of the org (admin), all nodes",
)
async def latency(
    request: Request,
    who: Admin,
    window: Annotated[int, Query(description="Seconds: 60, 300 or 900")] = 60,
) -> Response:
    hub = api_state(request).hub
    try:
        with b.backend(hub):
            report = await latency_report(hub, who.org, window)
    except BadWindow as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None
    return json_response(200, orjson.dumps(report))
