"""The Python client against a scripted fake server (trio-websocket's
`serve_websocket`), not the real one: routing of replies and pushes, error
translation, closes, cancellation and concurrency."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from apix_trio.client import (
    ApixClosed,
    ApixConnectError,
    ApixError,
    Client,
    open_client,
)

TOKEN = "good-token"
AUTH_RESULT = {
    "conn": "c-1",
    "org": "acme",
    "sub": "alice",
    "exp": 2_000_000_000,
    "session": "s-1",
    "heartbeat": 25,
    "resumed": False,
}
TIMEOUT = 10


class FakeServer:
    """Authenticates like apix-trio, then answers each frame by its `op`:

    - `fail`: error reply carrying the frame's `error` object;
    - `pushes`: sends the frame's `before` pushes, the reply, `after` pushes;
    - `close`: closes with the frame's `code` and `reason`, no reply;
    - `hold`: answers nothing until `of` hold frames arrived, then all of
      them in reverse order;
    - `silent`: never answered; `answer_silent` answers the silent frames,
      then itself;
    - `bad_json`: sends a frame that is not JSON;
    - anything else: echoes `{"op", ...fields}` as the result.
    A frame that is not JSON gets the protocol's `id: null` bad_request.
    """

    def __init__(self) -> None:
        self.url = ""
        self.auth_frames: list[dict[str, Any]] = []
        self.proposed_subprotocols: tuple[str, ...] = ()
        self.held: list[dict[str, Any]] = []
        self.silent: list[dict[str, Any]] = []
        self.got_silent = trio.Event()
        self.client_close: trio_websocket.CloseReason | None = None
        self.client_closed = trio.Event()

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        if request.path != "/ws":
            await request.reject(404)
            return
        self.proposed_subprotocols = request.proposed_subprotocols
        selected = "apix.v1" if "apix.v1" in request.proposed_subprotocols else None
        authorization = dict(request.headers).get(b"authorization")
        if authorization is not None:
            if authorization != f"Bearer {TOKEN}".encode():
                await request.reject(401, body=b"bad token")
                return
            ws = await request.accept(subprotocol=selected)
            await send(ws, {"push": "connected", **AUTH_RESULT})
        else:
            ws = await request.accept(subprotocol=selected)
            if not await self.first_frame_auth(ws):
                return
        try:
            while True:
                text = await ws.get_message()
                await self.answer(ws, text)
        except trio_websocket.ConnectionClosed as exc:
            self.client_close = exc.reason
            self.client_closed.set()

    async def first_frame_auth(self, ws: trio_websocket.WebSocketConnection) -> bool:
        frame = orjson.loads(await ws.get_message())
        self.auth_frames.append(frame)
        if frame.get("token") != TOKEN:
            error = {"code": "unauthenticated", "message": "bad token"}
            await send(ws, {"id": frame["id"], "ok": False, "error": error})
            await ws.aclose(4001, "unauthenticated")
            return False
        await send(ws, {"id": frame["id"], "ok": True, "result": AUTH_RESULT})
        return True

    async def answer(self, ws: trio_websocket.WebSocketConnection, text: str | bytes) -> None:
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            error = {"code": "bad_request", "message": "not JSON"}
            await send(ws, {"id": None, "ok": False, "error": error})
            return
        op = frame.pop("op")
        call_id = frame.pop("id")
        if op == "fail":
            await send(ws, {"id": call_id, "ok": False, "error": frame["error"]})
        elif op == "pushes":
            for push in frame["before"]:
                await send(ws, push)
            await reply(ws, call_id, {})
            for push in frame["after"]:
                await send(ws, push)
        elif op == "close":
            await ws.aclose(frame["code"], frame["reason"])
        elif op == "hold":
            self.held.append({"id": call_id, **frame})
            if len(self.held) == frame["of"]:
                for held in reversed(self.held):
                    await reply(ws, held["id"], {"n": held["n"]})
        elif op == "silent":
            self.silent.append({"id": call_id, **frame})
            self.got_silent.set()
        elif op == "answer_silent":
            for silent in self.silent:
                await reply(ws, silent["id"], {"late": True})
            await reply(ws, call_id, {})
        elif op == "bad_json":
            await ws.send_message("this is not json")
        else:
            await reply(ws, call_id, {"op": op, **frame})


async def send(ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(frame).decode())


async def reply(ws: trio_websocket.WebSocketConnection, call_id: int, result: Any) -> None:
    await send(ws, {"id": call_id, "ok": True, "result": result})


def event(n: int) -> dict[str, Any]:
    return {
        "push": "event",
        "channel": "chat.room",
        "event": {"id": f"1-{n}", "ts": 1, "data": {"n": n}, "from": "bob"},
    }


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeServer:
    server = FakeServer()
    listener = await nursery.start(
        trio_websocket.serve_websocket, server.handle, "127.0.0.1", 0, None
    )
    server.url = f"ws://127.0.0.1:{listener.port}/ws"
    return server


async def test_first_frame_auth_sets_identity(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            assert (client.conn, client.session, client.org, client.sub) == (
                "c-1",
                "s-1",
                "acme",
                "alice",
            )
            assert client.auth_result == AUTH_RESULT
            assert client.subprotocol == "apix.v1"
            assert client.close_code is None
    assert fake.auth_frames == [{"op": "auth", "id": 1, "token": TOKEN}]
    assert fake.proposed_subprotocols == ("apix.v1",)


async def test_resume_goes_in_the_auth_frame(fake: FakeServer) -> None:
    resume = {"session": "s-0", "positions": {"chat.room": "5-0"}}
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN, resume=resume, subprotocol=None) as client:
            assert client.subprotocol is None
    assert fake.auth_frames[0]["resume"] == resume
    assert fake.proposed_subprotocols == ()


async def test_header_auth_waits_for_connected_push(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN, header_auth=True) as client:
            assert client.auth_result == AUTH_RESULT
            assert client.session == "s-1"
            assert await client.ping() == {"op": "ping"}
    assert fake.auth_frames == []


async def test_refused_auth_raises_apix_error(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(ApixError) as caught:
        async with open_client(fake.url, "bad-token"):
            pytest.fail("the block must not run")
    assert caught.value.code == "unauthenticated"
    assert caught.value.message == "bad token"


async def test_rejected_handshake_raises_connect_error(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ApixConnectError) as caught:
            async with open_client(fake.url, "bad-token", header_auth=True):
                pytest.fail("the block must not run")
        assert caught.value.status_code == 401
        assert caught.value.body == b"bad token"
        with pytest.raises(ApixConnectError) as caught:
            async with open_client(fake.url.replace("/ws", "/nope"), TOKEN):
                pytest.fail("the block must not run")
        assert caught.value.status_code == 404


async def test_unreachable_server_raises_connect_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with trio.fail_after(TIMEOUT), pytest.raises(ApixConnectError) as caught:
            async with open_client(f"ws://127.0.0.1:{port}/ws", TOKEN):
                pytest.fail("the block must not run")
    assert caught.value.status_code is None


async def test_helpers_send_only_given_fields(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            assert await client.subscribe("chat.room") == {
                "op": "subscribe",
                "channel": "chat.room",
            }
            assert await client.subscribe("a.b", since="0", group="g", presence=True) == {
                "op": "subscribe",
                "channel": "a.b",
                "since": "0",
                "group": "g",
                "presence": True,
            }
            assert await client.publish("a.b", None) == {
                "op": "publish",
                "channel": "a.b",
                "data": None,
            }
            assert await client.publish("a.b", {"x": [1]}, key="k1") == {
                "op": "publish",
                "channel": "a.b",
                "data": {"x": [1]},
                "key": "k1",
            }
            assert await client.history("a.b", limit=5) == {
                "op": "history",
                "channel": "a.b",
                "limit": 5,
            }
            assert await client.ack("a.b", "g", iter(["1-0", "2-0"])) == {
                "op": "ack",
                "channel": "a.b",
                "group": "g",
                "ids": ["1-0", "2-0"],
            }
            assert await client.unsubscribe("a.b") == {"op": "unsubscribe", "channel": "a.b"}
            assert await client.refresh("t2") == {"op": "refresh", "token": "t2"}
            assert await client.state_set("k.v", 3, version=2) == {
                "op": "state.set",
                "key": "k.v",
                "value": 3,
                "version": 2,
            }


async def test_pushes_interleaved_with_replies_keep_arrival_order(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            result = await client.call("pushes", before=[event(1), event(2)], after=[event(3)])
            assert result == {}
            await client.call("pushes", before=[{"push": "token_expiring", "exp": 5}], after=[])
            seen = []
            async for push in client.pushes():
                seen.append(push)
                if len(seen) == 4:
                    break
            assert seen == [event(1), event(2), event(3), {"push": "token_expiring", "exp": 5}]


async def test_next_push_by_kind_skips_other_kinds(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            state = {"push": "state", "key": "k", "version": 1, "value": 1}
            await client.call("pushes", before=[event(1), state, event(2)], after=[])
            assert await client.next_push("state") == state
            assert await client.next_push() == event(2)


async def test_error_reply_raises_apix_error_with_its_fields(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            limited = {"code": "rate_limited", "message": "slow down", "retry_after": 1.5}
            with pytest.raises(ApixError) as caught:
                await client.call("fail", error=limited)
            assert (caught.value.code, caught.value.message) == ("rate_limited", "slow down")
            assert caught.value.retry_after == 1.5
            assert caught.value.version is None
            assert caught.value.error == limited

            conflict = {"code": "conflict", "message": "stale", "version": 7}
            with pytest.raises(ApixError) as caught:
                await client.call("fail", error=conflict)
            assert caught.value.version == 7
            # The connection is still usable after an error reply.
            assert await client.ping() == {"op": "ping"}


async def test_server_close_fails_calls_and_ends_pushes(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            await client.call("pushes", before=[], after=[event(1)])
            with pytest.raises(ApixClosed) as caught:
                await client.call("close", code=4030, reason="bye")
            assert (caught.value.code, caught.value.reason) == (4030, "bye")
            assert (client.close_code, client.close_reason) == (4030, "bye")
            assert (await client.wait_closed()).code == 4030
            # Pushes received before the close are still delivered, then the close.
            pushes = client.pushes()
            assert await pushes.__anext__() == event(1)
            with pytest.raises(ApixClosed):
                await pushes.__anext__()
            with pytest.raises(ApixClosed) as caught:
                await client.ping()
            assert caught.value.code == 4030
            with pytest.raises(ApixClosed):
                await client.send_raw("{}")


async def test_many_concurrent_calls_are_matched_by_id(fake: FakeServer) -> None:
    count = 50
    results: dict[int, Any] = {}

    async def one_call(client: Client, n: int) -> None:
        results[n] = await client.call("hold", n=n, of=count)

    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client, trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(one_call, client, n)
    # The fake answered all of them at once, in reverse order of arrival.
    assert len(fake.held) == count
    assert results == {n: {"n": n} for n in range(count)}


async def test_cancelled_call_drops_its_late_reply(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            async with trio.open_nursery() as nursery:
                cancel_scope = trio.CancelScope()

                async def cancelled_call() -> None:
                    with cancel_scope:
                        await client.call("silent")
                        raise AssertionError("a silent call cannot return")

                nursery.start_soon(cancelled_call)
                await fake.got_silent.wait()
                cancel_scope.cancel()
            assert cancel_scope.cancelled_caught
            assert await client.call("answer_silent") == {}
            await client.call("pushes", before=[event(9)], after=[])
            # The late reply to the cancelled call never shows up as a push.
            assert await client.next_push() == event(9)


async def test_unmatched_replies_arrive_as_pushes(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            await client.send_raw("{not json")
            frame = await client.next_push()
            assert frame["id"] is None
            assert frame["ok"] is False
            assert frame["error"]["code"] == "bad_request"
            await client.send_raw('{"op": "ping", "id": 999}')
            assert await client.next_push() == {"id": 999, "ok": True, "result": {"op": "ping"}}


async def test_push_overflow_closes_with_slow_consumer(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN, push_buffer=3) as client:
            flood = [event(n) for n in range(10)]
            with pytest.raises(ApixClosed) as caught:
                await client.call("pushes", before=flood, after=[])
            assert caught.value.code == 4009
            assert client.close_code == 4009
            assert [await client.next_push() for _ in range(3)] == flood[:3]
            with pytest.raises(ApixClosed):
                await client.next_push()
        await fake.client_closed.wait()
    assert fake.client_close is not None
    assert fake.client_close.code == 4009


async def test_non_json_from_server_closes_with_protocol_error(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            with pytest.raises(ApixClosed) as caught:
                await client.call("bad_json")
            assert caught.value.code == 1002


async def test_aclose_ends_pushes_quietly(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            await client.aclose(4000, "done here")
            assert [push async for push in client.pushes()] == []
            assert (client.close_code, client.close_reason) == (4000, "done here")
            with pytest.raises(ApixClosed) as caught:
                await client.ping()
            assert caught.value.code == 4000
            await client.aclose()  # idempotent
        await fake.client_closed.wait()
    assert fake.client_close is not None
    assert fake.client_close.code == 4000


async def test_leaving_the_block_closes_normally(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(fake.url, TOKEN) as client:
            await client.ping()
        assert client.close_code == 1000
        await fake.client_closed.wait()
    assert fake.client_close is not None
    assert fake.client_close.code == 1000


async def test_block_exception_propagates_unwrapped(fake: FakeServer) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(KeyError):
        async with open_client(fake.url, TOKEN):
            raise KeyError("from the block")
