"""The browser side: the JavaScript client, the demo app, the operator
dashboard (`apix_trio/web`), and the development-only token endpoint the demo
uses. None of them is part of the OpenAPI document."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from apix_trio.http.deps import api_state
from apix_trio.http.errors import ApiError, json_response
from apix_trio.observability.logs import get_logger
from apix_trio.protocol.codes import ErrorCode
from apix_trio.web import pages as web_pages

router = APIRouter(include_in_schema=False)
log = get_logger("apix.http")
_OWN = {b"x-content-type-options", b"cache-control"}
"""Headers the API middleware sets on every response already."""


def _page_response(path: str) -> Response:
    page = web_pages.find_page(path)
    if page is None:
        raise ApiError(ErrorCode.NOT_FOUND, "not found")
    headers = {
        name.decode(): value.decode() for name, value in page.headers() if name not in _OWN
    }
    media_type = headers.pop("content-type")
    return Response(page.body(), media_type=media_type, headers=headers)


def _add_page(path: str) -> None:
    async def serve_page() -> Response:
        return _page_response(path)

    router.add_api_route(path, serve_page, methods=["GET"], name=f"page {path}")


for _path in (*web_pages.ROUTES, "/demo/", "/dashboard/"):
    _add_page(_path)


@router.post(web_pages.DEV_TOKEN_PATH)
async def dev_token(request: Request) -> Response:
    """A short-lived demo token; exists only while the server runs on the
    development key pair (404 otherwise). The token is never logged."""
    hub = api_state(request).hub
    if not hub.verifier.keys.dev_mode:
        raise ApiError(ErrorCode.NOT_FOUND, "not found")
    try:
        wanted = web_pages.parse_dev_token_request(await request.body())
    except web_pages.DevTokenError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, str(exc)) from None
    try:
        minted = web_pages.mint_dev_token(
            hub.settings.auth, hub.settings.server, wanted, now=hub.wall()
        )
    except (OSError, ValueError) as exc:
        log.error("dev_token_failed", exception=type(exc).__name__)
        raise ApiError(ErrorCode.INTERNAL, "cannot sign a development token") from None
    log.info("dev_token", org=minted["org"], sub=minted["sub"], roles=minted["roles"])
    return json_response(200, orjson.dumps(minted))
