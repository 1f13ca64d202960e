"""`limits.max_connections_per_org`: per org, across nodes, surviving a node crash."""

from __future__ import annotations

import pytest
import trio
from websockets.exceptions import InvalidStatus

from apix_trio.broker.leases import MemoryLeases
from apix_trio.broker.redis.events import open_redis_broker
from apix_trio.settings import BrokerSettings, Settings
from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)


async def test_cap_per_org_first_frame_and_header(tmp_path):
    async with running_server(tmp_path, limits={"max_connections_per_org": 2}) as kit:
        first = await RawClient.open(kit.url)
        assert (await first.call("auth", token=kit.token("acme", "a")))["ok"]
        second = await RawClient.open(
            kit.url, additional_headers={"Authorization": f"Bearer {kit.token('acme', 'b')}"}
        )
        assert (await second.next_push("connected"))["org"] == "acme"
        third = await RawClient.open(kit.url)
        reply = await third.call("auth", token=kit.token("acme", "c"))
        assert reply["error"]["code"] == "limit_exceeded"
        with pytest.raises(InvalidStatus) as info:
            await RawClient.open(
                kit.url, additional_headers={"Authorization": f"Bearer {kit.token('acme', 'd')}"}
            )
        assert info.value.response.status_code == 429
        # Another org is not affected.
        other = await RawClient.open(kit.url)
        assert (await other.call("auth", token=kit.token("globex", "x")))["ok"]
        # A slot comes back when a connection closes.
        await first.close()
        # The slot is released by the server's keeper task: retry as a client would.
        with trio.fail_after(10):
            while True:
                reply = await third.call("auth", token=kit.token("acme", "c"))
                if reply["ok"]:
                    break
                assert reply["error"]["code"] == "limit_exceeded"
                await trio.sleep(0.05)
        for client in (second, third, other):
            await client.close()


async def test_memory_leases_expire():
    now = [0.0]
    leases = MemoryLeases(lambda: now[0])
    assert await leases.acquire("acme", "n1:a", 2, ttl=30)
    assert await leases.acquire("acme", "n1:b", 2, ttl=30)
    assert not await leases.acquire("acme", "n2:c", 2, ttl=30)
    now[0] = 20.0
    await leases.refresh("acme", ["n1:a"], ttl=30)
    now[0] = 31.0  # n1:b was never refreshed: its node died
    assert await leases.count("acme") == 1
    assert await leases.acquire("acme", "n2:c", 2, ttl=30)
    await leases.release("acme", ["n1:a", "n2:c"])
    assert await leases.count("acme") == 0


async def test_redis_leases_are_cluster_wide_and_expire(redis_url):
    settings = Settings(broker=BrokerSettings(redis_url=redis_url, key_prefix="leasetest"))
    with trio.fail_after(20):
        async with open_redis_broker(settings) as node_a, open_redis_broker(settings) as node_b:
            assert await node_a.leases.acquire("acme", "a:1", 2, ttl=30)
            assert await node_b.leases.acquire("acme", "b:1", 2, ttl=30)
            assert not await node_b.leases.acquire("acme", "b:2", 2, ttl=30)
            assert await node_b.leases.acquire("other", "b:2", 2, ttl=30)
            # Re-acquiring a held lease is not a second slot.
            assert await node_a.leases.acquire("acme", "a:1", 2, ttl=30)
            assert await node_a.leases.count("acme") == 2
            await node_a.leases.release("acme", ["a:1"])
            assert await node_b.leases.acquire("acme", "b:2", 2, ttl=30)
            # A lease that is not refreshed (its node died) stops counting.
            assert await node_b.leases.acquire("expiring", "x:1", 1, ttl=0.2)
            while True:  # Redis' clock decides; poll it
                if await node_b.leases.count("expiring") == 0:
                    break
                await trio.sleep(0.05)
            assert await node_b.leases.acquire("expiring", "y:1", 1, ttl=30)
