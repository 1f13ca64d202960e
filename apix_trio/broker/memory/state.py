"""State of the embedded broker (`StateStore` in memory).

Same observable semantics as the Redis implementation (`redis/state.py`);
the contract suite runs against both. A key is a `(value text, version)`
pair in a dict; the org counter is a dict of org -> keys with a value.

A change is handed to the broker's fan-out (`fan_out`, the listener events
go to) before the call returns, so changes reach the router in version
order. Every public coroutine checkpoints first and then runs without
awaiting, so each change is atomic with respect to other tasks (a merge
patch included: it is computed in place, between two checkpoints).

The change's `ts` is the broker's wall clock (milliseconds), as event ids are.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from apix_trio.broker.state import (
    NULL,
    StateConflict,
    StateLimitExceeded,
    StateLimits,
    StateStore,
    StateValue,
    change_id,
    check_size,
    patch_data,
    set_data,
    state_channel,
)
from apix_trio.protocol.event import Event
from apix_trio.protocol.mergepatch import merge_patch_text

FanOut = Callable[[str, str, Event], None]
"""`fan_out(org, channel, event)`: the embedded broker's listener call."""

_Key = tuple[str, str]


class MemoryState(StateStore):
    """See the module docstring. Made by `MemoryBroker.state`."""

    def __init__(self, fan_out: FanOut, wall_clock: Callable[[], float]) -> None:
        self._fan_out = fan_out
        self._wall_clock = wall_clock
        self._keys: dict[_Key, StateValue] = {}
        self._counts: dict[str, int] = {}

    async def get(self, org: str, key: str) -> StateValue:
        await trio.lowlevel.checkpoint()
        return self._keys.get((org, key), StateValue())

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
        await trio.lowlevel.checkpoint()
        check_size(value, limits)
        return self._change(org, key, value, set_data(value), version, sender, limits)

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
        await trio.lowlevel.checkpoint()
        current = self._keys.get((org, key), StateValue())
        if version is not None and version != current.version:
            raise StateConflict(current.version)
        value = merge_patch_text(current.value, patch)
        check_size(value, limits)
        return self._change(org, key, value, patch_data(patch), version, sender, limits)

    async def delete(self, org: str, key: str, *, version: int | None, sender: str) -> int:
        await trio.lowlevel.checkpoint()
        return self._change(org, key, NULL, set_data(NULL), version, sender, None)

    async def count(self, org: str) -> int:
        await trio.lowlevel.checkpoint()
        return self._counts.get(org, 0)

    def _change(
        self,
        org: str,
        key: str,
        value: str,
        data: str,
        expected: int | None,
        sender: str,
        limits: StateLimits | None,
    ) -> int:
        current = self._keys.get((org, key), StateValue())
        if expected is not None and expected != current.version:
            raise StateConflict(current.version)
        had, has = current.value != NULL, value != NULL
        if has and not had:
            count = self._counts.get(org, 0)
            if limits is not None and count >= limits.max_keys_per_org:
                raise StateLimitExceeded(limits.max_keys_per_org)
            self._counts[org] = count + 1
        elif had and not has:
            left = self._counts[org] - 1
            if left:
                self._counts[org] = left
            else:
                del self._counts[org]
        version = current.version + 1
        self._keys[(org, key)] = StateValue(value, version)
        ts = max(int(self._wall_clock() * 1000), 0)
        event = Event(id=change_id(version), ts=ts, data=data, sender=sender)
        self._fan_out(org, state_channel(key), event)
        return version
