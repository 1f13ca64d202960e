"""State subscriptions of the reconnecting client: gapless versions per key.

Theory of operation
-------------------
`StateSubscriptions` is the part of `clients.reconnect.ReconnectingClient`
that keeps its state keys (PROTOCOL.md "State synchronization"). Per key it
remembers the last version the application was given. The application gets,
through the wrapper's `events()`, in stream order:

- a `StateSnapshot(key, value, version)` whenever its copy must be replaced
  whole: the first value (the `state.subscribe` reply), and every time it
  missed versions: a resume whose `state` list (or, after a lost session, a
  new subscribe) shows a newer version than it had, or a push that skips
  versions (a `state.get` is made, in stream order, and its answer handed
  over as the snapshot);
- then the `state` pushes as the server sent them, each exactly one version
  after the one before: `value` replaces the copy, `patch` is an RFC 7396
  merge patch to apply (`apix_trio.protocol.mergepatch.merge_patch`).

A push not newer than the copy is dropped (the application has it). While a
`state.get` for a gap is out, later pushes of that key wait and are applied
after the snapshot.

Keys the application subscribed to are restored on every connection: by the
resume itself (the auth result's `state` list), or by `state.subscribe` when
the session is gone or did not have them. A key the server refuses then is
dropped, with a `StateSubscriptionFailed` notice.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs
import trio

from apix_trio.clients.client import ApixClosed, ApixError, Client, Frame


@attrs.frozen
class StateSnapshot:
    """The whole value of `key` at `version`: replace the local copy with it."""

    key: str
    value: Any
    version: int


@attrs.frozen
class StateSubscriptionFailed:
    """The server refused to restore the state subscription of `key` on a
    reconnect: it is dropped, not retried (a transient refusal such as
    `unavailable` is retried instead, never reported here)."""

    key: str
    code: str
    message: str


class Control(Protocol):
    """The wrapper's way to send a control frame (`ReconnectingClient._control`)."""

    def __call__(
        self,
        client: Client,
        op: str,
        *,
        wait: bool = True,
        on_reply: Callable[[Frame], Awaitable[None]] | None = None,
        retry_transient: bool = False,
        **fields: Any,
    ) -> Awaitable[Frame]: ...


@attrs.define(eq=False)
class _Copy:
    version: int | None = None
    """The last version the application got (None: no value yet)."""
    resyncing: bool = False
    buffer: list[Frame] = attrs.Factory(list)


class StateSubscriptions:
    """See the module docstring. `hand` puts an item into the wrapper's
    `events()` (in stream order); `control` sends a control frame."""

    def __init__(self, hand: Callable[[Any], Awaitable[None]], control: Control) -> None:
        self._hand = hand
        self._control = control
        self._copies: dict[str, _Copy] = {}

    @property
    def keys(self) -> list[str]:
        return list(self._copies)

    def versions(self) -> dict[str, int]:
        """The last version handed over per key (keys without a value yet left out)."""
        return {key: c.version for key, c in self._copies.items() if c.version is not None}

    def want(self, key: str) -> None:
        self._copies.setdefault(key, _Copy())

    def forget(self, key: str) -> None:
        self._copies.pop(key, None)

    async def subscribe_on(self, client: Client, key: str) -> Frame:
        """`state.subscribe` on `client`; the reply is handled in stream order."""
        return await self._control(
            client,
            "state.subscribe",
            on_reply=functools.partial(self._on_reply, key),
            retry_transient=True,
            key=key,
        )

    async def _on_reply(self, key: str, reply: Frame) -> None:
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            await self._on_value(key, reply["result"])

    async def _on_value(self, key: str, result: Frame) -> None:
        """A value with its version (reply, resume entry): a snapshot when it
        is newer than what the application has."""
        copy = self._copies.get(key)
        version = result.get("version")
        if copy is None or type(version) is not int:
            return
        if copy.version is None or version > copy.version:
            copy.version = version
            await self._hand(StateSnapshot(key, result.get("value"), version))

    async def on_push(self, client: Client, frame: Frame) -> bool:
        """Handle a `state` push; False when it is not about a subscribed key
        with a known version (the wrapper hands it over as it is)."""
        key, version = frame.get("key"), frame.get("version")
        copy = self._copies.get(key) if isinstance(key, str) else None
        if copy is None or copy.version is None or type(version) is not int:
            return False
        assert isinstance(key, str)
        if copy.resyncing:
            copy.buffer.append(frame)
        elif version <= copy.version:
            pass  # the application has it
        elif version == copy.version + 1:
            copy.version = version
            await self._hand(frame)
        else:  # a gap: read the whole value, in stream order
            copy.resyncing = True
            copy.buffer.append(frame)
            on_reply = functools.partial(self._resynced, client, key, copy)
            await self._control(client, "state.get", wait=False, on_reply=on_reply, key=key)
        return True

    async def _resynced(self, client: Client, key: str, copy: _Copy, reply: Frame) -> None:
        if self._copies.get(key) is not copy:
            return
        copy.resyncing = False
        buffer, copy.buffer = copy.buffer, []
        await self._on_reply(key, reply)
        for frame in buffer:
            await self.on_push(client, frame)

    def disconnected(self) -> None:
        """The connection ended: a pending `state.get` will not be answered."""
        for copy in self._copies.values():
            copy.resyncing = False
            copy.buffer.clear()

    async def on_auth(
        self, client: Client, result: Frame, resumed: bool, nursery: trio.Nursery
    ) -> None:
        """After an auth reply: take the resumed `state` list (in stream
        order), then restore the rest in the background."""
        restored: list[str] = []
        extra: list[str] = []
        entries = result.get("state") if resumed else None
        for entry in entries if isinstance(entries, list) else ():
            key = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(key, str):
                continue
            if key in self._copies:
                await self._on_value(key, entry)
                restored.append(key)
            else:
                extra.append(key)
        missing = [key for key in self._copies if key not in restored]
        if missing or extra:
            nursery.start_soon(self._reconcile, client, missing, extra)

    async def _reconcile(
        self, client: Client, missing: Iterable[str], extra: Iterable[str]
    ) -> None:
        try:
            for key in extra:
                with contextlib.suppress(ApixError):  # gone already, or not ours to keep
                    await self._control(client, "state.unsubscribe", retry_transient=True, key=key)
            for key in missing:
                if key not in self._copies:
                    continue
                try:
                    await self.subscribe_on(client, key)
                except ApixError as exc:
                    self.forget(key)
                    await self._hand(StateSubscriptionFailed(key, exc.code, exc.message))
        except ApixClosed:
            return  # the next connection restores again
