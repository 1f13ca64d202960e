"""State synchronization: versioned JSON values per (org, key), visible on every node.

The interface; the embedded implementation lives in `memory/state.py`, the
Redis one in `redis/state.py`. One contract suite
(`tests/test_state_contract.py`) runs against both.

Theory of operation
-------------------
A state key holds one JSON value (kept as compact JSON text) and a
`version`: 0 while the key was never set, then +1 on every change, deletes
and changes that leave the value as it was included. A deleted key keeps
its version (its value is `null`), so a version is never reused: a key that
was ever set costs its record forever (a few dozen bytes), which is what
makes "never reused" hold without a clock.

A change is `set` (a new value), `patch` (an RFC 7396 merge patch applied to
the current value, to `{}` when it is null) or `delete` (the value becomes
null). Each may carry an expected version (compare-and-set): the change is
made only when the key's version is exactly that, else `StateConflict`
carrying the current version; `0` means "only if never set".

Limits, checked in the same atomic step as the change:

- `StateTooLarge` when the resulting value's compact JSON is longer than
  `StateLimits.max_value_bytes` bytes (nothing changes, no version is used);
- `StateLimitExceeded` when the change would give the org more than
  `StateLimits.max_keys_per_org` keys with a value (not null). The count is
  one org-level counter kept with the keys, cluster-wide: a change from null
  to a value takes one, a change from a value to null gives it back.

Fan-out: in the same atomic step, every change goes out through the broker's
ordinary fan-out (the listener of every node, like events), as an event of
the internal pseudo-channel `state_channel(key)` = `$state.<key>` (no client
channel name can contain `$`, so no client can subscribe or publish to it):

    id    "<version>-0"      (so the router's per-channel order is version order)
    ts    unix ms of the change (the backend's clock)
    from  the sub that made the change
    data  {"value": <value>} (set, delete: null) or {"patch": <patch>}  (JSON text)

Every node's router therefore sees each key's changes once, in version
order, with nothing missing (the Redis backend appends the bus entry in the
script that makes the change).

Error handling: every method raises `BrokerUnavailable` when the backend
cannot answer within `broker.operation_timeout` (a change that raised may or
may not have been made; a client retries with its expected version to learn
which). The three errors above are the only others.
"""

from __future__ import annotations

import abc

import attrs

from apix_trio.broker.model import BrokerError
from apix_trio.settings import StateSettings

STATE_PREFIX = "$state."
"""Pseudo-channels of state changes are `$state.<key>` (see the module docstring)."""

NULL = "null"
"""The JSON text of a key without a value."""


def state_channel(key: str) -> str:
    """The internal pseudo-channel the changes of `key` travel on."""
    return STATE_PREFIX + key


def change_id(version: int) -> str:
    """The fan-out event id of the change that made `version`."""
    return f"{version}-0"


def set_data(value: str) -> str:
    """The fan-out event data of a set or delete (`value` is JSON text)."""
    return '{"value":' + value + "}"


def patch_data(patch: str) -> str:
    """The fan-out event data of a patch (`patch` is JSON text)."""
    return '{"patch":' + patch + "}"


def check_size(value: str, limits: StateLimits) -> None:
    """Raise StateTooLarge when the value text is over `max_value_bytes`."""
    size = len(value.encode())
    if size > limits.max_value_bytes:
        raise StateTooLarge(size, limits.max_value_bytes)


class StateConflict(BrokerError):
    """The expected version was not the key's version."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the current version is {version}")
        self.version = version


class StateTooLarge(BrokerError):
    """The resulting value would be larger than `max_value_bytes`."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the value would be {size} bytes, more than {limit}")
        self.size = size
        self.limit = limit


class StateLimitExceeded(BrokerError):
    """The org already has `max_keys_per_org` keys with a value."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the org already has {limit} state keys with a value")
        self.limit = limit


@attrs.frozen
class StateLimits:
    """`state.max_value_bytes` and `state.max_keys_per_org` (CONFIG.md)."""

    max_value_bytes: int = 65536
    max_keys_per_org: int = 100000

    @classmethod
    def from_settings(cls, settings: StateSettings) -> StateLimits:
        return cls(settings.max_value_bytes, settings.max_keys_per_org)


@attrs.frozen
class StateValue:
    """A key's value (compact JSON text, `"null"` when it has none) and version."""

    value: str = NULL
    version: int = 0


class StateStore(abc.ABC):
    """Versioned state values (see the module docstring)."""

    @abc.abstractmethod
    async def get(self, org: str, key: str) -> StateValue:
        """The key's value and version (`"null"`, 0 when never set)."""

    @abc.abstractmethod
    async def set(
        self,
        org: str,
        key: str,
        value: str,
        *,
        version: int | None,
        sender: str,
        limits: StateLimits,
    ) -> int:
        """Replace the value with `value` (compact JSON text; `"null"` leaves
        the key without a value); returns the new version.

        Raises StateConflict, StateTooLarge, StateLimitExceeded.
        """

    @abc.abstractmethod
    async def patch(
        self,
        org: str,
        key: str,
        patch: str,
        *,
        version: int | None,
        sender: str,
        limits: StateLimits,
    ) -> int:
        """Apply the RFC 7396 merge patch `patch` (compact JSON text) to the
        value (to `{}` when it is null); returns the new version. The change
        is atomic: the patch applies to exactly the version it replaces.

        Raises StateConflict, StateTooLarge, StateLimitExceeded.
        """

    @abc.abstractmethod
    async def delete(self, org: str, key: str, *, version: int | None, sender: str) -> int:
        """Set the value to null; returns the new version (a delete of a key
        without a value is a change too). Raises StateConflict."""

    @abc.abstractmethod
    async def count(self, org: str) -> int:
        """How many keys of `org` have a value (the limit's counter)."""
