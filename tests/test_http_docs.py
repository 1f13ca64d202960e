"""The OpenAPI 3.1 document and the offline docs page of the HTTP API."""

from __future__ import annotations

import re
from pathlib import Path

from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from apix_trio.http.ratelimit import OrgRateLimiter, retry_after_header
from tests.httpkit import http_request
from tests.serverkit import running_server

ROUTES = {
    ("get", "/api/v1/health"),
    ("get", "/api/v1/ready"),
    ("get", "/metrics"),
    ("post", "/api/v1/channels/{channel}/events"),
    ("get", "/api/v1/channels/{channel}/events"),
    ("post", "/api/v1/broadcast"),
    ("get", "/api/v1/channels"),
    ("post", "/api/v1/disconnect"),
    ("get", "/api/v1/connections"),
    ("get", "/api/v1/groups/{channel}/{group}"),
    ("post", "/api/v1/groups/{channel}/{group}/redrive"),
    ("post", "/api/v1/publish"),
    ("get", "/api/v1/channels/{channel}/presence"),
    ("get", "/api/v1/state/{key}"),
    ("put", "/api/v1/state/{key}"),
    ("patch", "/api/v1/state/{key}"),
    ("delete", "/api/v1/state/{key}"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/latency"),
}
"""Every route of HTTP_API.md, plus the older publish form."""


async def test_openapi_document_is_valid_3_1_and_complete(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        reply = await http_request(kit.running.http_port, "GET", "/api/openapi.json")
    assert reply.status == 200
    spec = reply.json()
    assert spec["openapi"].startswith("3.1")
    validate(spec, cls=OpenAPIV31SpecValidator)
    found = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert ROUTES <= found, ROUTES - found
    publish = spec["paths"]["/api/v1/channels/{channel}/events"]["post"]
    assert "400" in publish["responses"]
    operations = [op for ops in spec["paths"].values() for op in ops.values()]
    assert not [op for op in operations if "422" in op["responses"]]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert publish["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/api/v1/health"]["get"]


async def test_docs_page_loads_only_its_own_assets(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        port = kit.running.http_port
        page = await http_request(port, "GET", "/api/docs")
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        html = page.body.decode()
        assert "http://" not in html and "https://" not in html and "//" not in html.replace(
            "<!--", ""
        ).replace("-->", "")
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert len(assets) >= 3
        for asset in assets:
            assert asset.startswith("/api/docs/assets/"), asset
            reply = await http_request(port, "GET", asset)
            assert reply.status == 200 and len(reply.body) > 1000, asset
            assert reply.headers["x-content-type-options"] == "nosniff"
        assert "/api/openapi.json" in html and "validatorUrl" in html
        missing = await http_request(port, "GET", "/api/docs/assets/nope.js")
        assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"


def test_org_rate_limiter_buckets() -> None:
    limiter = OrgRateLimiter(10.0)
    assert [limiter.try_take("a", 0.0) for _ in range(20)] == [0.0] * 20  # burst 2 x rate
    assert limiter.try_take("a", 0.0) == 0.1
    assert limiter.try_take("b", 0.0) == 0.0
    assert limiter.try_take("a", 0.1) == 0.0
    assert retry_after_header(0.1) == "1" and retry_after_header(2.0) == "2"
    assert retry_after_header(2.01) == "3"


def test_org_rate_limiter_table_stays_bounded(monkeypatch: object) -> None:
    import apix_trio.http.ratelimit as ratelimit

    limiter = OrgRateLimiter(1.0)
    original = ratelimit.MAX_BUCKETS
    ratelimit.MAX_BUCKETS = 3
    try:
        for org in ("a", "b", "c"):
            limiter.try_take(org, 0.0)
        limiter.try_take("d", 10.0)  # a, b, c are full again: dropped
        assert len(limiter) == 1
    finally:
        ratelimit.MAX_BUCKETS = original
