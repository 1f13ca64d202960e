"""`POST /api/v1/groups/{channel}/{group}/redrive` and the dead-letter count of
`GET /api/v1/groups/{channel}/{group}`, on the embedded broker and on a
real redis-server: each dead letter is published once, under repetition and
under two concurrent redrives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from apix_trio.broker.groups import Delivery
from apix_trio.broker.model import Retention
from tests.httpkit import http_request
from tests.serverkit import Kit, running_server

ORG = "acme"
KEEP = Retention(history_size=1000, history_ttl=3600.0, dedupe_window=600.0)


@pytest.fixture(params=["memory", "redis"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    broker: dict[str, Any] = {}
    if request.param == "redis":
        broker = {"redis_url": request.getfixturevalue("redis_url")}
    async with running_server(tmp_path, broker=broker) as k:
        yield k


async def dead_letters(kit: Kit, channel: str, group: str, count: int) -> list[str]:
    """Dead letters for `group`: the ids of the dead letters (oldest first)."""
    broker = kit.hub.broker
    ids = []
    for i in range(count):
        data = orjson.dumps({"job": group, "n": i}).decode()
        published = await broker.publish(ORG, channel, data, sender="producer", key=None,
                                         retention=KEEP)  # fmt: skip
        dead = await broker.groups.dead_letter(
            ORG, channel, group, Delivery(published.event, 5), KEEP
        )
        ids.append(dead.id)
    return ids


async def post(kit: Kit, path: str, body: Any = None) -> Any:
    token = kit.token(ORG, "ops", roles=("admin",))
    if body is None:
        reply = await http_request(kit.running.http_port, "POST", path, token=token)
    else:
        reply = await http_request(kit.running.http_port, "POST", path, token=token, json=body)
    assert reply.status == 200, reply.body
    return reply.json()


async def redriven_events(kit: Kit, channel: str) -> list[dict[str, Any]]:
    token = kit.token(ORG, "ops", roles=("admin",))
    reply = await http_request(kit.running.http_port, "GET",
                               f"/api/v1/channels/{channel}/events?since=0&limit=1000",
                               token=token)  # fmt: skip
    return [e for e in reply.json()["events"] if (e.get("key") or "").startswith("redrive:")]


async def test_redrive_each_dead_letter_once(kit: Kit) -> None:
    letters = await dead_letters(kit, "jobs.a", "g1", 3)
    await dead_letters(kit, "jobs.a", "g2", 2)  # another group's: never redriven for g1
    token = kit.token(ORG, "ops", roles=("admin",))
    state = await http_request(kit.running.http_port, "GET", "/api/v1/groups/jobs.a/g1",
                               token=token)  # fmt: skip
    assert state.status == 200 and state.json()["dead_letters"] == 3
    path = "/api/v1/groups/jobs.a/g1/redrive"
    assert await post(kit, path, {"limit": 2}) == {"redriven": 2}
    assert await post(kit, path) == {"redriven": 1}
    assert await post(kit, path, {}) == {"redriven": 0}
    events = await redriven_events(kit, "jobs.a")
    assert [e["key"] for e in events] == [f"redrive:{i}" for i in letters]
    assert [e["data"] for e in events] == [{"job": "g1", "n": n} for n in range(3)]
    assert {e["from"] for e in events} == {"producer"}
    # new dead letters after the cursor are picked up next time
    later = await dead_letters(kit, "jobs.a", "g1", 1)
    assert await post(kit, path) == {"redriven": 1}
    assert [e["key"] for e in await redriven_events(kit, "jobs.a")][-1] == f"redrive:{later[0]}"


async def test_concurrent_redrives_publish_each_once(kit: Kit) -> None:
    letters = await dead_letters(kit, "jobs.c", "g1", 6)
    path = "/api/v1/groups/jobs.c/g1/redrive"
    counts: list[int] = []

    async def one(limit: int) -> None:
        counts.append((await post(kit, path, {"limit": limit}))["redriven"])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 6)
            nursery.start_soon(one, 4)
            nursery.start_soon(one, 6)
    assert sum(counts) == 6
    events = await redriven_events(kit, "jobs.c")
    assert sorted(e["key"] for e in events) == sorted(f"redrive:{i}" for i in letters)
    assert await post(kit, path) == {"redriven": 0}


async def test_redrive_errors(kit: Kit) -> None:
    token = kit.token(ORG, "ops", roles=("admin",))
    port = kit.running.http_port
    for body in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, [1]):
        reply = await http_request(port, "POST", "/api/v1/groups/jobs.a/g1/redrive", token=token,
                                   json=body)  # fmt: skip
        assert reply.status == 400 and reply.error["code"] == "bad_request"
    bad = await http_request(port, "POST", "/api/v1/groups/jobs..a/g1/redrive", token=token)
    assert bad.status == 400
    other = kit.token("globex", "ops", roles=("admin",))
    await dead_letters(kit, "jobs.o", "g1", 1)
    theirs = await http_request(port, "POST", "/api/v1/groups/jobs.o/g1/redrive", token=other)
    assert theirs.json() == {"redriven": 0}  # acme's dead letters are not globex's
