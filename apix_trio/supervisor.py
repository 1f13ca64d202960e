"""`apix-trio serve --workers N`: N node processes sharing the ports.

Theory of operation
-------------------
One core runs one trio loop, so a machine with more cores runs more nodes.
The supervisor (this module, the process the operator started) runs no node
itself. It starts N workers, each an ordinary `apix-trio serve` process
(`--worker-of <supervisor pid>`), a full node on the same Redis with its own
node id (`<node_id>-w<index>.<generation>`): every worker listens on the same
WebSocket and HTTP ports with `SO_REUSEPORT`, and the kernel spreads new
connections across them. Nothing is shared between workers except Redis, which
is why more than one worker needs `broker.redis_url` (the configuration refuses
it otherwise, exit 2).

- Ports: a port of 0 ("pick a free one") is resolved here, once, by binding a
  `SO_REUSEPORT` socket that is never listened on (it only holds the number),
  so that every worker, and every restarted worker, gets the same port.
- A worker that exits while the supervisor is not stopping has crashed: it is
  logged (`worker_exited`) and started again after a capped backoff (reset
  once a worker has lived `STABLE_AFTER` seconds), with a new generation in its
  node id so that its predecessor's leases (presence, connection slots) still
  expire instead of being refreshed by the newcomer.
- SIGTERM/SIGINT: forwarded to every worker, which drains as a single node does
  (close 1001, `server.shutdown_grace`); the supervisor exits once all have,
  with 0 when all exited 0. A second signal is forwarded too (workers then stop
  at once).
- A worker whose supervisor disappears (SIGKILL) notices within
  `PARENT_POLL` seconds (its parent pid changes) and shuts down gracefully, so
  no orphan keeps serving.

Workers inherit the supervisor's environment and standard error, so their JSON
log lines go where the supervisor's go; each line carries its worker's node id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from apix_trio.observability.logs import get_logger
from apix_trio.settings import Settings

log = get_logger("apix.supervisor")

RESTART_BASE = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0
"""Seconds a worker must live for its restart backoff to start again from the base."""
PARENT_POLL = 1.0
"""Seconds between a worker's checks that its supervisor is still there."""


@attrs.define
class _Worker:
    index: int
    generation: int = 0
    process: trio.Process | None = None


LISTEN_BACKLOG = 1024


def reuse_port_family(host: str) -> socket.AddressFamily:
    """The address family of a listener on `host` (a literal address or a name)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """(the port every worker will use, the socket holding it or None).

    A port of 0 is resolved to a free port by binding a SO_REUSEPORT socket
    that never listens, so it receives no connections; workers bind the same
    port with SO_REUSEPORT beside it.
    """
    if port:
        return port, None
    holder = socket.socket(reuse_port_family(host), socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return int(holder.getsockname()[1]), holder


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that crashed `failures` times in a row."""
    return float(min(RESTART_MAX, RESTART_BASE * 2 ** max(failures - 1, 0)))


def worker_command(serve_args: Sequence[str], supervisor_pid: int) -> list[str]:
    """The command line of one worker: `apix-trio serve` with the operator's
    arguments, marked as a worker of `supervisor_pid`."""
    worker = ["--worker-of", str(supervisor_pid)]
    return [sys.executable, "-m", "apix_trio", "serve", *serve_args, *worker]


async def supervise(settings: Settings, serve_args: Sequence[str]) -> int:
    """Run `settings.server.workers` workers until SIGTERM/SIGINT; the exit status.

    `serve_args` are the operator's `serve` arguments (config path, flags); the
    worker count and ports are appended, so the workers see the same settings
    with `--workers 1` and concrete ports.

    Resource handling: every worker is signalled and waited for before this
    returns; the port-holding sockets are closed last.
    """
    server = settings.server
    ws_port, ws_holder = reserve_port(server.host, server.ws_port)
    http_port, http_holder = reserve_port(server.host, server.http_port)
    args = [*serve_args, "--workers", "1", "--ws-port", str(ws_port), "--http-port", str(http_port)]
    workers = [_Worker(index) for index in range(server.workers)]
    stopping = trio.Event()
    statuses: list[int] = []
    log.info(
        "supervisor_started",
        workers=len(workers),
        ws_port=ws_port,
        http_port=http_port,
        node=server.node_id,
    )
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_forward_signals, signals, workers, stopping)
                async with trio.open_nursery() as keepers:
                    for worker in workers:
                        keepers.start_soon(
                            _keep_worker, worker, args, server.node_id, stopping, statuses
                        )
                nursery.cancel_scope.cancel()
    finally:
        for holder in (ws_holder, http_holder):
            if holder is not None:
                holder.close()
    status = 0 if all(code == 0 for code in statuses) else 1
    log.info("supervisor_stopped", status=status, worker_statuses=statuses)
    return status


async def _forward_signals(
    signals: AsyncIterator[int], workers: list[_Worker], stopping: trio.Event
) -> None:
    async for signum in signals:
        log.info("signal", signal=signal.Signals(signum).name, forwarded_to=len(workers))
        stopping.set()
        for worker in workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)


async def _keep_worker(
    worker: _Worker,
    args: Sequence[str],
    node_id: str,
    stopping: trio.Event,
    statuses: list[int],
) -> None:
    """Run one worker slot: start it, restart it after a crash, until stopping."""
    failures = 0
    while not stopping.is_set():
        worker.generation += 1
        env = dict(os.environ)
        env["APIX_SERVER_NODE_ID"] = f"{node_id}-w{worker.index}.{worker.generation}"
        started_at = trio.current_time()
        # Its own session: a Ctrl-C in the operator's terminal reaches the
        # supervisor only, which forwards one SIGTERM (two would mean "stop now").
        process = await trio.lowlevel.open_process(
            worker_command(args, os.getpid()),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        worker.process = process
        log.info(
            "worker_started",
            worker=worker.index,
            generation=worker.generation,
            pid=process.pid,
            node=env["APIX_SERVER_NODE_ID"],
        )
        if stopping.is_set():  # a signal came while it was starting
            process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True):
            code = await process.wait()
        if stopping.is_set():
            statuses.append(code)
            log.info("worker_stopped", worker=worker.index, pid=process.pid, code=code)
            return
        failures = 1 if trio.current_time() - started_at >= STABLE_AFTER else failures + 1
        delay = restart_delay(failures)
        log.error(
            "worker_exited",
            worker=worker.index,
            pid=process.pid,
            code=code,
            restart_in=delay,
        )
        with trio.move_on_after(delay):
            await stopping.wait()


async def watch_parent(parent_pid: int, shutdown: trio.Event) -> None:
    """In a worker: shut down gracefully once the supervisor is gone."""
    while True:  # no event announces a parent's death: poll
        await trio.sleep(PARENT_POLL)
        if os.getppid() != parent_pid:
            break
    log.warning("supervisor_gone", supervisor_pid=parent_pid)
    shutdown.set()
