"""Group delivery on a MockClock: retry schedule, dead letters, credit, hand-over, ops.

Embedded broker, memory-stream WebSocket clients (tests/memws.py), virtual
time with autojump: every redelivery happens at an exact virtual time, which
the tests compute from a seeded `hub.rng` (the same draws `retry_delay`
makes) and check against the jitter bounds.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from apix_trio.broker.model import Retention
from apix_trio.delivery.backoff import retry_delay_bounds
from apix_trio.settings import ChannelOptions, Namespace
from tests.memws import MemClient, MemHub, memory_hub

QUIET = {"heartbeat": {"interval": 1e6}}
RETENTION = Retention(history_size=1000, history_ttl=3600.0)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Halfway(random.Random):
    """Every draw is 0.5: each retry delay is half its ceiling."""

    def random(self) -> float:
        return 0.5


def no_early_retries(mem: MemHub) -> None:
    """With `retry_base` and `retry_max` 1000, no redelivery comes within 500 s."""
    mem.hub.rng = Halfway()


class Member:
    """A client that keeps the pushes it sees while waiting for replies."""

    def __init__(self, client: MemClient) -> None:
        self.client = client
        self.pushes: list[tuple[float, dict[str, Any]]] = []
        self.conn_id = ""
        self._id = 0

    @classmethod
    async def open(cls, mem: MemHub, sub: str = "alice", **claims: Any) -> Member:
        member = cls(await mem.connect())
        reply = await member.call("auth", token=mem.token(sub=sub, ttl=10**6, **claims))
        assert reply["ok"], reply
        member.conn_id = reply["result"]["conn"]
        return member

    @property
    def consumer(self) -> str:
        return f"test-node:{self.conn_id}"

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._id += 1
        await self.client.send({"op": op, "id": self._id, **fields})
        while True:
            frame = await self.client.recv()
            assert frame is not None, f"closed with {self.client.close_code}"
            if frame.get("id") == self._id:
                return frame
            self.pushes.append((trio.current_time(), frame))

    async def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = await self.call(op, **fields)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def push(self) -> tuple[float, dict[str, Any]]:
        """The next push and the virtual time it arrived."""
        if self.pushes:
            return self.pushes.pop(0)
        frame = await self.client.recv()
        assert frame is not None and "push" in frame, frame
        return trio.current_time(), frame

    async def close(self) -> None:
        await self.client.stream.aclose()


async def publish(mem: MemHub, channel: str, n: int, org: str = "acme") -> list[str]:
    out = []
    for i in range(n):
        published = await mem.hub.broker.publish(
            org, channel, f'{{"n":{i}}}', sender="pub", key=None, retention=RETENTION
        )
        out.append(published.event.id)
    return out


async def test_retry_schedule_is_full_jitter_backoff_then_dead_letter(tmp_path, autojump_clock):
    seed = 20261125
    delivery = {"retry_base": 1.0, "retry_factor": 2.0, "retry_max": 3.0, "max_attempts": 5}
    async with memory_hub(tmp_path, delivery=delivery, **QUIET) as mem:
        mem.hub.rng = random.Random(seed)
        member = await Member.open(mem)  # its heartbeat draws first
        await member.ok("subscribe", channel="jobs.dlq")
        result = await member.ok("subscribe", channel="jobs", group="w")
        assert result == {"channel": "jobs", "position": "0-0", "recovered": True, "replayed": 0}
        [event_id] = await publish(mem, "jobs", 1)

        reference = random.Random(seed)
        reference.random()  # the heartbeat's draw
        times = []
        for attempt in range(1, 6):
            at, push = await member.push()
            assert push["push"] == "event" and push["channel"] == "jobs"
            assert (push["group"], push["attempt"]) == ("w", attempt)
            assert push["event"]["id"] == event_id and push["event"]["data"] == {"n": 0}
            times.append(at)
        at, letter = await member.push()
        times.append(at)

        for attempt in range(1, 6):
            _, ceiling = retry_delay_bounds(attempt, base=1.0, factor=2.0, cap=3.0)
            assert ceiling == [1.0, 2.0, 3.0, 3.0, 3.0][attempt - 1]
            gap = times[attempt] - times[attempt - 1]
            assert 0.0 <= gap < ceiling
            assert gap == pytest.approx(ceiling * reference.random(), abs=1e-9)

        assert letter["channel"] == "jobs.dlq" and "group" not in letter
        assert letter["event"]["key"] == f"dlq:w:{event_id}"
        assert letter["event"]["data"] == {
            "event": {"id": event_id, "ts": int(event_id.split("-")[0]), "data": {"n": 0},
                      "from": "pub"},
            "group": "w",
            "attempts": 5,
        }  # fmt: skip
        assert await mem.hub.broker.groups.pending("acme", "jobs", "w") == []
        sample = mem.hub.metrics.registry.get_sample_value
        assert sample("apix_group_dead_letters_total") == 1
        assert sample("apix_group_redeliveries_total") == 4
        assert sample("apix_group_pending") == 0
        assert mem.hub.groups.statistics().in_flight == 0
        # acking a dead-lettered event counts nothing
        assert await member.ok("ack", channel="jobs", group="w", ids=[event_id]) == {"acked": 0}


async def test_ack_stops_retries_and_counts_what_was_pending(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, **QUIET) as mem:
        no_early_retries(mem)  # attempt 2 after 0.5 s
        member = await Member.open(mem)
        await member.ok("subscribe", channel="jobs", group="w")
        ids = await publish(mem, "jobs", 2)
        got = [(await member.push())[1]["event"]["id"] for _ in ids]
        assert got == ids
        acked = await member.ok("ack", channel="jobs", group="w", ids=[ids[0], ids[0], "1-1"])
        assert acked == {"acked": 1}
        assert await member.ok("ack", channel="jobs", group="w", ids=[ids[0]]) == {"acked": 0}
        # only the unacked one comes back
        _, again = await member.push()
        assert (again["event"]["id"], again["attempt"]) == (ids[1], 2)
        assert await member.ok("ack", channel="jobs", group="w", ids=[ids[1]]) == {"acked": 1}
        with trio.move_on_after(3600):
            await member.push()
            raise AssertionError("nothing is pending: nothing may come")
        assert mem.hub.groups.statistics().in_flight == 0


async def test_prefetch_credit_and_round_robin(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path, delivery={"group_prefetch": 2, "retry_base": 1000.0, "retry_max": 1000.0}, **QUIET
    ) as mem:
        no_early_retries(mem)
        a = await Member.open(mem, "a")
        b = await Member.open(mem, "b")
        await a.ok("subscribe", channel="jobs", group="w")
        await b.ok("subscribe", channel="jobs", group="w")
        ids = await publish(mem, "jobs", 6)
        got_a = [(await a.push())[1]["event"]["id"] for _ in range(2)]
        got_b = [(await b.push())[1]["event"]["id"] for _ in range(2)]
        assert sorted(got_a + got_b) == ids[:4]  # two each, no more
        assert mem.hub.groups.statistics().in_flight == 4
        with trio.move_on_after(100):
            await a.push()
            raise AssertionError("a has no credit left")
        await a.ok("ack", channel="jobs", group="w", ids=got_a)
        got = sorted([(await a.push())[1]["event"]["id"] for _ in range(2)])
        assert got == ids[4:]
        assert (await mem.hub.broker.groups.pending("acme", "jobs", "w"))[0].attempt == 1


async def test_a_member_that_leaves_hands_its_events_over_at_once(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path, delivery={"retry_base": 1000.0, "retry_max": 1000.0}, **QUIET
    ) as mem:
        no_early_retries(mem)
        a = await Member.open(mem, "a")
        b = await Member.open(mem, "b")
        await a.ok("subscribe", channel="jobs", group="w")
        ids = await publish(mem, "jobs", 3)
        assert [(await a.push())[1]["event"]["id"] for _ in ids] == ids
        await b.ok("subscribe", channel="jobs", group="w")
        left_at = trio.current_time()
        await a.ok("unsubscribe", channel="jobs", group="w")
        pushes = [await b.push() for _ in ids]
        assert [p["event"]["id"] for _, p in pushes] == ids
        assert all(p["attempt"] == 2 for _, p in pushes)
        assert all(at == left_at for at, _ in pushes)  # no timer involved
        # a disconnect does the same
        c = await Member.open(mem, "c")
        await c.ok("subscribe", channel="jobs", group="w")
        closed_at = trio.current_time()
        await b.close()
        pushes = [await c.push() for _ in ids]
        assert [(p["event"]["id"], p["attempt"]) for _, p in pushes] == [(i, 3) for i in ids]
        assert all(at == closed_at for at, _ in pushes)
        pending = await mem.hub.broker.groups.pending("acme", "jobs", "w")
        assert {p.consumer for p in pending} == {c.consumer}


async def test_claimed_past_max_attempts_goes_to_the_dead_letter_channel(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path, delivery={"retry_base": 1000.0, "retry_max": 1000.0, "max_attempts": 2}, **QUIET
    ) as mem:
        no_early_retries(mem)
        watcher = await Member.open(mem, "w")
        await watcher.ok("subscribe", channel="jobs.dlq")
        a = await Member.open(mem, "a")
        await a.ok("subscribe", channel="jobs", group="w")
        [event_id] = await publish(mem, "jobs", 1)
        assert (await a.push())[1]["attempt"] == 1
        b = await Member.open(mem, "b")
        await b.ok("subscribe", channel="jobs", group="w")
        await a.close()
        assert (await b.push())[1]["attempt"] == 2
        c = await Member.open(mem, "c")
        await c.ok("subscribe", channel="jobs", group="w")
        await b.close()
        _, letter = await watcher.push()
        assert letter["event"]["data"]["attempts"] == 2
        assert letter["event"]["data"]["event"]["id"] == event_id
        assert await mem.hub.broker.groups.pending("acme", "jobs", "w") == []


async def test_group_ops_errors(tmp_path, autojump_clock):
    namespaces = (Namespace("nohist.>", ChannelOptions(history_size=0)),)
    async with memory_hub(
        tmp_path, namespaces=namespaces, limits={"max_subscriptions": 3}, **QUIET
    ) as mem:
        m = await Member.open(mem, sub_patterns=("jobs.>", "nohist.>", "a.b.c.d.e.f.g.h"))

        async def error(op: str, **fields: Any) -> str:
            reply = await m.call(op, **fields)
            assert not reply["ok"], reply
            return str(reply["error"]["code"])

        assert await error("subscribe", channel="jobs.x", group="w", since="0") == "bad_request"
        assert await error("subscribe", channel="other", group="w") == "forbidden"
        assert await error("subscribe", channel="nohist.x", group="w") == "bad_request"
        assert await error("subscribe", channel="a.b.c.d.e.f.g.h", group="w") == "bad_request"
        assert await error("ack", channel="jobs.x", group="w", ids=["1-1"]) == "not_found"
        assert await error("ack", channel="jobs.x", group="bad group", ids=["1-1"]) == (
            "bad_request"
        )
        first = await m.ok("subscribe", channel="jobs.x", group="w")
        assert await m.ok("subscribe", channel="jobs.x", group="w") == first  # no-op
        await m.ok("subscribe", channel="jobs.x", group="v")  # another group
        await m.ok("subscribe", channel="jobs.x")  # and a plain subscription
        assert await error("subscribe", channel="jobs.y", group="w") == "limit_exceeded"
        assert await m.ok("ack", channel="jobs.x", group="w", ids=["1-1"]) == {"acked": 0}
        assert await m.ok("unsubscribe", channel="jobs.x", group="w") == {}
        assert await m.ok("unsubscribe", channel="jobs.x", group="w") == {}
        assert await error("ack", channel="jobs.x", group="w", ids=["1-1"]) == "not_found"
        assert mem.hub.groups.statistics().members == 1


async def test_a_plain_and_a_group_subscription_on_one_channel_both_deliver(
    tmp_path, autojump_clock
):
    async with memory_hub(tmp_path, **QUIET) as mem:
        no_early_retries(mem)
        m = await Member.open(mem)
        await m.ok("subscribe", channel="jobs")
        await m.ok("subscribe", channel="jobs", group="w")
        [event_id] = await publish(mem, "jobs", 1)
        pushes = [(await m.push())[1] for _ in range(2)]
        assert sorted(("group" in p, p["event"]["id"]) for p in pushes) == [
            (False, event_id),
            (True, event_id),
        ]
