"""`apix-trio audit`: the trail as JSON lines, from Redis directly or over HTTP.

The Redis path runs the real command (`python -m apix_trio audit`) against a
real redis-server holding entries the test wrote with the broker's store.
The HTTP path's client is checked against a tiny ASGI app served by
hypercorn on trio in the test (the real `GET /api/v1/audit` route is wired
by the HTTP layer).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from apix_trio.broker.audit import AuditQuery, AuditRetention
from apix_trio.cli import main
from apix_trio.clients.audit import AuditReadError, audit_url, open_http_pages, print_trail
from apix_trio.observability.audit import AuditRecord
from apix_trio.settings import BrokerSettings, Settings
from tests.conftest import RedisServer

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
KEEP = AuditRetention()


def rec(n: int, type: str = "auth.ok", sub: str = "alice") -> AuditRecord:
    return AuditRecord(
        org="acme", ts=n, type=type, sub=sub, conn=f"c{n}", node="n1", detail={"n": n}
    )


async def write_entries(url: str, prefix: str, records: list[AuditRecord]) -> list[str]:
    from apix_trio.broker.redis.events import open_redis_broker

    settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix))
    async with open_redis_broker(settings) as broker:
        return await broker.audit.append_many(records, KEEP)


def cli_env(prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    env["APIX_BROKER_KEY_PREFIX"] = prefix
    env["PYTHONPATH"] = str(REPO)
    return env


async def run_cli(prefix: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "apix_trio", "audit", *args],
        env=cli_env(prefix),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def lines(out: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line]


async def test_reads_redis_directly_with_filters_and_paging(redis_server: RedisServer) -> None:
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    stored = await write_entries(
        redis_server.url,
        prefix,
        [rec(0), rec(1, "auth.failed", "bob"), rec(2), rec(3, "auth.failed", "eve"), rec(4)],
    )
    url = redis_server.url
    with trio.fail_after(30):
        done = await run_cli(prefix, "--org", "acme", "--redis-url", url)
        assert done.returncode == 0, done.stderr
        entries = lines(done.stdout)
        assert [e["detail"]["n"] for e in entries] == [0, 1, 2, 3, 4]
        assert entries[1] == rec(1, "auth.failed", "bob").as_entry(stored[1])

        done = await run_cli(prefix, "--org", "acme", "--redis-url", url, "--type", "auth.failed")
        assert [e["sub"] for e in lines(done.stdout)] == ["bob", "eve"]
        done = await run_cli(
            prefix, "--org", "acme", "--redis-url", url, "--since", stored[1], "--limit", "2"
        )
        assert [e["detail"]["n"] for e in lines(done.stdout)] == [2, 3]
        done = await run_cli(prefix, "--org", "globex", "--redis-url", url)
        assert done.returncode == 0 and done.stdout == b""


async def test_follow_prints_new_entries_as_they_come(redis_server: RedisServer) -> None:
    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    await write_entries(redis_server.url, prefix, [rec(0)])
    command = [sys.executable, "-m", "apix_trio", "audit", "--org", "acme", "--follow"]
    command += ["--interval", "0.1", "--redis-url", redis_server.url]
    got: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    env=cli_env(prefix),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            buffer = b""

            async def read_until(count: int) -> None:
                nonlocal buffer
                while len(got) < count:
                    chunk = await process.stdout.receive_some(65536)
                    assert chunk, "the command ended"
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    got.extend(orjson.loads(line) for line in complete if line)

            await read_until(1)
            await write_entries(redis_server.url, prefix, [rec(1), rec(2)])
            await read_until(3)
            process.terminate()
    assert [e["detail"]["n"] for e in got] == [0, 1, 2]


def test_usage_errors_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("APIX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(["audit"]) == 2  # no org
    assert main(["audit", "--org", "Bad Org"]) == 2
    assert main(["audit", "--org", "acme"]) == 2  # no Redis configured
    assert main(["audit", "--org", "acme", "--limit", "0", "--redis-url", "redis://x"]) == 2
    assert main(["audit", "--url", "http://127.0.0.1:1"]) == 2  # no token


# -- the HTTP client, against a tiny ASGI app ------------------------------------------


@asynccontextmanager
async def fake_api(
    pages: list[dict[str, Any]], seen: list[tuple[str, str, str]]
) -> AsyncIterator[str]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers = dict(scope["headers"])
        seen.append(
            (scope["path"], scope["query_string"].decode(), headers[b"authorization"].decode())
        )
        if headers[b"authorization"] != b"Bearer good":
            status, body = (
                403,
                {"error": {"code": "forbidden", "message": "the admin role is required"}},
            )
        else:
            status, body = 200, pages.pop(0) if pages else {"entries": [], "position": "9-0"}
        payload = orjson.dumps(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(hypercorn_serve, app, config, mode="asgi"))
        yield binds[0]
        nursery.cancel_scope.cancel()


async def test_http_client_pages_and_follows_through_the_api() -> None:
    first = {
        "entries": [{"id": "1-0", "type": "auth.ok"}, {"id": "2-0", "type": "auth.ok"}],
        "position": "2-0",
    }
    second = {"entries": [{"id": "3-0", "type": "rate.limited"}], "position": "3-0"}
    seen: list[tuple[str, str, str]] = []
    printed: list[str] = []
    with trio.fail_after(20):
        async with fake_api([first, second], seen) as base:
            async with open_http_pages(base, "good") as page:
                with trio.move_on_after(1.0):
                    await print_trail(
                        page, AuditQuery(since="0-0", limit=5, type="auth.*"),
                        emit=printed.append, follow=True, interval=0.05,
                    )  # fmt: skip
            async with open_http_pages(base, "bad") as page:
                with pytest.raises(AuditReadError, match="HTTP 403"):
                    await print_trail(page, AuditQuery(), emit=printed.append)
    assert [orjson.loads(line)["id"] for line in printed] == ["1-0", "2-0", "3-0"]
    assert seen[0] == ("/api/v1/audit", "since=0-0&limit=5&type=auth.%2A", "Bearer good")
    assert seen[1][1] == "since=2-0&limit=5&type=auth.%2A"
    assert seen[2][1] == "since=3-0&limit=5&type=auth.%2A"


def test_audit_url_leaves_out_absent_parameters() -> None:
    assert audit_url("http://h:1/", AuditQuery()) == "http://h:1/api/v1/audit?limit=100"
    url = audit_url("http://h:1", AuditQuery(since="5-0", limit=3, sub="a b"))
    assert url == "http://h:1/api/v1/audit?since=5-0&limit=3&sub=a+b"
