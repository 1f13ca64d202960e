"""State routes: read and change a versioned state key over HTTP (perms.state),
with the same versions, compare-and-set, limits and fan-out as the `state.*`
ops; every change is recorded in the org's audit trail as `state.changed`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from apix_trio.broker.state import (
    StateConflict,
    StateLimitExceeded,
    StateLimits,
    StateTooLarge,
)
from apix_trio.http import backend as b
from apix_trio.http.deps import AnyCaller, Caller, api_state, require
from apix_trio.http.errors import ApiError, ErrorBody, json_response
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.names import InvalidName, check_state_key
from apix_trio.routing.state import state_result

router = APIRouter(prefix="/api/v1", tags=["state"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 409, 413, 429, 503)
}
Key = Annotated[str, Path(description="A state key (channel-name syntax), URL-encoded.")]
VERSION = "Compare-and-set: change only if this is the current version (0: never set)"


class StateOut(BaseModel):
    value: Any = None
    version: int


class Versioned(BaseModel):
    version: int


class PutBody(BaseModel):
    value: Any
    version: int | None = Field(default=None, ge=0, description=VERSION)


class PatchBody(BaseModel):
    patch: Any = Field(description="An RFC 7396 JSON merge patch")
    version: int | None = Field(default=None, ge=0, description=VERSION)


def _key(who: Caller, key: str) -> str:
    try:
        check_state_key(key)
    except InvalidName as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None
    require(who, who.permissions.can_state(key), "state", key)
    return key


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _change(request: Request, who: Caller, key: str, op: str, change: Any) -> Response:
    hub = api_state(request).hub
    try:
        with b.backend(hub):
            version = await change
    except StateConflict as exc:
        raise ApiError(
            ErrorCode.CONFLICT, f"version conflict: {exc}", version=exc.version
        ) from None
    except StateTooLarge as exc:
        raise ApiError(ErrorCode.TOO_LARGE, str(exc)) from None
    except StateLimitExceeded as exc:
        raise ApiError(ErrorCode.LIMIT_EXCEEDED, str(exc)) from None
    hub.metrics.state_changes.inc()
    hub.audit.record_state_changed(
        who.org, sub=who.sub, key=key, change=op, version=version, ip=_ip(request)
    )
    return json_response(200, orjson.dumps({"version": version}))


def _ip(request: Request) -> str:
    return request.client.host if request.client is not None else ""


@router.get("/state/{key}", response_model=StateOut, responses=ERRORS, summary="Read a key")
async def get_state(request: Request, who: AnyCaller, key: Key) -> Response:
    hub = api_state(request).hub
    _key(who, key)
    with b.backend(hub):
        current = await hub.broker.state.get(who.org, key)
    return json_response(200, orjson.dumps(state_result(current)))


@router.put(
    "/state/{key}", response_model=Versioned, responses=ERRORS, summary="Set a key (optional CAS)"
)
async def put_state(request: Request, who: AnyCaller, key: Key, body: PutBody) -> Response:
    hub = api_state(request).hub
    _key(who, key)
    limits = StateLimits.from_settings(hub.settings.state)
    change = hub.broker.state.set(
        who.org, key, _json_text(body.value), version=body.version, sender=who.sub, limits=limits
    )
    return await _change(request, who, key, "put", change)


@router.patch(
    "/state/{key}",
    response_model=Versioned,
    responses=ERRORS,
    summary="Apply an RFC 7396 merge patch (optional CAS)",
)
async def patch_state(request: Request, who: AnyCaller, key: Key, body: PatchBody) -> Response:
    hub = api_state(request).hub
    _key(who, key)
    limits = StateLimits.from_settings(hub.settings.state)
    change = hub.broker.state.patch(
        who.org, key, _json_text(body.patch), version=body.version, sender=who.sub, limits=limits
    )
    return await _change(request, who, key, "patch", change)


@router.delete(
    "/state/{key}",
    response_model=Versioned,
    responses=ERRORS,
    summary="Set a key to null (optional CAS); the version still counts",
)
async def delete_state(
    request: Request,
    who: AnyCaller,
    key: Key,
    version: Annotated[int | None, Query(ge=0, description=VERSION)] = None,
) -> Response:
    hub = api_state(request).hub
    _key(who, key)
    change = hub.broker.state.delete(who.org, key, version=version, sender=who.sub)
    return await _change(request, who, key, "delete", change)
