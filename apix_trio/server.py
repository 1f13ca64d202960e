"""`apix-trio serve`: the nursery tree of one node.

```
serve(settings)
├── broker (its own nursery: Redis readers and batchers, or nothing)
├── services nursery
│   ├── signals          SIGTERM/SIGINT -> graceful shutdown; SIGHUP -> reload keys
│   ├── key watcher      reloads key files when they change
│   ├── timers           every connection's heartbeat/auth/token timers (gateway/timers.py)
│   ├── write coalescer  one socket write per connection per tick (gateway/coalesce.py)
│   ├── session keeper   session records: periodic and final writes (delivery/sessions.py)
│   ├── group manager    one reader per (org, channel, group) with local members
│   │                    (delivery/groups.py, group_reader.py); releases their events on exit
│   ├── directory keeper this node's connections in the cluster-wide directory
│   │                    (gateway/directory.py); releases its node leases on exit
│   ├── presence         node lease, reaper of dead nodes' members, leave writer
│   │                    (delivery/presence.py); writes the queued leaves on exit
│   ├── audit writer     batches of audit entries -> the org trails (observability/audit.py)
│   ├── latency sharing  per-org latency snapshots -> the broker (observability/latency.py)
│   ├── delivery canary  readiness: an internal event must come back (delivery/canary.py)
│   └── http api         hypercorn: health, readiness, metrics, server API
└── connections nursery  outlives the accept loop (graceful drain)
    ├── accept loop      one per listener, handler nursery = connections nursery
    └── one Connection.run per socket (the reader; op worker and writer on demand)
```

Shutdown: stop accepting (readiness turns false, the listeners close), write
every session record (a client told 1001 resumes on another node at once),
ask every connection to close with 1001, give the connections nursery
`server.shutdown_grace` seconds, write the connections' final session
records (within the same grace), then cancel the services. Every publish that
got an id is already in the broker, so nothing acknowledged is lost.
"""

from __future__ import annotations

import errno
import functools
import gc
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from apix_trio.auth.keys import KeyLoadError, KeyStore, Verifier
from apix_trio.broker.events import Broker
from apix_trio.commands.dispatch import run_command
from apix_trio.gateway.handshake import handle_stream
from apix_trio.gateway.hub import Hub
from apix_trio.gateway.tls import TlsConfigError, server_ssl_context
from apix_trio.http.api import make_app
from apix_trio.observability.logs import bind_process_fields, get_logger
from apix_trio.protocol.codes import CloseCode
from apix_trio.settings import Settings
from apix_trio.supervisor import LISTEN_BACKLOG, reuse_port_family, watch_parent

KEY_POLL_INTERVAL = 2.0
log = get_logger("apix.server")


@asynccontextmanager
async def open_broker(
    settings: Settings, *, wall_clock: Callable[[], float] = time.time
) -> AsyncIterator[Broker]:
    """The broker the settings ask for: Redis when `broker.redis_url` is set."""
    if settings.broker.redis_url:
        from apix_trio.broker.redis.events import open_redis_broker

        async with open_redis_broker(settings) as broker:
            yield broker
    else:
        from apix_trio.broker.memory.events import open_memory_broker

        async with open_memory_broker(wall_clock=wall_clock) as broker:
            yield broker


@attrs.define
class RunningServer:
    """What `serve` reports once it listens; `shutdown()` starts a graceful stop."""

    ws_port: int
    http_port: int
    hub: Hub
    _shutdown: trio.Event

    def shutdown(self) -> None:
        self._shutdown.set()


