"""Admin routes about connections and channels: list channels, list
connections across nodes, disconnect across nodes (`gateway/control.py`)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from apix_trio.broker.directory import ConnectionRecord
from apix_trio.http import backend as b
from apix_trio.http.audit import audit_admin
from apix_trio.http.deps import Admin, api_state
from apix_trio.http.errors import ApiError, ErrorBody, json_response
from apix_trio.http.models import ChannelList, ConnectionList, DisconnectBody, Disconnected
from apix_trio.protocol.codes import ErrorCode

router = APIRouter(prefix="/api/v1", tags=["admin"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 429, 503)
}


@router.get(
    "/channels",
    response_model=ChannelList,
    responses=ERRORS,
    summary="Channels of the org with retained history or live subscribers here (admin)",
)
async def list_channels(
    request: Request,
    who: Admin,
    prefix: Annotated[str, Query(max_length=200, description="Only names starting with this")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    hub = api_state(request).hub
    with b.backend(hub):
        stored = await hub.broker.list_channels(who.org, prefix, limit)
    positions = {info.channel: info.position for info in stored}
    live = [c for c in hub.router.channels_of(who.org) if c.startswith(prefix)]
    names = sorted(set(positions) | {c for c in live if not c.startswith("$")})[:limit]
    missing = [name for name in names if name not in positions]
    with b.backend(hub):
        for name in missing:
            positions[name] = await hub.broker.position(who.org, name)
    channels = [
        {
            "channel": name,
            "position": positions[name],
            "subscribers": hub.router.subscriber_count(who.org, name),
        }
        for name in names
    ]
    return json_response(200, orjson.dumps({"channels": channels}))


def _record(record: ConnectionRecord) -> dict[str, Any]:
    return {"conn": record.conn, "sub": record.sub, "node": record.node, "since": record.since}


@router.get(
    "/connections",
    response_model=ConnectionList,
    responses=ERRORS,
    summary="Authenticated connections of the org on every node (admin)",
)
async def list_connections(
    request: Request,
    who: Admin,
    sub: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    hub = api_state(request).hub
    keeper = hub.directory
    local = [r for r in keeper.local(who.org) if sub is None or r.sub == sub]
    with b.backend(hub):
        remote = await hub.broker.directory.find(
            who.org, sub=sub, exclude_node=keeper.node, limit=limit
        )
    merged = sorted([*local, *remote.records], key=lambda r: (r.since, r.conn))[:limit]
    body = {"connections": [_record(r) for r in merged], "total": len(local) + remote.total}
    return json_response(200, orjson.dumps(body))


@router.post(
    "/disconnect",
    response_model=Disconnected,
    responses=ERRORS,
    summary="Close the org's connections of a user (sub) or one connection (conn) "
    "on every node with 4030 (admin)",
)
async def disconnect(request: Request, body: DisconnectBody, who: Admin) -> Response:
    if (body.sub is None) == (body.conn is None):
        raise ApiError(ErrorCode.BAD_REQUEST, 'expected exactly one of "sub" or "conn"')
    hub = api_state(request).hub
    count = hub.control.close_local(who.org, sub=body.sub, conn=body.conn, reason=body.reason)
    if body.conn is None or not count:
        with b.backend(hub):
            remote = await hub.broker.directory.find(
                who.org, sub=body.sub, conn=body.conn, exclude_node=hub.directory.node, limit=0
            )
            await hub.control.publish_disconnect(
                who.org, sub=body.sub, conn=body.conn, reason=body.reason, sender=who.sub
            )
        count += remote.total
    detail = {k: v for k, v in body.model_dump().items() if v is not None}
    audit_admin(
        hub,
        who.identity,
        "admin.disconnect",
        {**detail, "disconnected": count},
        ip=request.client.host if request.client is not None else "",
    )
    return json_response(200, orjson.dumps({"disconnected": count}))
