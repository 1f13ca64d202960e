"""Hostile sockets against a running in-process server.

Two hundred connections, each built from a seeded `random.Random`, send what a
broken or malicious client might: garbage instead of an HTTP request, random
bytes after the handshake, invalid UTF-8, valid and invalid fragmentation,
oversize and binary frames, random JSON, truncated frames and a hang-up,
ping floods, close frames with invalid codes. Frames are built by hand
(masked, as a client must, except where the mask is the fault).

Each case states which outcomes are acceptable (an HTTP status, a close
code, or "eof" where the client hung up itself or half-closed into a frame
the server was still waiting for), and then:

- the server logged no `connection_crashed` / `op_failed` and no error;
- the registry, the router, the per-org counts and the connection and
  subscription gauges are back to zero;
- a well-behaved client kept working throughout (a publish/subscribe round
  trip after every batch of cases, and at the end).
"""

from __future__ import annotations

import io
import itertools
import json
import random
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from apix_trio.observability.logs import configure_logging
from tests.checks import assert_hub_idle, sample, sum_closes
from tests.memws import MemClient
from tests.serverkit import Kit, running_server

pytestmark = pytest.mark.timeout(60)

SEED = 20251125
CASES = 200
BATCH = 20  # cases run concurrently; a good-client round trip between batches
CASE_TIMEOUT = 15.0
MAX_MESSAGE = 4096
BAD_FRAMES = 3

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
PROTOCOL_ERROR, UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG = 1002, 1003, 1007, 1008, 1009


# -- frames by hand ------------------------------------------------------------


