"""The internal HTTP API (`server.http_port`): a FastAPI app on hypercorn's trio worker.

`make_app(hub)` builds it: the routers (one module per family of routes),
the error handlers (`errors`), and the middleware every response passes
through (`middleware`: request id, CORS, body limit, security headers,
access log, 500s). The OpenAPI 3.1 document is built from the route
definitions at `/api/openapi.json` and shown by `/api/docs` (`docs`).

Routes (docs/http-api.md has one curl example each):

- anyone: `GET /api/v1/health`, `GET /api/v1/ready`, `GET /metrics`,
  `GET /api/docs`, `GET /api/openapi.json`, `GET /api/v1/stats`;
- `perms.pub`: `POST /api/v1/channels/{channel}/events`, `POST /api/v1/broadcast`;
- `perms.sub`: `GET /api/v1/channels/{channel}/events`;
- admin: `GET /api/v1/channels`, `GET /api/v1/connections`,
  `POST /api/v1/disconnect`, `GET /api/v1/groups/{channel}/{group}`,
  `POST /api/v1/groups/{channel}/{group}/redrive`, `POST /api/v1/publish`.

Adding a route family: write a module with an `APIRouter`, use the
dependencies of `deps` (`caller`, `admin`) and `api_state(request).hub`,
raise `ApiError`, and pass the router to `make_app(..., extra_routers=...)`
or add it to `ROUTERS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI

from apix_trio.gateway.hub import Hub
from apix_trio.http import (
    docs,
    routes_admin,
    routes_events,
    routes_groups,
    routes_ops,
    routes_pages,
    routes_reports,
    routes_state,
)
from apix_trio.http.deps import BEARER, SECURITY_SCHEME, ApiState
from apix_trio.http.errors import ErrorBody, install_error_handlers
from apix_trio.http.middleware import ApiMiddleware, ASGIApp

ROUTERS: tuple[APIRouter, ...] = (
    routes_ops.router,
    routes_events.router,
    routes_admin.router,
    routes_groups.router,
    routes_state.router,
    routes_reports.router,
    routes_pages.router,
    docs.router,
)

REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}

DESCRIPTION = """\
The server API of apix-trio: publish, read and administer without a WebSocket.

Authenticate with `Authorization: Bearer <JWT>` (the tokens WebSocket clients
use). The token's `org` scopes everything. Errors are
`{"error": {"code", "message"}}` with the status of their code.
"""


def build_fastapi(hub: Hub, extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app alone (no middleware): for the OpenAPI document and tests."""
    app = FastAPI(
        title="apix-trio HTTP API",
        version="1",
        description=DESCRIPTION,
        openapi_url=docs.OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    app.state.api = ApiState(hub)
    install_error_handlers(app)
    for router in (*ROUTERS, *extra_routers):
        app.include_router(router)
    _finish_openapi(app)
    return app


def _finish_openapi(app: FastAPI) -> None:
    """Validation failures answer 400 (`errors`), so the document must not
    promise FastAPI's 422 and its `HTTPValidationError` body; routes that
    authenticate (they answer 401) declare the bearer scheme."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if "401" in responses:
                        operation["security"] = [{SECURITY_SCHEME: []}]
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {
                            "description": "Bad request",
                            "content": {"application/json": {"schema": ERROR_REF}},
                        }
            schemas = schema.get("components", {}).get("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template=REF))
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = BEARER
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def make_app(hub: Hub, extra_routers: Sequence[APIRouter] = ()) -> ASGIApp:
    """The ASGI app of the HTTP API for `hub` (served by `server._serve_http`)."""
    app = build_fastapi(hub, extra_routers)
    return ApiMiddleware(
        app,
        allowed_origins=hub.settings.server.allowed_origins,
        max_body_bytes=hub.settings.api.max_body_bytes,
    )
