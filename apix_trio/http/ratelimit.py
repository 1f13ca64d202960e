"""`api.rate_per_org`: one token bucket per org for the HTTP server API.

Pure: the current time is passed in (seconds on any monotonic clock, e.g.
`trio.current_time()`). Each bucket holds `2 x rate` tokens and starts full;
every authenticated request takes one. Buckets of orgs that have been idle
long enough to be full again are dropped once more than `MAX_BUCKETS`
exist, so the table stays bounded by the orgs active in the last
`2 / rate` seconds.
"""

from __future__ import annotations

import math

from apix_trio.gateway.ratelimit import TokenBucket

MAX_BUCKETS = 10_000


class OrgRateLimiter:
    """See the module docstring."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self._buckets: dict[str, TokenBucket] = {}

    def try_take(self, org: str, now: float) -> float:
        """0.0 when `org` may make a request at `now`, else the seconds until it may."""
        bucket = self._buckets.get(org)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_full(now)
            bucket = self._buckets[org] = TokenBucket(self.rate, self.burst)
        return bucket.try_take(now)

    def _drop_full(self, now: float) -> None:
        for org, bucket in list(self._buckets.items()):
            if bucket.available(now) >= self.burst:
                del self._buckets[org]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, at least 1 (a client must wait, not spin)."""
    return str(max(1, math.ceil(seconds)))
