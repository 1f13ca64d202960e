"""The web pages' serving logic (apix_trio/web/pages.py) and its HTTP block:
which file for which path, content types and headers, the dev-only token
endpoint (minting, validation, 404 outside dev mode, never logged), and the
package data covering every static file."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import orjson
import pytest

from apix_trio.auth.devkeys import ensure_dev_keys, generate_keypair
from apix_trio.auth.keys import KeyStore, Verifier
from apix_trio.settings import AuthSettings, ServerSettings
from apix_trio.web import STATIC_DIR, pages
from tests.httpclient import http_request
from tests.procs import open_node
from tests.serverkit import running_server

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- routes


def test_every_route_serves_its_file_with_its_content_type() -> None:
    for path, (name, content_type) in pages.ROUTES.items():
        page = pages.find_page(path)
        assert page is not None, path
        assert page.file == STATIC_DIR / name
        assert page.content_type == content_type
        assert page.body() == (STATIC_DIR / name).read_bytes()
    assert pages.find_page("/client/apix.js").content_type.startswith("text/javascript")  # type: ignore[union-attr]
    assert pages.find_page("/demo").content_type.startswith("text/html")  # type: ignore[union-attr]


def test_every_static_file_is_routed() -> None:
    routed = {STATIC_DIR / name for name, _ in pages.ROUTES.values()}
    on_disk = {path for path in STATIC_DIR.rglob("*") if path.is_file()}
    assert on_disk - routed == set()


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/demo.html",
        "/web/demo.html",
        "/web/../web/demo.js",
        "/client/../pages.py",
        "/web/vendor/",
        "/web/%2e%2e/pages.py",
        "/client/apix.js/",
        "/DEMO",
        "/web/pages.py",
    ],
)
def test_other_paths_are_not_served(path: str) -> None:
    assert pages.find_page(path) is None


def test_a_trailing_slash_on_a_page_is_tolerated() -> None:
    assert pages.find_page("/demo/") == pages.find_page("/demo")
    assert pages.find_page("/dashboard/") == pages.find_page("/dashboard")


def test_html_pages_carry_a_same_origin_content_security_policy() -> None:
    demo = dict(pages.find_page("/demo").headers())  # type: ignore[union-attr]
    assert demo[b"x-content-type-options"] == b"nosniff"
    policy = demo[b"content-security-policy"].decode()
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    script = dict(pages.find_page("/web/demo.js").headers())  # type: ignore[union-attr]
    assert b"content-security-policy" not in script


def test_pages_reference_only_served_local_assets() -> None:
    """Every src/href/import in the pages names a served path (nothing from a CDN)."""
    for name in ("demo.html", "dashboard.html", "demo.js", "dashboard.js", "devtoken.js"):
        text = (STATIC_DIR / name).read_text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"|from "([^"]+)"', text):
            target = ref[0] or ref[1]
            if target.startswith("data:"):
                continue
            assert target.startswith("/"), (name, target)
            assert pages.find_page(target) is not None, (name, target)
        assert "http://" not in text and "https://" not in text, name


def test_package_data_covers_every_static_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["apix_trio.web"]
    package = STATIC_DIR.parent
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(package).as_posix()
            assert any(
                fnmatch.fnmatch(relative, glob) and relative.count("/") == glob.count("/")
                for glob in globs
            ), relative


def test_the_vendored_chart_library_keeps_its_license() -> None:
    license_text = (STATIC_DIR / "vendor" / "uPlot.LICENSE").read_text()
    assert "MIT License" in license_text and "Leon Sorokin" in license_text


# ---------------------------------------------------------------- dev tokens


def test_parse_dev_token_request() -> None:
    assert pages.parse_dev_token_request(b"") == pages.DevTokenRequest()
    assert pages.parse_dev_token_request(b"{}") == pages.DevTokenRequest()
    assert pages.parse_dev_token_request(
        b'{"sub": "ada-1", "name": " Ada ", "role": "admin"}'
    ) == pages.DevTokenRequest(sub="ada-1", name="Ada", admin=True)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1]",
        b'{"sub": ""}',
        b'{"sub": "has space"}',
        b'{"sub": 7}',
        b'{"sub": "' + b"x" * 65 + b'"}',
        b'{"name": ""}',
        b'{"name": "' + b"n" * 65 + b'"}',
        b'{"role": "root"}',
        b'{"org": "acme"}',
    ],
)
def test_bad_dev_token_requests_are_refused(body: bytes) -> None:
    with pytest.raises(pages.DevTokenError):
        pages.parse_dev_token_request(body)


def _dev_auth(tmp_path: Path, **changes: str) -> AuthSettings:
    auth = AuthSettings(dev_key_dir=str(tmp_path / "keys"), **changes)  # type: ignore[arg-type]
    ensure_dev_keys(auth.dev_key_dir)
    return auth


def test_a_minted_dev_token_verifies_with_the_demo_claims(tmp_path: Path) -> None:
    auth = _dev_auth(tmp_path)
    verifier = Verifier(auth, KeyStore(auth))
    minted = pages.mint_dev_token(
        auth, ServerSettings(), pages.DevTokenRequest(name="Ada"), now=1_800_000_000
    )
    identity = verifier.verify(minted["token"], now=1_800_000_000 + 10)
    assert identity.org == "demo" == minted["org"]
    assert identity.sub == minted["sub"] and minted["sub"].startswith("user-")
    assert identity.roles == ()
    assert identity.perms["pub"] == ("chat.demo",)
    assert identity.perms["sub"] == ("chat.demo",)
    assert identity.perms["state"] == ("demo.>",)
    assert identity.claims["info"] == {"name": "Ada"}
    assert minted["exp"] == 1_800_000_000 + pages.DEV_TOKEN_TTL == identity.exp
    assert minted["name"] == "Ada" and minted["roles"] == []
    assert minted["ws_port"] == 8080 and minted["ws_path"] == "/ws"


def test_an_admin_dev_token_with_issuer_and_audience(tmp_path: Path) -> None:
    auth = _dev_auth(tmp_path, issuer="https://issuer.test", audience="apix")
    verifier = Verifier(auth, KeyStore(auth))
    minted = pages.mint_dev_token(
        auth,
        ServerSettings(ws_port=0, ws_path="/rt"),
        pages.DevTokenRequest(sub="ops", admin=True),
    )
    identity = verifier.verify(minted["token"])
    assert (identity.sub, identity.roles, minted["roles"]) == ("ops", ("admin",), ["admin"])
    assert identity.claims["info"] == {"name": "ops"}
    assert "ws_port" not in minted and minted["ws_path"] == "/rt"


# ---------------------------------------------------------------- over HTTP


async def test_pages_over_http(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        port = kit.running.http_port
        for path, (name, content_type) in pages.ROUTES.items():
            answer = await http_request(port, "GET", path)
            assert answer.status == 200, path
            assert answer.headers["content-type"] == content_type
            assert answer.headers["content-length"] == str(len(answer.body))
            assert answer.body == (STATIC_DIR / name).read_bytes()
        demo = await http_request(port, "GET", "/demo")
        assert "script-src 'self'" in demo.headers["content-security-policy"]
        assert (await http_request(port, "GET", "/web/pages.py")).status == 404
        assert (await http_request(port, "POST", "/demo")).status == 405  # GET only
        assert (await http_request(port, "GET", "/dev/token")).status == 405  # POST only


async def test_dev_token_over_http(tmp_path: Path) -> None:
    async with running_server(tmp_path) as kit:
        port = kit.running.http_port
        answer = await http_request(
            port, "POST", "/dev/token", body=b'{"sub": "ada", "name": "Ada"}'
        )
        assert answer.status == 200
        assert answer.headers["cache-control"] == "no-store"
        minted = answer.json()
        identity = kit.hub.verifier.verify(minted["token"])
        assert (identity.org, identity.sub, identity.claims["info"]) == (
            "demo",
            "ada",
            {"name": "Ada"},
        )
        assert "ws_port" not in minted  # a free port (0): the pages take ?ws=
        empty = await http_request(port, "POST", "/dev/token")
        assert empty.status == 200 and empty.json()["sub"].startswith("user-")
        bad = await http_request(port, "POST", "/dev/token", body=b'{"role": "root"}')
        assert bad.status == 400
        assert "role" in orjson.dumps(bad.json()).decode()


async def test_no_dev_token_without_the_development_key_pair(tmp_path: Path) -> None:
    generate_keypair("rsa", tmp_path / "main.key", tmp_path / "main.pem")
    async with running_server(tmp_path, auth={"public_keys": (str(tmp_path / "main.pem"),)}) as kit:
        assert not kit.hub.verifier.keys.dev_mode
        answer = await http_request(kit.running.http_port, "POST", "/dev/token", body=b"{}")
        assert answer.status == 404
        assert b"eyJ" not in answer.body
        # the pages themselves are still served (they ask for a pasted token)
        assert (await http_request(kit.running.http_port, "GET", "/demo")).status == 200


async def test_a_minted_token_is_never_logged(tmp_path: Path) -> None:
    async with open_node(tmp_path / "keys") as node:
        answer = await http_request(node.http_port, "POST", "/dev/token", body=b'{"sub": "zed"}')
        assert answer.status == 200
        token = answer.json()["token"]
        line = await node.wait_log("dev_token")
        assert (line["org"], line["sub"], line["roles"]) == ("demo", "zed", [])
        text = b"\n".join(node.raw).decode()
        for part in token.split("."):
            assert part not in text
