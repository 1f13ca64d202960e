"""Backoff maths: full-jitter bounds with seeded RNGs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apix_trio.delivery.backoff import jittered_first_ping, retry_delay, retry_delay_bounds

PROTOCOL = {"base": 1.0, "factor": 2.0, "cap": 60.0}


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (50, 60.0), (10**6, 60.0)],
)
def test_bounds_follow_the_protocol_defaults(attempt: int, ceiling: float) -> None:
    assert retry_delay_bounds(attempt, **PROTOCOL) == (0.0, ceiling)


def test_full_jitter_scales_the_rng() -> None:
    assert retry_delay(3, **PROTOCOL, rng=lambda: 0.0) == 0.0
    assert retry_delay(3, **PROTOCOL, rng=lambda: 0.5) == 2.0
    assert retry_delay(30, **PROTOCOL, rng=lambda: 0.25) == 15.0


def test_seeded_rng_is_reproducible_and_spread() -> None:
    a = [retry_delay(4, **PROTOCOL, rng=random.Random(7)) for _ in range(3)]
    b = [retry_delay(4, **PROTOCOL, rng=random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    delays = [retry_delay(4, **PROTOCOL, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d < 8.0 for d in delays)
    assert min(delays) < 0.1 and max(delays) > 7.9  # uses the whole range
    assert 3.6 < sum(delays) / len(delays) < 4.4


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_count_from_one(attempt: int) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, **PROTOCOL, rng=random.Random(0))


def test_huge_float_growth_does_not_overflow() -> None:
    assert retry_delay_bounds(5000, base=0.5, factor=3.5, cap=60.0) == (0.0, 60.0)


@given(
    attempt=st.integers(1, 10_000),
    base=st.floats(0, 100),
    factor=st.floats(1, 10),
    cap=st.floats(0, 3600),
    seed=st.integers(0, 2**32),
)
def test_delay_within_bounds(
    attempt: int, base: float, factor: float, cap: float, seed: int
) -> None:
    low, high = retry_delay_bounds(attempt, base=base, factor=factor, cap=cap)
    assert low == 0.0
    assert high <= cap
    if attempt == 1:
        assert high == min(cap, base)
    delay = retry_delay(attempt, base=base, factor=factor, cap=cap, rng=random.Random(seed))
    assert low <= delay <= high


@given(st.integers(1, 60))
def test_ceiling_never_decreases(attempt: int) -> None:
    assert retry_delay_bounds(attempt, **PROTOCOL) <= retry_delay_bounds(attempt + 1, **PROTOCOL)


@given(st.floats(0.001, 3600), st.integers(0, 2**32))
def test_first_ping_within_half_to_full_interval(interval: float, seed: int) -> None:
    delay = jittered_first_ping(interval, random.Random(seed))
    assert interval / 2 <= delay <= interval


def test_first_ping_ends() -> None:
    assert jittered_first_ping(25.0, lambda: 0.0) == 12.5
    assert jittered_first_ping(25.0, lambda: 1.0) == 25.0
