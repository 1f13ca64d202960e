"""The state contract (apix_trio/broker/state.py), on both brokers.

One suite, parametrised by `state_kind` over "memory" and "redis" (select a
side with `-k memory` or `-k redis`). The Redis side runs against a real
redis-server started by tests/conftest.py, with a fresh key prefix per test.

What it pins down: versions (0 while never set, +1 on every change, deletes
and no-op changes included, never reused), compare-and-set (concurrent sets
with the same expected version: exactly one wins, the others get `conflict`
with the winner's version), RFC 7396 merge patches (the RFC's own Appendix A
table, and a null value patched as `{}`), the size limit, the per-org key
limit and its counter (down on delete, up on set again), tenant isolation,
and the fan-out: each change reaches the listener once, as an event of
`$state.<key>`, in version order, and a refused change sends nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import orjson
import pytest
import trio

from apix_trio.broker.events import Broker
from apix_trio.broker.memory.events import open_memory_broker
from apix_trio.broker.state import (
    StateConflict,
    StateLimitExceeded,
    StateLimits,
    StateStore,
    StateTooLarge,
    StateValue,
)
from apix_trio.protocol.event import Event
from apix_trio.settings import BrokerSettings, Settings
from tests.brokers import FakeWallClock

pytestmark = pytest.mark.timeout(60)

DELIVERY_TIMEOUT = 5.0
LIMITS = StateLimits()

# RFC 7396, Appendix A: (original, patch, result).
RFC7396_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


def js(value: Any) -> str:
    return orjson.dumps(value).decode()


class Changes(list[tuple[str, str, Event]]):
    """What the broker's listener was handed; tests wait for more (Redis
    delivers through the bus, asynchronously)."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def listener(self, org: str, channel: str, event: Event) -> None:
        self.append((org, channel, event))
        self._grew.set()
        self._grew = trio.Event()

    def of(self, org: str, key: str) -> list[Event]:
        return [event for o, c, event in self if (o, c) == (org, f"$state.{key}")]

    async def wait_for(self, org: str, key: str, count: int) -> list[Event]:
        with trio.fail_after(DELIVERY_TIMEOUT):
            while len(self.of(org, key)) < count:
                await self._grew.wait()
        return self.of(org, key)


@attrs.define
class Subject:
    broker: Broker
    changes: Changes

    @property
    def store(self) -> StateStore:
        return self.broker.state

    async def set(self, org: str, key: str, value: Any, version: int | None = None) -> int:
        return await self.store.set(
            org, key, js(value), version=version, sender="alice", limits=LIMITS
        )

    async def patch(
        self,
        org: str,
        key: str,
        patch: Any,
        version: int | None = None,
        limits: StateLimits = LIMITS,
    ) -> int:
        return await self.store.patch(
            org, key, js(patch), version=version, sender="bob", limits=limits
        )

    async def value(self, org: str, key: str) -> tuple[Any, int]:
        current = await self.store.get(org, key)
        return orjson.loads(current.value), current.version


