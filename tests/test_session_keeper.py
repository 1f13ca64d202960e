"""The node's SessionKeeper on a MockClock: when records are written, and what.

An in-memory hub (`tests.memws`) with the keeper's task running; the store
is the memory store with a counter around it (a fake, not a mock), so the
tests can assert exactly which writes happened at which virtual time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from apix_trio.broker.memory.sessions import MemorySessionStore
from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.sessions import SessionRecord
from apix_trio.delivery.sessions import FLUSH_INTERVAL, SessionKeeper
from tests.memws import MemClient, MemHub, fake_wall, memory_hub

TTL = 60.0
SETTINGS: dict[str, Any] = {
    "sessions": {"ttl": TTL},
    "heartbeat": {"interval": 100_000.0},  # no pings to answer
    "limits": {"ops_per_second": 1e6},
}


class CountingStore(MemorySessionStore):
    """The memory store, remembering every write: (kind, time, records)."""

    def __init__(self) -> None:
        super().__init__(wall_clock=fake_wall)
        self.writes: list[tuple[str, float, list[SessionRecord]]] = []

    async def save(self, org: str, record: SessionRecord, ttl: float) -> bool:
        self.writes.append(("save", trio.current_time(), [record]))
        return await super().save(org, record, ttl)

    async def save_many(self, items: Sequence[tuple[str, SessionRecord]], ttl: float) -> int:
        self.writes.append(("save_many", trio.current_time(), [record for _, record in items]))
        return await super().save_many(items, ttl)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def settle_after(seconds: float) -> None:
    """Sleep `seconds`, then let every task due at that instant run."""
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def authed(mem: MemHub) -> tuple[MemClient, dict[str, Any]]:
    client = await mem.connect()
    reply = await client.call("auth", token=mem.token())
    assert reply["ok"], reply
    return client, reply["result"]


async def test_writes_on_subscribe_then_batched_never_per_event(tmp_path, autojump_clock):
    store = CountingStore()
    async with memory_hub(tmp_path, **SETTINGS) as mem:
        mem.hub.sessions = keeper = SessionKeeper(store, TTL)
        mem.nursery.start_soon(keeper.serve)
        alice, result = await authed(mem)
        other, _ = await authed(mem)
        start = trio.current_time()
        assert (await alice.call("subscribe", channel="chat.a"))["ok"]
        assert [kind for kind, _, _ in store.writes] == ["save"]  # before the reply

        last = ""
        for n in range(1000):
            reply = await other.call("publish", channel="chat.a", data=n)
            last = reply["result"]["id"]
        for _ in range(1000):
            await alice.recv()
        await settle_after(FLUSH_INTERVAL)
        # One batched write for both connections, whatever the event count.
        kinds = [(kind, len(records)) for kind, _, records in store.writes]
        assert kinds == [("save", 1), ("save_many", 2)]
        _, at, records = store.writes[-1]
        assert at == start + FLUSH_INTERVAL
        mine = next(r for r in records if r.session == result["session"])
        assert [(c.channel, c.position) for c in mine.channels] == [("chat.a", last)]

        # Unchanged records are written again only to push their expiry back.
        before = len(store.writes)
        await settle_after(TTL / 3 - FLUSH_INTERVAL)
        assert len(store.writes) == before
        await settle_after(FLUSH_INTERVAL)
        assert len(store.writes) == before + 1
        assert await store.load("acme", result["session"]) is not None


async def test_a_closed_connection_is_written_at_once(tmp_path, autojump_clock):
    store = CountingStore()
    async with memory_hub(tmp_path, **SETTINGS) as mem:
        mem.hub.sessions = keeper = SessionKeeper(store, TTL)
        mem.nursery.start_soon(keeper.serve)
        alice, result = await authed(mem)
        await trio.sleep(1)  # not a flush boundary
        closed_at = trio.current_time()
        await alice.stream.send_all(alice.ws.send(CloseConnection(code=1000)))
        while await alice.stream.receive_some(65536):
            pass
        await trio.testing.wait_all_tasks_blocked()
        kind, at, records = store.writes[-1]
        assert (kind, at) == ("save_many", closed_at)
        assert [r.session for r in records] == [result["session"]]
        assert keeper.statistics().live == 0
        assert keeper.statistics().pending_finals == 0


async def test_writes_that_fail_are_retried_by_the_next_flush(tmp_path, autojump_clock):
    class FlakyStore(CountingStore):
        down = True

        async def save_many(self, items: Sequence[tuple[str, SessionRecord]], ttl: float) -> int:
            if self.down:
                raise BrokerUnavailable("down")
            return await super().save_many(items, ttl)

        async def save(self, org: str, record: SessionRecord, ttl: float) -> bool:
            if self.down:
                raise BrokerUnavailable("down")
            return await super().save(org, record, ttl)

    store = FlakyStore()
    async with memory_hub(tmp_path, **SETTINGS) as mem:
        mem.hub.sessions = keeper = SessionKeeper(store, TTL)
        mem.nursery.start_soon(keeper.serve)
        alice, result = await authed(mem)
        # The subscribe succeeds although its record cannot be written.
        assert (await alice.call("subscribe", channel="chat.a"))["ok"]
        await settle_after(FLUSH_INTERVAL)
        assert await store.load("acme", result["session"]) is None
        assert keeper.statistics().failures == 2
        store.down = False
        await settle_after(FLUSH_INTERVAL)
        saved = await store.load("acme", result["session"])
        assert saved is not None and [c.channel for c in saved.channels] == ["chat.a"]
