"""Token bucket and the sustained-abuse rule, with exact times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apix_trio.gateway.ratelimit import AbuseTracker, TokenBucket


def test_burst_then_refusal_with_retry_after() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    assert [bucket.try_take(10.0) for _ in range(4)] == [0.0] * 4
    assert bucket.try_take(10.0) == 0.5
    assert bucket.try_take(10.25) == 0.25  # half a token has come back
    assert bucket.try_take(10.5) == 0.0
    assert bucket.try_take(10.5) == 0.5


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    for _ in range(4):
        bucket.try_take(0.0)
    assert bucket.available(1000.0) == 4.0
    assert [bucket.try_take(1000.0) for _ in range(5)] == [0.0] * 4 + [0.5]


def test_steady_rate_is_allowed() -> None:
    bucket = TokenBucket(rate=100.0, burst=200.0)
    for _ in range(200):
        assert bucket.try_take(0.0) == 0.0
    # Then exactly one op per 1/rate seconds, with float times like 0.01 * k.
    for k in range(1, 1001):
        assert bucket.try_take(k * 0.01) == 0.0, k
        assert bucket.try_take(k * 0.01) > 0.0, k


def test_time_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.try_take(5.0) == 0.0
    assert bucket.try_take(4.0) == 1.0
    assert bucket.try_take(5.5) == 0.5
    assert bucket.try_take(6.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_invalid_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    st.floats(0.5, 1000),
    st.integers(1, 50),
    st.lists(st.floats(0, 5, allow_nan=False), max_size=60),
)
def test_never_more_than_burst_plus_refill(rate: float, burst: int, gaps: list[float]) -> None:
    bucket = TokenBucket(rate, burst)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        retry = bucket.try_take(now)
        assert retry >= 0.0
        if retry == 0.0:
            allowed += 1
        else:
            assert retry <= 1 / rate + 1e-9
            assert bucket.try_take(now + retry) == 0.0
            allowed += 1
            now += retry
    assert allowed <= burst + now * rate + 1e-6


def test_abuse_after_ten_seconds_of_refusals() -> None:
    tracker = AbuseTracker(window=10.0, quiet=1.0)
    t = 100.0
    assert tracker.record(t, limited=True) is False
    for step in range(1, 40):  # one refusal every 0.25 s, allowed ops in between
        assert tracker.record(t + step * 0.25 - 0.1, limited=False) is False
        assert tracker.record(t + step * 0.25, limited=True) is False
    assert tracker.streak_started(t + 9.75) == t
    assert tracker.record(t + 10.0, limited=True) is True


def test_a_quiet_second_ends_the_streak() -> None:
    tracker = AbuseTracker(window=10.0, quiet=1.0)
    assert not tracker.record(0.0, limited=True)
    assert not tracker.record(0.5, limited=True)
    assert not tracker.record(1.5, limited=False)  # 1.0 s since the last refusal
    assert tracker.streak_started(1.5) is None
    assert not tracker.record(10.0, limited=True)  # a new streak starts here
    assert tracker.streak_started(10.0) == 10.0
    tracker2 = AbuseTracker(window=10.0, quiet=1.0)
    tracker2.record(0.0, limited=True)
    assert not tracker2.record(1.0, limited=True)  # gap of exactly `quiet`: new streak
    assert tracker2.streak_started(1.0) == 1.0


def test_streak_ends_without_any_further_operation() -> None:
    tracker = AbuseTracker(window=10.0, quiet=2.0)
    tracker.record(0.0, limited=True)
    assert tracker.streak_started(1.9) == 0.0
    assert tracker.streak_started(2.0) is None


def test_bucket_and_tracker_together() -> None:
    """A client sending 3 ops/s against 1 op/s is closed 10 s into its refusals."""
    bucket = TokenBucket(rate=1.0, burst=2.0)
    tracker = AbuseTracker(window=10.0, quiet=1.0)
    first_refusal = None
    for k in range(100):
        now = k / 4  # 4 ops per second
        limited = bucket.try_take(now) > 0
        if limited and first_refusal is None:
            first_refusal = now
        if tracker.record(now, limited):
            assert first_refusal is not None
            assert now == first_refusal + 10.0
            return
    pytest.fail("never detected")
