"""Shared pieces of the Redis adapter: tuning, backoff, command packing."""

from __future__ import annotations

import attrs


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
    """Batches in flight at once on the pipeline's connection (written, their
    replies not read yet); more calls queue and go out together."""
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


def pack_words(words: tuple[bytes, ...]) -> bytes:
    """Part of a command: `words` as RESP bulk strings, without the `*N`
    header (a command is `b"*%d\r\n" % total + part + part ...`)."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(w), w) for w in words])


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row (>= 1)."""
    if failures < 1:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 1, 60))
