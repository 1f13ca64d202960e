"""The protocol's taxonomy of reply errors and close codes (PROTOCOL.md, v1).

Every place that answers a client or closes a connection names one of these;
no bare strings or numbers elsewhere.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """`error.code` values of a failed reply."""

    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHENTICATED = 4001
    TOKEN_EXPIRED = 4003
    HEARTBEAT_TIMEOUT = 4008
    SLOW_CONSUMER = 4009
    RATE_LIMIT_ABUSE = 4029
    ADMIN_DISCONNECT = 4030


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "server shutting down",
    CloseCode.UNSUPPORTED_DATA: "binary frames are not supported",
    CloseCode.POLICY_VIOLATION: "too many bad frames",
    CloseCode.MESSAGE_TOO_BIG: "message too large",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.UNAUTHENTICATED: "unauthenticated",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.RATE_LIMIT_ABUSE: "rate limit abuse",
    CloseCode.ADMIN_DISCONNECT: "disconnected by an administrator",
}
