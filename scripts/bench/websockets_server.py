"""Peer 1 for scripts/bench_gateway.py: a broadcast server on `websockets` (asyncio).

The minimal protocol every peer speaks (one JSON object per text frame):

- `{"op": "subscribe", "id": N}` -> the connection joins the subscriber set;
  reply `{"id": N, "ok": true}`.
- `{"op": "publish", "id": N, "data": ...}` -> the push
  `{"push": "event", "channel": "bench.x", "event": {"ts": <ms>, "data": ...}}`
  is encoded once and sent to every subscriber with `websockets.broadcast`
  (the library's recommended fan-out: no per-client await, no back-pressure);
  then reply `{"id": N, "ok": true}`.

Heartbeats: the library's own pings every BENCH_HEARTBEAT_INTERVAL seconds
(timeout BENCH_HEARTBEAT_TIMEOUT). No compression (as apix v1).

    python scripts/bench/websockets_server.py PORT
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

SUBSCRIBERS: set[ServerConnection] = set()
_dumps = json.JSONEncoder(separators=(",", ":")).encode


async def handler(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            try:
                frame = json.loads(message)
                op = frame.get("op")
                id_ = frame.get("id")
            except (ValueError, AttributeError):
                continue
            if op == "publish":
                push = _dumps(
                    {
                        "push": "event",
                        "channel": "bench.x",
                        "event": {"ts": int(time.time() * 1000), "data": frame.get("data")},
                    }
                )
                broadcast(SUBSCRIBERS, push)
                await ws.send(_dumps({"id": id_, "ok": True}))
            elif op == "subscribe":
                SUBSCRIBERS.add(ws)
                await ws.send(_dumps({"id": id_, "ok": True}))
            else:
                await ws.send(_dumps({"id": id_, "ok": False, "error": "unknown op"}))
    except ConnectionClosed:
        pass
    finally:
        SUBSCRIBERS.discard(ws)


async def main(port: int) -> None:
    interval = float(os.environ.get("BENCH_HEARTBEAT_INTERVAL", "25"))
    timeout = float(os.environ.get("BENCH_HEARTBEAT_TIMEOUT", "10"))
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        ping_interval=interval,
        ping_timeout=timeout,
        backlog=4096,
    ):
        print("listening", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
