"""Admin routes about consumer groups: a group's state, and redriving its
dead letters.

Redrive: the dead letters of `<channel>.dlq` written for the group (their
`data.group`), oldest first, after the group's redrive cursor, are
published again to the channel, each with its original `data` and `from`
and the idempotency key `redrive:<dead letter id>`; then the cursor moves
to the last one published (`ConsumerGroups.advance_redrive_cursor`: only
ever forward, atomically). Two redrives at once read the same dead letters
and publish the same keys, so the channel stores each once (the second is a
duplicate, not counted in `redriven`); the cursor ends at the furthest
letter either published, and everything up to it was published by that
request, so nothing is skipped. A redrive cut short by the backend moves
the cursor to the last letter it published and answers 503.
"""

from __future__ import annotations

from typing import Annotated, Any

import attrs
import orjson
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from apix_trio.broker.groups import dead_letter_channel
from apix_trio.gateway.hub import Hub
from apix_trio.http import backend as b
from apix_trio.http.audit import audit_admin
from apix_trio.http.deps import Admin, api_state
from apix_trio.http.errors import ApiError, ErrorBody, json_response
from apix_trio.http.models import GroupState, RedriveBody, Redriven
from apix_trio.protocol.codes import ErrorCode
from apix_trio.protocol.event import Event

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 429, 503)
}
PAGE = 1000
DEFAULT_REDRIVE = 100
Channel = Annotated[str, Path(description="The group's channel, URL-encoded.")]
Group = Annotated[str, Path(description="The group name.")]


@attrs.frozen
class DeadLetter:
    id: str
    data: str
    """The original event's data (JSON text)."""
    sender: str


def _letter_of(event: Event, group: str) -> DeadLetter | None:
    """The dead letter in `event` if it was written for `group`."""
    try:
        body = orjson.loads(event.data)
        if body.get("group") != group:
            return None
        original = body["event"]
        return DeadLetter(event.id, orjson.dumps(original.get("data")).decode(), original["from"])
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None


async def dead_letters(
    hub: Hub, org: str, channel: str, group: str, since: str, limit: int | None
) -> list[DeadLetter]:
    """The group's retained dead letters after `since`, oldest first (at most `limit`)."""
    dlq = dead_letter_channel(channel)
    retention = hub.namespaces.retention(dlq)
    found: list[DeadLetter] = []
    while limit is None or len(found) < limit:
        page = await hub.broker.read_after(org, dlq, since, PAGE, retention)
        for event in page.events:
            letter = _letter_of(event, group)
            if letter is not None:
                found.append(letter)
        if len(page.events) < PAGE:
            break
        since = page.events[-1].id
    return found if limit is None else found[:limit]


@router.get(
    "/{channel}/{group}",
    response_model=GroupState,
    responses=ERRORS,
    summary="A consumer group's pending events, consumers and dead letters (admin)",
)
async def group_state(
    request: Request, channel: Channel, group: Group, who: Admin
) -> Response:
    hub = api_state(request).hub
    b.channel_name(channel)
    b.group_name(group)
    with b.backend(hub):
        info = await hub.broker.groups.info(who.org, channel, group)
        letters = await dead_letters(hub, who.org, channel, group, "0", None)
    if info is None and not letters:
        raise ApiError(ErrorCode.NOT_FOUND, f"no group {group} on {channel}")
    consumers = [] if info is None else info.consumers
    body = {
        "pending": sum(c.pending for c in consumers),
        "consumers": [
            {"name": c.name, "pending": c.pending, "idle_ms": int(c.idle * 1000)}
            for c in consumers
        ],
        "dead_letters": len(letters),
    }
    return json_response(200, orjson.dumps(body))


@router.post(
    "/{channel}/{group}/redrive",
    response_model=Redriven,
    responses=ERRORS,
    summary="Publish the group's oldest dead letters not yet redriven again (admin)",
)
async def redrive(
    request: Request,
    who: Admin,
    channel: Channel,
    group: Group,
    body: RedriveBody | None = None,
) -> Response:
    hub = api_state(request).hub
    b.channel_name(channel)
    b.group_name(group)
    limit = body.limit if body is not None else DEFAULT_REDRIVE
    groups = hub.broker.groups
    retention = hub.namespaces.retention(channel)
    redriven = 0
    last: str | None = None
    with b.backend(hub):
        cursor = await groups.redrive_cursor(who.org, channel, group)
        letters = await dead_letters(hub, who.org, channel, group, cursor, limit)
        try:
            for letter in letters:
                published = await hub.broker.publish(
                    who.org,
                    channel,
                    letter.data,
                    sender=letter.sender,
                    key=f"redrive:{letter.id}",
                    retention=retention,
                )
                last = letter.id
                if not published.duplicate:
                    redriven += 1
                    hub.metrics.published.inc()
        finally:
            if last is not None:
                await groups.advance_redrive_cursor(who.org, channel, group, last)
    audit_admin(
        hub,
        who.identity,
        "admin.redrive",
        {"channel": channel, "group": group, "limit": limit, "redriven": redriven},
        ip=request.client.host if request.client is not None else "",
    )
    return json_response(200, orjson.dumps({"redriven": redriven}))