def frame(
    rng: random.Random,
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame; `length` overrides the declared payload length."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    key = rng.randbytes(4)
    return header + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def split(rng: random.Random, data: bytes, parts: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), parts - 1)) if len(data) > parts else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def fragmented(rng: random.Random, payload: bytes, parts: int) -> list[bytes]:
    chunks = split(rng, payload, parts)
    frames = []
    for index, chunk in enumerate(chunks):
        opcode = TEXT if index == 0 else CONTINUATION
        frames.append(frame(rng, opcode, chunk, fin=index == len(chunks) - 1))
    return frames


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 7, 2**53, 2**70, 1.5, -0.0])
    if kind == 3:
        return "".join(rng.choice('ab.>*{}:\u00e9\u2603 \\"') for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice(["chat.a", "fuzz.x", "user.alice", "", "a..b", "0", "0-0", "1-1"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["op", "id", "channel", "data", "since", "key", "limit", "x"]): random_json(
            rng, depth + 1
        )
        for _ in range(rng.randrange(5))
    }


OPS = ["ping", "publish", "subscribe", "unsubscribe", "history", "refresh", "auth", "nope", 7]


def random_op(rng: random.Random, frame_id: int) -> bytes:
    """Mostly well-shaped ops with random fields, sometimes anything at all."""
    if rng.random() < 0.2:
        text = json.dumps(random_json(rng), ensure_ascii=False).encode()
        return text if rng.random() < 0.8 else text[:-1]
    body: dict[str, Any] = {"op": rng.choice(OPS), "id": frame_id}
    for name in rng.sample(["channel", "data", "since", "key", "limit", "token"], 3):
        if rng.random() < 0.5:
            body[name] = random_json(rng)
    if body["op"] in ("publish", "subscribe", "history") and rng.random() < 0.6:
        body["channel"] = rng.choice(["fuzz.a", "fuzz.b", "small.c"])
    return json.dumps(body, ensure_ascii=False).encode()  # orjson refuses ints past 64 bits


# -- one raw connection ----------------------------------------------------------


@attrs.define
class Outcome:
    http_status: int | None = None
    close_code: int | None = None
    replies: list[dict[str, Any]] = attrs.field(factory=list)
    pongs: list[bytes] = attrs.field(factory=list)

    def label(self) -> str:
        if self.http_status is not None:
            return f"http:{self.http_status}"
        if self.close_code is not None:
            return f"close:{self.close_code}"
        return "eof"


class RawPeer:
    """A TCP connection that writes whatever it is told and parses what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.outcome = Outcome()
        self.opened = False

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server already hung up: what it said before is what counts

    async def handshake(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        request = Request(host="fuzz", target="/ws", extra_headers=headers or [])
        await self.send(self.ws.send(request))
        while not self.opened:
            data = await self._receive()
            assert data, "the server hung up during a valid handshake"
            self.ws.receive_data(data)
            for event in self.ws.events():
                assert isinstance(event, AcceptConnection), event
                self.opened = True

    async def half_close(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""  # reset by the server

    async def read_http_status(self) -> Outcome:
        """Everything the server says before it closes; its HTTP status line."""
        data = b""
        while chunk := await self._receive():
            data += chunk
        if data.startswith(b"HTTP/1.1 "):
            self.outcome.http_status = int(data[9:12])
        return self.outcome

    async def read_to_end(self, *, until: Callable[[Outcome], bool] | None = None) -> Outcome:
        """Parse server frames until EOF (or `until` holds), noting the close code."""
        while until is None or not until(self.outcome):
            data = await self._receive()
            if not data:
                break
            if self.outcome.close_code is not None:
                continue  # after the close frame, only EOF matters
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    reply = orjson.loads(event.data)
                    assert isinstance(reply, dict), reply
                    self.outcome.replies.append(reply)
                elif isinstance(event, Pong):
                    self.outcome.pongs.append(bytes(event.payload))
                elif isinstance(event, CloseConnection):
                    self.outcome.close_code = int(event.code)
                elif isinstance(event, Ping):
                    pass
                else:
                    raise AssertionError(f"unexpected event from the server: {event!r}")
        return self.outcome

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- the cases --------------------------------------------------------------------


@attrs.define
class Case:
    name: str
    expected: frozenset[str]
    run: Callable[[RawPeer, random.Random, str], Any]  # async, returns Outcome | None
    connects: bool = True  # False: the case opens no WebSocket


async def _authenticate(peer: RawPeer, rng: random.Random, token: str) -> None:
    payload = orjson.dumps({"op": "auth", "id": 0, "token": token})
    parts = fragmented(rng, payload, rng.randrange(1, 4))
    await peer.send(b"".join(parts))
    outcome = await peer.read_to_end(until=lambda o: bool(o.replies))
    assert outcome.replies and outcome.replies[-1]["ok"], outcome


async def _finish(peer: RawPeer, rng: random.Random, code: int = 1000) -> Outcome:
    await peer.send(frame(rng, CLOSE, close_payload(code)))
    return await peer.read_to_end()


async def case_garbage_request(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    junk = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 2000)))
    await peer.send(junk.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n\r\n")
    return await peer.read_http_status()


async def case_bad_upgrade(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    variants = [
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # not an upgrade
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + key
        + b"Sec-WebSocket-Version: 8\r\n\r\n",  # wrong version
        b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /ws HTTP/1.0\r\n\r\n",
    ]
    await peer.send(rng.choice(variants))
    return await peer.read_http_status()


async def case_wrong_path(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    request = Request(host="fuzz", target=rng.choice(["/", "/wsx", "/ws/x", "/%00"]))
    await peer.send(peer.ws.send(request))
    return await peer.read_http_status()


async def case_truncated_request(peer: RawPeer, rng: random.Random, token: str) -> None:
    request = Request(host="fuzz", target="/ws")
    data = peer.ws.send(request)
    await peer.send(data[: rng.randrange(1, len(data))])


async def case_random_bytes(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    if rng.random() < 0.5:
        await _authenticate(peer, rng, token)
    await peer.send(rng.randbytes(rng.randrange(1, 3000)))
    await peer.half_close()  # so a frame the server still waits for ends in EOF
    return await peer.read_to_end()


async def case_reserved_bits_or_opcode(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    if rng.random() < 0.5:
        data = frame(rng, TEXT, b'{"op":"ping","id":1}', rsv=rng.randrange(1, 8))
    else:
        data = frame(rng, rng.choice([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xF]), b"x")
    await peer.send(data)
    return await peer.read_to_end()


async def case_unmasked(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    await peer.send(frame(rng, TEXT, b'{"op":"ping","id":1}', masked=False))
    return await peer.read_to_end()


async def case_invalid_utf8(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    payload = b'{"op":"ping","id":1,"x":"' + bad + b'"}'
    if rng.random() < 0.5:
        await peer.send(frame(rng, TEXT, payload))
    else:
        await peer.send(b"".join(fragmented(rng, payload, 3)))
    return await peer.read_to_end()


async def case_fragmented_valid(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    await _authenticate(peer, rng, token)
    payload = orjson.dumps({"op": "ping", "id": 42, "pad": "p" * rng.randrange(200)})
    parts = fragmented(rng, payload, rng.randrange(2, 6))
    if rng.random() < 0.5:  # a control frame may come between fragments
        parts.insert(1, frame(rng, PING, b"mid"))
    await peer.send(b"".join(parts))
    outcome = await peer.read_to_end(until=lambda o: any(r.get("id") == 42 for r in o.replies))
    assert {"id": 42, "ok": True, "result": {}} in outcome.replies, outcome
    return await _finish(peer, rng)


async def case_fragmented_invalid(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    choice = rng.randrange(3)
    if choice == 0:  # a continuation with nothing to continue
        data = frame(rng, CONTINUATION, b'{"op":"ping"}')
    elif choice == 1:  # a new data frame in the middle of a fragmented one
        data = frame(rng, TEXT, b'{"op":', fin=False) + frame(rng, TEXT, b'"ping"}')
    else:  # a fragmented control frame
        data = frame(rng, PING, b"a", fin=False) + frame(rng, CONTINUATION, b"b")
    await peer.send(data)
    return await peer.read_to_end()


async def case_oversize(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    size = MAX_MESSAGE + rng.randrange(1, 3000)
    payload = b'{"op":"ping","id":1,"pad":"' + b"o" * size + b'"}'
    choice = rng.randrange(3)
    if choice == 0:
        data = frame(rng, TEXT, payload)
    elif choice == 1:  # each fragment small, the message too big
        data = b"".join(fragmented(rng, payload, rng.randrange(2, 8)))
    else:  # a length far beyond what is sent: the limit must trip on what arrives
        data = frame(rng, TEXT, payload, length=2**40)
    await peer.send(data)
    return await peer.read_to_end()


async def case_oversize_control(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    await peer.send(frame(rng, PING, b"x" * 126))  # control frames carry at most 125
    return await peer.read_to_end()


async def case_binary(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    if rng.random() < 0.5:
        await _authenticate(peer, rng, token)
    await peer.send(
        frame(rng, BINARY, rng.randbytes(rng.randrange(0, 300)), fin=rng.random() < 0.7)
    )
    return await peer.read_to_end()


async def case_random_json(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    if rng.random() < 0.7:
        await _authenticate(peer, rng, token)
    for frame_id in range(1, rng.randrange(2, 30)):
        await peer.send(frame(rng, TEXT, random_op(rng, frame_id)))
    return await _finish(peer, rng)


async def case_truncated_then_hang_up(peer: RawPeer, rng: random.Random, token: str) -> None:
    await peer.handshake()
    if rng.random() < 0.5:
        await _authenticate(peer, rng, token)
        subscribe = orjson.dumps({"op": "subscribe", "id": 5, "channel": "fuzz.hangup"})
        await peer.send(frame(rng, TEXT, subscribe))
    whole = frame(rng, TEXT, orjson.dumps({"op": "ping", "id": 9, "pad": "t" * 200}))
    await peer.send(whole[: rng.randrange(1, len(whole))])
    # The caller closes the socket without reading anything.


async def case_ping_flood(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    payloads = [rng.randbytes(rng.randrange(0, 126)) for _ in range(rng.randrange(100, 400))]
    await peer.send(b"".join(frame(rng, PING, payload) for payload in payloads))
    outcome = await _finish(peer, rng)
    assert outcome.pongs == payloads
    return outcome


async def case_bad_close(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    choice = rng.randrange(3)
    if choice == 0:
        code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999, 5000, 65535])
        payload = close_payload(code)
    elif choice == 1:
        payload = b"\x03"  # one byte: half a code
    else:
        payload = close_payload(1000, b"bad \xff reason")
    await peer.send(frame(rng, CLOSE, payload))
    return await peer.read_to_end()


async def case_good_close(peer: RawPeer, rng: random.Random, token: str) -> Outcome:
    await peer.handshake()
    code = rng.choice([1000, 1001, 3000, 4000, 4999])
    outcome = await _finish(peer, rng, code)
    assert outcome.close_code == code  # echoed
    return outcome


def _codes(*codes: int) -> frozenset[str]:
    return frozenset(f"close:{code}" for code in codes)


CASE_KINDS: list[Case] = [
    Case("garbage_request", frozenset({"http:400"}), case_garbage_request, connects=False),
    Case("bad_upgrade", frozenset({"http:400"}), case_bad_upgrade, connects=False),
    Case("wrong_path", frozenset({"http:404"}), case_wrong_path, connects=False),
    Case("truncated_request", frozenset({"hangup"}), case_truncated_request, connects=False),
    # The server closes on a protocol fault, or sees our half-close first; a
    # random frame may also be well-formed JSON that gets replies.
    Case(
        "random_bytes",
        _codes(PROTOCOL_ERROR, UNSUPPORTED, INVALID_DATA, POLICY, TOO_BIG, 1000) | {"eof"},
        case_random_bytes,
    ),
    Case("reserved_bits_or_opcode", _codes(PROTOCOL_ERROR), case_reserved_bits_or_opcode),
    Case("unmasked", _codes(PROTOCOL_ERROR), case_unmasked),
    Case("invalid_utf8", _codes(INVALID_DATA), case_invalid_utf8),
    Case("fragmented_valid", _codes(1000), case_fragmented_valid),
    Case("fragmented_invalid", _codes(PROTOCOL_ERROR), case_fragmented_invalid),
    Case("oversize", _codes(TOO_BIG), case_oversize),
    Case("oversize_control", _codes(PROTOCOL_ERROR), case_oversize_control),
    Case("binary", _codes(UNSUPPORTED), case_binary),
    # Random ops may include a bad `auth` before authentication (4001).
    Case("random_json", _codes(1000, POLICY, 4001), case_random_json),
    Case("truncated_then_hang_up", frozenset({"hangup"}), case_truncated_then_hang_up),
    Case("ping_flood", _codes(1000), case_ping_flood),
    Case("bad_close", _codes(PROTOCOL_ERROR, INVALID_DATA), case_bad_close),
    Case("good_close", _codes(1000, 1001, 3000, 4000, 4999), case_good_close),
]


async def run_case(kit: Kit, index: int, token: str, results: list[tuple[str, str]]) -> None:
    rng = random.Random(SEED * 1000 + index)
    case = CASE_KINDS[index % len(CASE_KINDS)]
    with trio.fail_after(CASE_TIMEOUT):
        peer = await RawPeer.connect(kit.running.ws_port)
        try:
            outcome = await case.run(peer, rng, token)
        finally:
            await peer.aclose()
    label = "hangup" if outcome is None else outcome.label()
    assert label in case.expected, f"case {index} {case.name}: {label}, {outcome}"
    results.append((case.name, label))


# -- the good client ------------------------------------------------------------------


async def good_round_trip(good: MemClient, n: int) -> None:
    """Publish on the good client's own channel; see the reply and the event."""
    await good.send({"op": "publish", "id": 1000 + n, "channel": "fuzz.good", "data": {"n": n}})
    reply: dict[str, Any] | None = None
    event: dict[str, Any] | None = None
    while reply is None or event is None:
        frame_ = await good.recv()
        assert frame_ is not None, f"the good client was closed with {good.close_code}"
        if frame_.get("push") == "event":
            event = frame_["event"]
        elif frame_.get("id") == 1000 + n:
            reply = frame_
    assert reply["ok"], reply
    assert event["id"] == reply["result"]["id"]
    assert event["data"] == {"n": n}


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    yield stream
    configure_logging("info", "json")


async def test_hostile_sockets_never_crash_the_server(tmp_path, server_log):
    async with running_server(
        tmp_path,
        limits={
            "max_message_bytes": MAX_MESSAGE,
            "bad_frames": BAD_FRAMES,
            "ops_per_second": 1e6,
        },
    ) as kit:
        hub = kit.hub
        metrics = hub.metrics
        token = kit.token("acme", "fuzzer")
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect(("127.0.0.1", kit.running.ws_port))
        good = MemClient(trio.SocketStream(sock))
        await good.handshake([])
        reply = await good.call("auth", token=kit.token("acme", "good"))
        assert reply["ok"], reply
        assert (await good.call("subscribe", channel="fuzz.good"))["ok"]

        results: list[tuple[str, str]] = []
        with trio.fail_after(45):
            for start in range(0, CASES, BATCH):
                async with trio.open_nursery() as nursery:
                    for index in range(start, min(start + BATCH, CASES)):
                        nursery.start_soon(run_case, kit, index, token, results)
                await good_round_trip(good, start)
            await good_round_trip(good, CASES)

            # Every hostile connection is gone (the hang-ups included, once the
            # server has seen their EOF); then the good client leaves too.
            await trio.testing.wait_all_tasks_blocked()
            assert len(hub.registry) == 1
            await good.stream.aclose()
            await trio.testing.wait_all_tasks_blocked()

        assert len(results) == CASES
        assert {name for name, _ in results} == {case.name for case in CASE_KINDS}
        assert_hub_idle(hub)
        # Exactly one WebSocket per case that opens one (plus the good client),
        # each closed exactly once.
        websockets = 1 + sum(CASE_KINDS[i % len(CASE_KINDS)].connects for i in range(CASES))
        assert sample(metrics, "apix_connections_accepted_total") == websockets
        assert sum_closes(metrics) == websockets

    lines = [orjson.loads(line) for line in server_log.getvalue().splitlines()]
    events = {line["event"] for line in lines}
    assert "connection_crashed" not in events
    assert "op_failed" not in events
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    close_codes = {line["code"] for line in lines if line["event"] == "close"}
    assert close_codes <= {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 3000, 4000, 4001, 4999}
