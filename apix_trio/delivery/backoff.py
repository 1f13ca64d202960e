"""Retry and timer jitter: pure functions of their arguments and an RNG.

Redelivery of unacked group events uses exponential backoff with full
jitter (PROTOCOL.md: base 1 s, factor 2, capped at 60 s); heartbeat
pings start at a random offset so connections accepted together do not
ping together.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Rng = random.Random | Callable[[], float]


def _uniform01(rng: Rng) -> float:
    return rng.random() if isinstance(rng, random.Random) else rng()


def retry_delay_bounds(
    attempt: int, *, base: float, factor: float, cap: float
) -> tuple[float, float]:
    """The range `(0.0, ceiling)` that `retry_delay` draws from, with
    `ceiling = min(cap, base * factor ** (attempt - 1))`.

    Never overflows: a ceiling too large for a float is `cap`. Raises
    ValueError if `attempt < 1` or any parameter is negative.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, not {attempt!r}")
    if base < 0 or factor < 0 or cap < 0:
        raise ValueError("base, factor and cap must not be negative")
    try:
        ceiling = min(cap, base * factor ** (attempt - 1))
    except OverflowError:
        ceiling = cap
    return 0.0, float(ceiling)


def retry_delay(attempt: int, *, base: float, factor: float, cap: float, rng: Rng) -> float:
    """Seconds to wait before retry number `attempt` (the first retry is 1):
    uniform in [0, min(cap, base * factor ** (attempt - 1))) ("full jitter").

    `rng` is a `random.Random` or a function returning floats in [0, 1).
    """
    _, ceiling = retry_delay_bounds(attempt, base=base, factor=factor, cap=cap)
    return ceiling * _uniform01(rng)


def jittered_first_ping(interval: float, rng: Rng) -> float:
    """Delay before a connection's first ping: uniform in [interval/2, interval]."""
    return interval / 2 + (interval / 2) * _uniform01(rng)
