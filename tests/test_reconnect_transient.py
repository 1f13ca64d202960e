"""The reconnecting client under transient refusals (`unavailable`,
`rate_limited`), against a scripted fake server (trio-websocket).

A backend hiccup while a client subscribes or reconnects must never drop a
subscription: every subscribe, state subscribe, restore and clean-up
unsubscribe the wrapper makes is retried with its backoff until the server
says yes (or a real no), and nothing escapes the wrapper's tasks. Fault
campaigns found the old behaviour: one `unavailable` on the unsubscribe of a
restored channel tore down the whole client.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from apix_trio.reconnect import (
    Resync,
    StateSnapshot,
    StateSubscriptionFailed,
    SubscriptionFailed,
    open_reconnecting_client,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 10
BACKOFF = {"backoff_base": 0.01, "backoff_cap": 0.05}
TRANSIENT = {"code": "unavailable", "message": "backend unavailable, retry later"}
LIMITED = {"code": "rate_limited", "message": "too many operations", "retry_after": 0.01}


class FlakyServer:
    """Answers like apix-trio, but refuses the first `refusals` of every
    (connection, op, target) with `unavailable` (and then `rate_limited`).

    Connection 1 is a fresh session; it ends when `restart` is set (close
    1012). Connection 2 resumes it: the auth result restores `chat.extra`
    (which the client does not want) and `chat.lost` with an `unavailable`
    error entry, and nothing else; once the client subscribed both `chat.a`
    and `chat.lost` again, the server pushes event 5-0 on `chat.a`.
    """

    def __init__(self, refusals: int = 2) -> None:
        self.url = ""
        self.refusals = refusals
        self.connections = 0
        self.refused: Counter[tuple[int, str, str]] = Counter()
        self.ops: list[tuple[int, str, str]] = []
        self.restart = trio.Event()
        self.pushed = trio.Event()
        self.restored: set[str] = set()

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="apix.v1")
        self.connections += 1
        number = self.connections
        auth = orjson.loads(await ws.get_message())
        resumed = number > 1
        result: dict[str, Any] = {
            "conn": f"c-{number}", "org": "acme", "sub": "alice", "exp": 2_000_000_000,
            "session": "s-1", "heartbeat": 25, "resumed": resumed,
        }  # fmt: skip
        if resumed:
            assert auth["resume"]["session"] == "s-1"
            result["channels"] = [
                {"channel": "chat.extra", "position": "0-0"},
                {"channel": "chat.lost", "error": TRANSIENT},
            ]
            result["state"] = []
        await send(ws, {"id": auth["id"], "ok": True, "result": result})
        async with trio.open_nursery() as nursery:
            if number == 1:
                nursery.start_soon(self._close_on_restart, ws)
            try:
                while True:
                    await self.answer(ws, number, orjson.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed:
                nursery.cancel_scope.cancel()

    async def _close_on_restart(self, ws: trio_websocket.WebSocketConnection) -> None:
        await self.restart.wait()
        await ws.aclose(1012, "restarting")

    async def answer(
        self, ws: trio_websocket.WebSocketConnection, number: int, frame: dict[str, Any]
    ) -> None:
        op, call_id = frame["op"], frame["id"]
        target = frame.get("channel") or frame.get("key") or ""
        self.ops.append((number, op, target))
        seen = self.refused[(number, op, target)]
        if seen < self.refusals:
            self.refused[(number, op, target)] += 1
            error = TRANSIENT if seen % 2 == 0 else LIMITED
            await send(ws, {"id": call_id, "ok": False, "error": error})
            return
        if op == "subscribe":
            since = frame.get("since")
            result = {"channel": target, "position": since or "0-0", "recovered": True}
            await send(ws, {"id": call_id, "ok": True, "result": result})
            if number == 2:
                self.restored.add(target)
            if self.restored >= {"chat.a", "chat.lost"} and not self.pushed.is_set():
                event = {"id": "5-0", "ts": 1, "data": {"n": 5}, "from": "bob"}
                await send(ws, {"push": "event", "channel": "chat.a", "event": event})
                self.pushed.set()
        elif op == "state.subscribe":
            await send(ws, {"id": call_id, "ok": True, "result": {"value": 1, "version": 1}})
        else:
            await send(ws, {"id": call_id, "ok": True, "result": {}})


async def send(ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(frame).decode())


@pytest.fixture
async def flaky(nursery: trio.Nursery) -> FlakyServer:
    server = FlakyServer()
    listener = await nursery.start(
        trio_websocket.serve_websocket, server.handle, "127.0.0.1", 0, None
    )
    server.url = f"ws://127.0.0.1:{listener.port}/ws"
    return server


async def test_transient_refusals_are_retried_and_never_drop_a_subscription(
    flaky: FlakyServer,
) -> None:
    items: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with open_reconnecting_client(flaky.url, lambda: "t", **BACKOFF) as client:
            await client.wait_connected()
            # The application's own calls retry too, and return the result.
            assert (await client.subscribe("chat.a"))["channel"] == "chat.a"
            assert await client.subscribe("chat.lost") is not None
            assert await client.state_subscribe("counter") == {"value": 1, "version": 1}
            flaky.restart.set()
            async for item in client.events():
                items.append(item)
                if isinstance(item, dict) and item.get("push") == "event":
                    break
            await_lost = [op for op in flaky.ops if op == (2, "subscribe", "chat.lost")]
            stats = client.statistics()

    assert items[-1]["event"]["id"] == "5-0"
    assert not [
        item for item in items if isinstance(item, SubscriptionFailed | StateSubscriptionFailed)
    ]
    assert not [item for item in items if isinstance(item, Resync)]
    assert StateSnapshot("counter", 1, 1) in items
    assert stats.connects == 2 and stats.resumes == 1
    # Every op of the wrapper went through its refusals, then succeeded.
    for number, op, target in [
        (1, "subscribe", "chat.a"),
        (1, "state.subscribe", "counter"),
        (2, "unsubscribe", "chat.extra"),
        (2, "subscribe", "chat.a"),
        (2, "state.subscribe", "counter"),
    ]:
        assert flaky.refused[(number, op, target)] == flaky.refusals
        assert flaky.ops.count((number, op, target)) == flaky.refusals + 1
    # The restore that failed transiently was subscribed again (not dropped).
    assert len(await_lost) == flaky.refusals + 1


async def test_a_real_refusal_still_raises_and_forgets(flaky: FlakyServer) -> None:
    flaky.refusals = 0

    async def forbidden(ws: Any, number: int, frame: dict[str, Any]) -> None:
        error = {"code": "forbidden", "message": "not allowed"}
        await send(ws, {"id": frame["id"], "ok": False, "error": error})

    flaky.answer = forbidden  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT):
        async with open_reconnecting_client(flaky.url, lambda: "t", **BACKOFF) as client:
            await client.wait_connected()
            with pytest.raises(Exception) as info:
                await client.subscribe("secret.x")
            assert getattr(info.value, "code", None) == "forbidden"
            assert client.positions == {}