@pytest.fixture(params=["memory", "redis"])
def state_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def subject(state_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    changes = Changes()
    if state_kind == "memory":
        async with open_memory_broker(wall_clock=FakeWallClock()) as memory:
            memory.set_listener(changes.listener)
            yield Subject(memory, changes)
        return
    from apix_trio.broker.redis.events import open_redis_broker

    prefix = f"apixtest-{uuid.uuid4().hex[:12]}"
    url = request.getfixturevalue("redis_url")
    settings = Settings(broker=BrokerSettings(redis_url=url, key_prefix=prefix))
    async with open_redis_broker(settings) as redis_broker:
        redis_broker.set_listener(changes.listener)
        yield Subject(redis_broker, changes)


@pytest.fixture
def org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


# -- versions ----------------------------------------------------------------------


async def test_a_key_never_set_is_null_at_version_0(subject: Subject, org: str) -> None:
    assert await subject.store.get(org, "doc.1") == StateValue("null", 0)
    assert await subject.store.count(org) == 0


async def test_every_change_adds_one_even_when_the_value_stays_the_same(
    subject: Subject, org: str
) -> None:
    assert await subject.set(org, "doc.1", {"title": "a"}) == 1
    assert await subject.value(org, "doc.1") == ({"title": "a"}, 1)
    assert await subject.set(org, "doc.1", {"title": "a"}) == 2
    assert await subject.patch(org, "doc.1", {}) == 3
    assert await subject.patch(org, "doc.1", {"title": "a"}) == 4
    assert await subject.value(org, "doc.1") == ({"title": "a"}, 4)


async def test_the_value_is_stored_exactly(subject: Subject, org: str) -> None:
    value = {"n": 2**64 - 1, "x": 0.1, "big": 1.2345678901234567e300, "s": 'ü😀/"', "e": []}
    await subject.set(org, "doc.exact", value)
    current = await subject.store.get(org, "doc.exact")
    assert current.value == js(value)
    await subject.patch(org, "doc.exact", {"more": {}})
    assert orjson.loads((await subject.store.get(org, "doc.exact")).value) == {**value, "more": {}}


async def test_delete_sets_null_and_keeps_counting(subject: Subject, org: str) -> None:
    assert await subject.set(org, "doc.1", [1]) == 1
    assert await subject.store.delete(org, "doc.1", version=None, sender="alice") == 2
    assert await subject.value(org, "doc.1") == (None, 2)
    assert await subject.store.delete(org, "doc.1", version=None, sender="alice") == 3
    assert await subject.set(org, "doc.1", "back") == 4
    assert await subject.value(org, "doc.1") == ("back", 4)
    # A deleted key was set once: version 0 ("never set") no longer matches.
    await subject.store.delete(org, "doc.1", version=4, sender="alice")
    with pytest.raises(StateConflict) as info:
        await subject.set(org, "doc.1", "again", version=0)
    assert info.value.version == 5


async def test_a_delete_of_a_key_never_set_is_a_change(subject: Subject, org: str) -> None:
    assert await subject.store.delete(org, "doc.nothing", version=0, sender="alice") == 1
    assert await subject.value(org, "doc.nothing") == (None, 1)
    assert await subject.store.count(org) == 0


# -- compare-and-set -------------------------------------------------------------------


async def test_compare_and_set(subject: Subject, org: str) -> None:
    assert await subject.set(org, "cfg", {"v": 1}, version=0) == 1
    with pytest.raises(StateConflict) as info:
        await subject.set(org, "cfg", {"v": 2}, version=0)
    assert info.value.version == 1
    assert await subject.set(org, "cfg", {"v": 2}, version=1) == 2
    with pytest.raises(StateConflict) as info:
        await subject.patch(org, "cfg", {"w": 1}, version=1)
    assert info.value.version == 2
    with pytest.raises(StateConflict) as info:
        await subject.store.delete(org, "cfg", version=7, sender="alice")
    assert info.value.version == 2
    assert await subject.patch(org, "cfg", {"w": 1}, version=2) == 3
    assert await subject.store.delete(org, "cfg", version=3, sender="alice") == 4
    assert await subject.value(org, "cfg") == (None, 4)


async def test_concurrent_sets_with_one_version_exactly_one_wins(
    subject: Subject, org: str
) -> None:
    await subject.set(org, "race", 0)
    wins: list[int] = []
    conflicts: list[int] = []

    async def contender(n: int) -> None:
        try:
            wins.append(await subject.set(org, "race", {"by": n}, version=1))
        except StateConflict as exc:
            conflicts.append(exc.version)

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(contender, n)
    assert wins == [2]
    assert conflicts == [2] * 49
    value, version = await subject.value(org, "race")
    assert version == 2 and set(value) == {"by"}


async def test_concurrent_patches_without_version_all_apply_in_one_order(
    subject: Subject, org: str
) -> None:
    versions: list[int] = []

    async def patcher(n: int) -> None:
        versions.append(await subject.patch(org, "doc.shared", {f"f{n}": n}))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(patcher, n)
    assert sorted(versions) == list(range(1, 41))
    assert await subject.value(org, "doc.shared") == ({f"f{n}": n for n in range(40)}, 40)


# -- merge patch ---------------------------------------------------------------------


@pytest.mark.parametrize(("original", "patch", "result"), RFC7396_EXAMPLES)
async def test_rfc7396_appendix_a(
    subject: Subject, org: str, original: Any, patch: Any, result: Any
) -> None:
    await subject.set(org, "doc.rfc", original)
    assert await subject.patch(org, "doc.rfc", patch) == 2
    assert await subject.value(org, "doc.rfc") == (result, 2)


async def test_a_patch_of_null_applies_to_an_empty_object(subject: Subject, org: str) -> None:
    assert await subject.patch(org, "doc.new", {"a": {"b": 1}, "c": None}) == 1
    assert await subject.value(org, "doc.new") == ({"a": {"b": 1}}, 1)
    await subject.store.delete(org, "doc.new", version=None, sender="alice")
    assert await subject.patch(org, "doc.new", {"x": None}) == 3
    assert await subject.value(org, "doc.new") == ({}, 3)


# -- limits --------------------------------------------------------------------------


async def test_a_value_over_max_value_bytes_is_too_large(subject: Subject, org: str) -> None:
    limits = StateLimits(max_value_bytes=20)
    fits = js("x" * 18)  # 20 bytes with its quotes
    assert await subject.store.set(org, "k", fits, version=None, sender="a", limits=limits) == 1
    with pytest.raises(StateTooLarge):
        await subject.store.set(org, "k", js("x" * 19), version=None, sender="a", limits=limits)
    await subject.store.set(org, "k", js({"a": "x" * 10}), version=None, sender="a", limits=limits)
    with pytest.raises(StateTooLarge) as info:
        await subject.patch(org, "k", {"b": "y"}, limits=limits)
    assert (info.value.size, info.value.limit) == (len(js({"a": "x" * 10, "b": "y"})), 20)
    assert await subject.value(org, "k") == ({"a": "x" * 10}, 2)  # nothing changed
    assert await subject.patch(org, "k", {"a": None}, limits=limits) == 3  # shrinking is fine


async def test_max_keys_per_org_counts_keys_with_a_value(subject: Subject, org: str) -> None:
    limits = StateLimits(max_keys_per_org=3)

    async def put(key: str, value: Any, version: int | None = None) -> int:
        return await subject.store.set(
            org, key, js(value), version=version, sender="a", limits=limits
        )

    for key in ("a", "b", "c"):
        await put(key, 1)
    assert await subject.store.count(org) == 3
    with pytest.raises(StateLimitExceeded):
        await put("d", 1)
    with pytest.raises(StateLimitExceeded):
        await subject.patch(org, "d", {"x": 1}, limits=limits)
    assert await subject.store.get(org, "d") == StateValue("null", 0)  # no version used
    assert await put("a", 2) == 2  # a key that has a value may change
    assert await put("e", None) == 1  # null is no value: not counted
    await subject.store.delete(org, "b", version=None, sender="a")
    assert await subject.store.count(org) == 2
    assert await put("d", 1) == 1
    assert await subject.store.count(org) == 3
    with pytest.raises(StateLimitExceeded):
        await put("b", 1)  # set again after its delete: counts again
    assert await put("c", None) == 2  # set to null gives the slot back
    assert await put("b", 1) == 3
    assert await subject.store.count(org) == 3
    await subject.patch(org, "b", None, limits=limits)  # a null patch replaces with null
    assert await subject.store.count(org) == 2


async def test_orgs_are_unrelated(subject: Subject, org: str) -> None:
    other = f"o{uuid.uuid4().hex[:10]}"
    limits = StateLimits(max_keys_per_org=1)
    await subject.store.set(org, "doc.1", js("mine"), version=None, sender="a", limits=limits)
    assert await subject.store.get(other, "doc.1") == StateValue("null", 0)
    assert (
        await subject.store.set(other, "doc.1", js("theirs"), version=0, sender="b", limits=limits)
        == 1
    )
    assert await subject.value(org, "doc.1") == ("mine", 1)
    assert (await subject.store.count(org), await subject.store.count(other)) == (1, 1)


async def test_keys_with_odd_characters_are_their_own(subject: Subject, org: str) -> None:
    keys = ["doc.a:b", "doc.a-b", "doc.a_b", "doc.a@b", "doc.a.b", "DOC.a"]
    for n, key in enumerate(keys):
        await subject.set(org, key, n)
    for n, key in enumerate(keys):
        assert await subject.value(org, key) == (n, 1)


# -- fan-out -----------------------------------------------------------------------


async def test_changes_fan_out_in_version_order(subject: Subject, org: str) -> None:
    await subject.set(org, "doc.f", {"a": 1})
    await subject.patch(org, "doc.f", {"b": 2})
    with pytest.raises(StateConflict):
        await subject.set(org, "doc.f", 0, version=9)  # refused: nothing goes out
    with pytest.raises(StateTooLarge):
        await subject.store.set(
            org, "doc.f", js("x" * 100), version=None, sender="a", limits=StateLimits(10)
        )
    await subject.store.delete(org, "doc.f", version=None, sender="carol")
    events = await subject.changes.wait_for(org, "doc.f", 3)
    assert [(e.id, e.sender, orjson.loads(e.data)) for e in events] == [
        ("1-0", "alice", {"value": {"a": 1}}),
        ("2-0", "bob", {"patch": {"b": 2}}),
        ("3-0", "carol", {"value": None}),
    ]
    assert all(event.ts > 0 for event in events)
    await subject.set(org, "doc.f", "last")
    assert len(await subject.changes.wait_for(org, "doc.f", 4)) == 4  # nothing else came


async def test_many_concurrent_changes_fan_out_once_each_in_order(
    subject: Subject, org: str
) -> None:
    async def setter(n: int) -> None:
        await subject.set(org, "hot", n)

    async with trio.open_nursery() as nursery:
        for n in range(200):
            nursery.start_soon(setter, n)
    events = await subject.changes.wait_for(org, "hot", 200)
    assert [event.id for event in events] == [f"{v}-0" for v in range(1, 201)]
    final = orjson.loads(events[-1].data)["value"]
    assert await subject.value(org, "hot") == (final, 200)
