"""The HTTP API's errors: one exception type, one JSON shape, one status table.

Every error response is `{"error": {"code", "message", ...extra}}` with the
status HTTP_API.md gives the code. Route code raises `ApiError`; FastAPI's
own failures (unknown route, wrong method, request validation) are turned
into the same shape here, so no response ever carries FastAPI's `detail`
format or a 422.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from apix_trio.protocol.codes import ErrorCode

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
"""HTTP status of each error code (HTTP_API.md, Conventions)."""


class ApiError(Exception):
    """An error answer: `code`, a human `message`, extra `error` fields and
    extra response headers (`Retry-After`)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS[code]
        self.headers = headers or {}
        self.extra = extra


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


def error_body(code: ErrorCode | str, message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": {"code": str(code), "message": message, **extra}})


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    return json_response(
        exc.status, error_body(exc.code, exc.message, **exc.extra), exc.headers or None
    )


def _describe(errors: list[Any]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _on_validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(ApiError(ErrorCode.BAD_REQUEST, _describe(list(exc.errors()))))


async def _on_http(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ApiError):  # FastAPI wraps errors raised reading the body
        return error_response(exc.__cause__)
    if exc.status_code == 404:
        error = ApiError(ErrorCode.NOT_FOUND, "no such route")
    elif exc.status_code == 405:
        error = ApiError(ErrorCode.BAD_REQUEST, "method not allowed on this route", status=405)
    elif exc.status_code == 400:  # e.g. a body that is not JSON
        error = ApiError(ErrorCode.BAD_REQUEST, str(exc.detail))
    else:
        code = next((c for c, s in STATUS.items() if s == exc.status_code), ErrorCode.INTERNAL)
        error = ApiError(code, str(exc.detail), status=exc.status_code)
    headers = dict(exc.headers or {})
    headers.update(error.headers)
    error.headers = headers
    return error_response(error)


async def _on_crash(_request: Request, _exc: Exception) -> Response:
    # The traceback is logged by the outer middleware, never sent.
    return json_response(500, error_body(ErrorCode.INTERNAL, "internal error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_crash)
