"""Request and response bodies of the HTTP API (they make the OpenAPI document).

Routes return ready-made JSON responses on the hot paths (FastAPI then
skips re-validating the result), so the response models here document the
shapes; the request models validate every body (a failure is a 400
`bad_request`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from apix_trio.protocol.names import MAX_IDEMPOTENCY_KEY_LENGTH

IdempotencyKey = Field(
    None,
    min_length=1,
    max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
    description="Idempotency key: a second publish with it on the same channel within "
    "`dedupe_window` stores nothing and answers the first event with `duplicate: true`.",
)


class PublishBody(BaseModel):
    data: Any = Field(..., description="Any JSON value (null included); required.")
    key: str | None = IdempotencyKey


class LegacyPublishBody(PublishBody):
    channel: str = Field(..., description="The channel, in the token's org.")


class BroadcastBody(PublishBody):
    channels: list[str] = Field(..., min_length=1, max_length=100)


class Published(BaseModel):
    id: str
    ts: int
    duplicate: bool


class ErrorInfo(BaseModel):
    code: str
    message: str


class BroadcastEntry(BaseModel):
    """Either `id`, `ts` and `duplicate`, or `error`."""

    channel: str
    id: str | None = None
    ts: int | None = None
    duplicate: bool | None = None
    error: ErrorInfo | None = None


class BroadcastResult(BaseModel):
    results: list[BroadcastEntry]


class EventOut(BaseModel):
    id: str
    ts: int
    data: Any
    from_: str = Field(..., alias="from")
    key: str | None = None


class HistoryPage(BaseModel):
    events: list[EventOut]
    position: str


class ChannelEntry(BaseModel):
    channel: str
    position: str
    subscribers: int = Field(..., description="Live subscribers on the node that answered.")


class ChannelList(BaseModel):
    channels: list[ChannelEntry]


class DisconnectBody(BaseModel):
    sub: str | None = Field(None, min_length=1, max_length=128)
    conn: str | None = Field(None, min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=123, description="Close reason (<= 123 bytes).")


class Disconnected(BaseModel):
    disconnected: int


class ConnectionEntry(BaseModel):
    conn: str
    sub: str
    node: str
    since: int = Field(..., description="Unix milliseconds of authentication.")


class ConnectionList(BaseModel):
    connections: list[ConnectionEntry]
    total: int


class ConsumerEntry(BaseModel):
    name: str
    pending: int
    idle_ms: int


class GroupState(BaseModel):
    pending: int
    consumers: list[ConsumerEntry]
    dead_letters: int


class RedriveBody(BaseModel):
    limit: int = Field(100, ge=1, le=1000, description="Dead letters to redrive at most")


class Redriven(BaseModel):
    redriven: int


class Health(BaseModel):
    status: str
    node: str


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
