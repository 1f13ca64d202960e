"""Readiness with the delivery canary, and audit writes while Redis is down.

- in memory on a MockClock: a canary that stops coming back (the broker's
  listener stalls, as a stuck bus reader would) turns `readiness()` false
  exactly `heartbeat.interval` after the last one came back, and true again
  with the next canary once events flow (every `RECOVER_PERIOD` while failing);
- against a real, SIGSTOPped redis-server: `GET /api/v1/ready` turns 503
  within `heartbeat.interval` and back to 200 after SIGCONT;
- an action while Redis is stopped succeeds or fails on its own merits, its
  audit entry is dropped (logged and counted) and nothing waits for it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from apix_trio.delivery.canary import CANARY_ORG, RECOVER_PERIOD, canary_channel
from tests.conftest import RedisServer
from tests.memws import memory_hub
from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)

POLL = 0.05


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def poll_until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll real-time state until `check()`; TooSlowError after `within` seconds."""
    with trio.fail_after(within):
        for _ in range(math.ceil(within / POLL) + 1):
            if await check():
                return
            await trio.sleep(POLL)
    raise trio.TooSlowError


def ready_is(port: int, status: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await http_get(port, "/api/v1/ready"))[0] == status

    return check


async def checked(value: bool) -> bool:
    await trio.lowlevel.checkpoint()
    return value


async def http_get(port: int, path: str) -> tuple[int, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    finally:
        await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def test_a_stalled_bus_turns_readiness_false_within_the_interval(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, heartbeat={"interval": 9.0}) as mem:
        hub = mem.hub
        assert hub.readiness() == (False, "delivery canary has not come back yet")
        await mem.nursery.start(hub.canary.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.readiness() == (True, "")
        assert hub.router.statistics().subscriptions == 0  # internal, not counted
        # canaries every interval / 3
        await trio.sleep(30)
        assert hub.canary.seen == 1 + 30 // 3
        assert hub.readiness() == (True, "")

        hub.broker.set_listener(lambda org, channel, event: None)  # the bus stalls
        stalled_at = trio.current_time()
        last_seen = hub.canary.last_seen
        assert last_seen is not None and stalled_at - last_seen < 3.0
        await trio.sleep_until(last_seen + 9.0)
        assert hub.readiness()[0] is True
        await trio.sleep(0.001)
        ready, reason = hub.readiness()
        assert not ready and "not seen for 9.0 s" in reason

        hub.broker.set_listener(hub.router.dispatch)  # events flow again
        await trio.sleep(3.0)  # the next canary, at most interval / 3 later
        assert hub.readiness() == (True, "")
        # while failing, canaries go every RECOVER_PERIOD
        hub.broker.set_listener(lambda org, channel, event: None)
        await trio.sleep(12.0)
        seen = hub.canary.seen
        hub.broker.set_listener(hub.router.dispatch)
        await trio.sleep(RECOVER_PERIOD)
        assert hub.canary.seen == seen + 1 and hub.readiness() == (True, "")
        hub.accepting = False
        assert hub.readiness() == (False, "shutting down")


async def test_the_canary_channel_is_outside_every_org(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, heartbeat={"interval": 9.0}) as mem:
        await mem.nursery.start(mem.hub.canary.serve)
        client = await mem.connect()
        assert (await client.call("auth", token=mem.token()))["ok"]
        reply = await client.call("subscribe", channel=canary_channel("test-node"))
        assert reply["error"]["code"] == "bad_request"  # `$` is no channel character
        assert CANARY_ORG.startswith("$")
        assert await mem.hub.broker.position(CANARY_ORG, canary_channel("test-node")) != "0-0"
        assert await mem.hub.broker.position("acme", canary_channel("test-node")) == "0-0"


async def test_ready_is_503_within_the_interval_while_redis_is_stopped(
    tmp_path, redis_server: RedisServer
):
    interval = 2.0
    async with running_server(
        tmp_path,
        broker={"redis_url": redis_server.url, "operation_timeout": 1.0},
        heartbeat={"interval": interval},
    ) as kit:
        port = kit.running.http_port
        await poll_until(ready_is(port, 200), 10)
        status, body = await http_get(port, "/api/v1/ready")
        assert (status, body["ready"], body["node"]) == (200, True, "test-node")

        redis_server.pause()
        try:
            stopped_at = trio.current_time()
            await poll_until(ready_is(port, 503), interval + 1.5)
            assert trio.current_time() - stopped_at <= interval + 0.5
            status, body = await http_get(port, "/api/v1/ready")
            assert status == 503 and body["ready"] is False and body["reason"]
        finally:
            redis_server.resume()
        await poll_until(ready_is(port, 200), 15)


async def test_actions_go_on_while_redis_is_stopped_and_the_drop_is_counted(
    tmp_path, redis_server: RedisServer
):
    async with running_server(
        tmp_path, broker={"redis_url": redis_server.url, "operation_timeout": 1.0}
    ) as kit:
        client = await RawClient.open(kit.url)
        try:
            assert (await client.call("auth", token=kit.token(sub="before")))["ok"]
            audit = kit.hub.audit
            await poll_until(lambda: checked(audit.statistics().written >= 1), 5)

            redis_server.pause()
            try:
                started = trio.current_time()
                late = await RawClient.open(kit.url)
                reply = await late.call("auth", token=kit.token(sub="during"))
                assert reply["ok"]  # authentication needs no Redis: it succeeds
                assert trio.current_time() - started < 1.0  # not held up by the audit write
                reply = await late.call("publish", channel="chat.x", data=1)
                assert reply["error"]["code"] == "unavailable"  # fails on its own merits
                await poll_until(lambda: checked(audit.statistics().dropped >= 1), 10)
                sample = kit.hub.metrics.registry.get_sample_value
                assert sample("apix_audit_dropped_total") >= 1
                await late.close()
            finally:
                redis_server.resume()
            assert (await client.call("ping"))["ok"]
        finally:
            await client.close()