async def serve(
    settings: Settings,
    *,
    wall_clock: Callable[[], float] = time.time,
    handle_signals: bool = False,
    keys: KeyStore | None = None,
    worker_of: int | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until `shutdown()` (or SIGTERM/SIGINT with `handle_signals`).

    With `worker_of` (the supervisor's pid, `apix_trio.supervisor`), the node
    is one of several workers: its listeners share their ports with the other
    workers (SO_REUSEPORT), and it shuts down gracefully when the supervisor
    is gone.

    Resource handling: every listener, connection and broker connection is
    closed before this returns.
    Error handling: KeyLoadError (unusable key files) and TlsConfigError
    (unusable `server.tls_cert`/`server.tls_key`) are raised before anything
    listens.
    """
    ssl_context = server_ssl_context(settings.server)
    if keys is None:
        keys = KeyStore(settings.auth)
    verifier = Verifier(settings.auth, keys)
    if keys.dev_mode:
        log.warning(
            "dev_keys",
            dev_key_dir=settings.auth.dev_key_dir,
            message="no auth.public_keys configured: using the development key pair",
        )
    if settings.auth.hmac_secret:
        log.warning("hmac_enabled", message="HS256 tokens are accepted (development only)")
    shutdown = trio.Event()
    async with open_broker(settings, wall_clock=wall_clock) as broker:
        hub = Hub(
            settings=settings,
            broker=broker,
            verifier=verifier,
            wall_clock=wall_clock,
            commands=run_command,
        )
        async with trio.open_nursery() as services:
            if handle_signals:
                services.start_soon(_watch_signals, shutdown, keys, hub)
            services.start_soon(_watch_key_files, keys)
            await services.start(hub.timers.serve)
            await services.start(hub.coalescer.serve)
            if worker_of is not None:
                services.start_soon(watch_parent, worker_of, shutdown)
            reuse_port = worker_of is not None
            http_port = await services.start(functools.partial(_serve_http, hub, reuse_port))
            await services.start(hub.sessions.serve)
            await services.start(hub.groups.run)
            await services.start(hub.slots.run)
            await services.start(hub.directory.run)
            await services.start(hub.presence.run)
            await services.start(hub.audit.serve)
            await services.start(hub.latency.serve)
            await services.start(hub.canary.serve)
            async with trio.open_nursery() as connections:
                tcp_listeners = await _open_listeners(
                    settings.server.host, settings.server.ws_port, reuse_port=reuse_port
                )
                ws_port = tcp_listeners[0].socket.getsockname()[1]
                listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp_listeners)
                if ssl_context is not None:  # wss://
                    listeners = [
                        trio.SSLListener(listener, ssl_context, https_compatible=True)
                        for listener in tcp_listeners
                    ]
                accept_scope = trio.CancelScope()
                connections.start_soon(_accept, accept_scope, hub, listeners, connections)
                log.info(
                    "listening",
                    host=settings.server.host,
                    ws_port=ws_port,
                    ws_path=settings.server.ws_path,
                    http_port=http_port,
                    tls=ssl_context is not None,
                    broker="redis" if settings.broker.redis_url else "memory",
                    node=settings.server.node_id,
                    keys=list(keys.kids()),
                )
                task_status.started(RunningServer(ws_port, http_port, hub, shutdown))
                await shutdown.wait()
                log.info("shutting_down", connections=len(hub.registry))
                hub.accepting = False
                accept_scope.cancel()
                deadline = trio.current_time() + settings.server.shutdown_grace
                # Sessions first: a client told 1001 resumes elsewhere at once.
                with trio.move_on_after(settings.server.shutdown_grace / 4):
                    await hub.sessions.flush()
                for conn in hub.registry:
                    conn.request_close(CloseCode.GOING_AWAY)
                    # A write to a peer that stopped reading is shielded;
                    # only its own deadline can end it within the grace.
                    conn.cut_writes_at(deadline)
                connections.cancel_scope.deadline = deadline
            with trio.move_on_at(deadline):
                await hub.sessions.flush()  # the final records of the closed connections
            services.cancel_scope.cancel()
    log.info("stopped")


ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept(2) errors that mean the system is overloaded: wait, then go on."""
ACCEPT_RETRY = 0.1


async def _accept(
    scope: trio.CancelScope,
    hub: Hub,
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    handler_nursery: trio.Nursery,
) -> None:
    """`trio.serve_listeners`, minus its per-connection wrapper: each accepted
    stream's task is `handle_stream` itself, which closes the stream (one
    coroutine frame less on every idle connection, and no second, forced
    close of every stream with a cancelled scope)."""
    with scope:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_serve_listener, hub, listener, handler_nursery)
    for listener in listeners:
        await listener.aclose()


ACCEPT_BATCH = 64
"""Connections a plain TCP listener takes from its backlog per wake-up."""
IGNORABLE_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
"""accept(2) errors about one connection that went away: take the next one
(`trio.SocketListener.accept` ignores the same)."""


async def _serve_listener(
    hub: Hub, listener: trio.abc.Listener[trio.abc.Stream], handler_nursery: trio.Nursery
) -> None:
    if type(listener) is trio.SocketListener:
        await _serve_socket(hub, listener.socket, handler_nursery)
        return
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            await _wait_out_overload(exc)
        else:
            handler_nursery.start_soon(handle_stream, hub, stream)


async def _wait_out_overload(exc: OSError) -> None:
    """After a failed accept(2): re-raise `exc` unless it says the system is
    overloaded (ACCEPT_CAPACITY_ERRNOS); then log it and wait ACCEPT_RETRY."""
    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
        raise exc
    log.error("accept_failed", error=errno.errorcode[exc.errno], retry_in=ACCEPT_RETRY)
    await trio.sleep(ACCEPT_RETRY)


async def _serve_socket(
    hub: Hub, listening: trio.socket.SocketType, handler_nursery: trio.Nursery
) -> None:
    """The accept loop of a plain TCP listener: every connection waiting in
    the backlog (up to ACCEPT_BATCH) per wake-up, then one checkpoint, where
    `SocketListener.accept` passes through the scheduler once per connection
    (and twice when the backlog is empty). The streams are the same
    `trio.SocketStream`s. The listener stays trio's: it is closed by its owner
    (`_accept`), after this loop was cancelled."""
    fd = listening.fileno()
    # A second Python object on the listener's descriptor, for non-blocking
    # accept(2) calls without trio's per-call checkpoints; detached, never closed.
    raw = socket.socket(listening.family, listening.type, listening.proto, fileno=fd)
    try:
        while True:
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _address = raw.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    break
                except OSError as exc:
                    if exc.errno in IGNORABLE_ACCEPT_ERRNOS:
                        continue
                    await _wait_out_overload(exc)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                handler_nursery.start_soon(handle_stream, hub, stream)
            else:  # a full batch: let the new connections run before taking more
                await trio.lowlevel.checkpoint()
    finally:
        raw.detach()


async def _open_listeners(
    host: str, port: int, *, reuse_port: bool
) -> list[trio.SocketListener]:
    """TCP listeners on (host, port); with `reuse_port`, one SO_REUSEPORT socket
    that shares the port with the other workers' (the kernel spreads
    connections across them)."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    sock = trio.socket.socket(reuse_port_family(host), trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


def _shared_http_bind(host: str, port: int) -> str:
    """A hypercorn bind (`fd://N`) for a SO_REUSEPORT socket on (host, port)."""
    sock = socket.socket(reuse_port_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return f"fd://{sock.detach()}"  # hypercorn owns the descriptor from here


async def _serve_http(hub: Hub, reuse_port: bool, *, task_status: trio.TaskStatus[int]) -> None:
    """Serve the internal HTTP API until cancelled; reports the bound port."""
    config = HypercornConfig()
    host, port = hub.settings.server.host, hub.settings.server.http_port
    config.bind = [_shared_http_bind(host, port) if reuse_port else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    if hub.settings.server.tls_cert:  # https://
        config.certfile = hub.settings.server.tls_cert
        config.keyfile = hub.settings.server.tls_key
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(hypercorn_serve, make_app(hub), config, mode="asgi")  # type: ignore[arg-type]
        )
        task_status.started(port if reuse_port else int(binds[0].rsplit(":", 1)[1]))


async def _watch_signals(shutdown: trio.Event, keys: KeyStore, hub: Hub) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                _reload_keys(keys, "sighup")
            elif shutdown.is_set():
                log.warning("second_signal", signal=signum)
                now = trio.current_time()
                for conn in hub.registry:
                    conn.cut_writes_at(now)  # cut shielded writes to stalled peers
                raise KeyboardInterrupt  # a second SIGTERM/SIGINT: stop now
            else:
                log.info("signal", signal=signal.Signals(signum).name)
                shutdown.set()


def _reload_keys(keys: KeyStore, why: str) -> None:
    try:
        keys.reload()
    except Exception as exc:
        log.error("keys_reload_failed", why=why, error=str(exc))
    else:
        log.info("keys_reloaded", why=why, keys=list(keys.kids()))


async def _watch_key_files(keys: KeyStore) -> None:
    while True:
        await trio.sleep(KEY_POLL_INTERVAL)
        if keys.changed():
            _reload_keys(keys, "file_changed")


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    Every connection holds hundreds of long-lived container objects (tasks,
    cancel scopes, coroutines), and CPython's default thresholds made full
    collections of them a third to half of the server's CPU under fan-out
    load (docs/benchmarks.md). Objects alive after start-up are frozen out of
    collection, and the young generation is collected 100x less often;
    reference counting still frees almost everything at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 50, 100)


def run(settings: Settings, *, worker_of: int | None = None) -> int:
    """Run the server in this process until SIGTERM/SIGINT; returns the exit code.

    2 when the key files or the TLS certificate and key are unusable (like
    any other configuration problem), 1 when a port cannot be bound, else 0.
    `worker_of`: see `serve`.
    """
    try:
        keys = KeyStore(settings.auth)
    except KeyLoadError as exc:
        print(f"apix-trio: config: auth.public_keys: {exc}", file=sys.stderr)
        return 2
    if worker_of is not None:
        bind_process_fields(node=settings.server.node_id)  # workers share one stderr
    try:
        server_ssl_context(settings.server)
    except TlsConfigError as exc:
        print(f"apix-trio: config: server.tls_cert: {exc}", file=sys.stderr)
        return 2
    status = 0
    # Errors raised inside serve's nurseries arrive in exception groups.
    _tune_gc()
    try:
        trio.run(lambda: serve(settings, handle_signals=True, keys=keys, worker_of=worker_of))
    except* KeyboardInterrupt:
        pass  # a second SIGTERM/SIGINT (or one before the handlers are installed)
    except* OSError as group:
        log.error("cannot_listen", error=str(_first_leaf(group)))
        status = 1
    return status


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
