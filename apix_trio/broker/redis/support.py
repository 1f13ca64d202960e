"""Shared pieces of the Redis adapter: tuning, backoff, the trio->asyncio crossing.

`cross` is the one place where asyncio/redis exceptions become
`BrokerUnavailable` (STYLE habit 8: translate at the boundary).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import redis.exceptions as redis_errors
import trio
import trio_asyncio

from apix_trio.broker.model import BrokerUnavailable

T = TypeVar("T")

BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.RedisError,
    OSError,  # includes TimeoutError (asyncio.TimeoutError) and ConnectionError
    EOFError,
    asyncio.CancelledError,  # the asyncio side cancelled by anything but trio
    asyncio.InvalidStateError,
)


@attrs.frozen
class RedisTuning:
    """Knobs of the Redis broker that are not settings (yet)."""

    bus_maxlen: int = 10_000
    """Entries kept per bus shard (MAXLEN ~): how far a reader may fall behind."""
    bus_block_ms: int = 1000
    """XREAD BLOCK time of the bus reader."""
    bus_count: int = 512
    """Entries per shard per XREAD."""
    batch_workers: int = 4
    """Batches in flight at once (each on its own connection)."""
    max_batch: int = 512
    """Calls per pipeline."""
    queue_size: int = 16_384
    """Calls waiting for a worker; a full queue makes callers wait (within
    their timeout)."""
    health_interval: float = 1.0
    """Seconds between PINGs while Redis answers."""
    backoff_base: float = 0.05
    backoff_cap: float = 2.0
    """Reconnect backoff while Redis does not answer: base * 2^(n-1), capped."""


def pack_command(*args: bytes) -> bytes:
    """One command in RESP, ready to send (redis-py's packer costs ~5x more)."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row (>= 1)."""
    if failures < 1:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 1, 60))


async def cross(what: str, fn: Callable[..., Awaitable[T]], *args: Any, within: float) -> T:
    """Run the asyncio coroutine function `fn(*args)` from trio, within `within` s.

    Error handling: BrokerUnavailable for every backend failure and for a
    timeout (the asyncio task is cancelled, which makes redis-py drop the
    connection it was using).
    """
    with trio.move_on_after(within):
        try:
            return await trio_asyncio.aio_as_trio(fn)(*args)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"redis {what} failed: {exc!r}") from exc
    raise BrokerUnavailable(f"redis {what}: no answer within {within:g} s")


async def aio_close_client(client: Any, pool: Any) -> None:
    """Close a redis-py asyncio client and then its pool (asyncio side).

    `Redis(connection_pool=p).aclose()` leaves a pool it was given open, so
    the pool is closed explicitly. Either may be None (never opened).
    """
    if client is not None:
        await client.aclose()
    if pool is not None:
        await pool.aclose()
