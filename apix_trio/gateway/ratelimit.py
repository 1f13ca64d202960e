"""Per-connection rate limiting: a token bucket and the abuse rule.

Pure: both classes take the current time as an argument (seconds on any
monotonic clock, e.g. `trio.current_time()`) and never read a clock.

`TokenBucket` answers each operation with 0.0 (go ahead) or the seconds
until a token will be available (the `retry_after` of a `rate_limited`
reply). `AbuseTracker` turns a run of `rate_limited` replies into the
"sustained abuse" verdict that closes the connection with 4029.
"""

from __future__ import annotations

# Float error in `elapsed * rate` must not turn a token that is due into a
# refusal with a retry_after of a few femtoseconds.
_EPSILON = 1e-9


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; starts full.

    Each allowed operation takes one token. Time going backwards is
    treated as no time passing. Raises ValueError unless `rate > 0` and
    `burst >= 1`.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate!r}")
        if not burst >= 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now` (refills, takes nothing)."""
        self._refill(now)
        return self._tokens

    def try_take(self, now: float) -> float:
        """Take a token at `now`: 0.0 if one was there, else the seconds
        until one will be (and nothing is taken)."""
        self._refill(now)
        if self._tokens >= 1 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1)
            return 0.0
        return (1 - self._tokens) / self.rate


class AbuseTracker:
    """Decides when a client is abusing the rate limit (close 4029).

    The exact rule: a *streak* starts at a `rate_limited` reply that comes
    when no streak is running. The streak continues as long as each
    further `rate_limited` reply comes less than `quiet` seconds after the
    previous one; allowed operations in between do not break it (a client
    sending steadily above the rate gets a mix of both). The streak ends
    when `quiet` seconds pass without a `rate_limited` reply, i.e. the
    client slowed down enough for the bucket to keep up. `record` returns
    True for a `rate_limited` reply arriving `window` seconds or more after
    the streak started: the client is still over the limit after `window`
    seconds of refusals.
    """

    __slots__ = ("_last_limited", "_started", "quiet", "window")

    def __init__(self, *, window: float = 10.0, quiet: float = 1.0) -> None:
        self.window = window
        self.quiet = quiet
        self._started: float | None = None
        self._last_limited = 0.0

    def _expire(self, now: float) -> None:
        if self._started is not None and now - self._last_limited >= self.quiet:
            self._started = None

    def record(self, now: float, limited: bool) -> bool:
        """Record one operation's outcome at `now`; True means close 4029."""
        self._expire(now)
        if not limited:
            return False
        if self._started is None:
            self._started = now
        self._last_limited = now
        return now - self._started >= self.window

    def streak_started(self, now: float) -> float | None:
        """When the running streak began, or None if there is none at `now`."""
        self._expire(now)
        return self._started
