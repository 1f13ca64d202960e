"""`GET /api/docs`: Swagger UI for `/api/openapi.json`, working offline.

The page and its assets (JS, CSS, icon) are served by this server from the
`fastapi-offline` package's copy of Swagger UI (5.x, which renders OpenAPI
3.1); the page names no other host, and Swagger UI's online validator badge
is switched off (`validatorUrl: null`).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, Response

OPENAPI_URL = "/api/openapi.json"
DOCS_URL = "/api/docs"
ASSETS_URL = "/api/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
"""The static files the page loads, by name, with their media types."""

router = APIRouter(include_in_schema=False)
_cache: dict[str, bytes] = {}


def _asset(name: str) -> bytes:
    found = _cache.get(name)
    if found is None:
        found = (resources.files("fastapi_offline") / "static" / name).read_bytes()
        _cache[name] = found
    return found


@router.get(DOCS_URL)
async def docs_page() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL,
        title="apix-trio HTTP API",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False},
    )


@router.get(ASSETS_URL + "/{name}")
async def docs_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404)
    return Response(
        _asset(name), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )
