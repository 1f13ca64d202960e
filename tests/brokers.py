"""Time helpers shared by the broker suites run over memory and Redis.

- `FakeWallClock`: the `time.time` stand-in a memory broker is given, moved
  only by the test;
- `passes_within(seconds, check)`: real time, for Redis expiry: `check`
  (an async assertion) is retried every `POLL` seconds until it passes,
  within `seconds + EXPIRY_SLACK` (TooSlowError otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

T0 = 1_700_000_000.0
EXPIRY_SLACK = 5.0
"""Seconds Redis may take beyond a TTL to show it expired."""
POLL = 0.05


class FakeWallClock:
    """A `time.time` stand-in that moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def passes_within(seconds: float, check: Callable[[], Awaitable[None]]) -> None:
    """Retry `check` until it raises no AssertionError (see the module docstring)."""
    with trio.fail_after(seconds + EXPIRY_SLACK):
        while True:
            try:
                await check()
            except AssertionError:
                await trio.sleep(POLL)
            else:
                return


REDIS_KINDS = ("redis", "redis-cluster")
"""The Redis parameters of the broker suites: one server, a Redis Cluster."""


def redis_target(kind: str, request: Any) -> tuple[str, dict[str, Any]]:
    """`(broker.redis_url, other broker settings)` for a Redis `kind`: the
    test's own redis-server (`redis_url`) or the session's Redis Cluster
    (`shared_redis_cluster`, `redis_mode = cluster`)."""
    if kind == "redis-cluster":
        cluster = request.getfixturevalue("shared_redis_cluster")
        return cluster.url, {"redis_mode": "cluster"}
    assert kind == "redis", kind
    return request.getfixturevalue("redis_url"), {}
