"""Redis behind Sentinel: find the master, follow it through a failover.

Theory of operation
-------------------
With `broker.redis_mode = sentinel`, `broker.redis_url` lists the sentinels
(`redis://[user:password@]h1:26379,h2:26379[/db]`; the credentials and the
database are the data servers', the sentinels are asked without them) and
`broker.sentinel_master` names the master they monitor.

`SentinelWatcher.locate` asks the sentinels in turn `SENTINEL
get-master-addr-by-name <name>` and accepts the first answer whose server
says `ROLE` master (a sentinel that has not noticed a failover yet may name
a server that is a replica now). `run` does that every `health_interval`
(with the capped backoff while nobody answers) and tells its followers when
the master changed (`redis_master_changed`, warning):

- `SentinelScripts` (the broker's ScriptBatcher): the pipeline drops its
  connection to the old master (calls on it fail with BrokerUnavailable,
  as after any connection loss: a written call may have run) and the next
  calls connect to the new one;
- the bus reader (`following.FollowingBusReader`): reconnects to the new
  master from its positions and checks that the new master has everything it
  read (ids and bus sequence numbers); until that check is done it is not
  `ok`, so the broker is not `ready` (readiness 503).

An old master that comes back is made a replica by the sentinels; writes to
it would fail with READONLY, but the watcher has moved everyone away by then
(it compares what the sentinels say with where the pipeline is connected).

Error handling: `locate` raises BrokerUnavailable when no sentinel names a
master that confirms it; `parse_sentinel_url` raises ValueError for a URL
that lists no sentinel.

Resource handling: the watcher opens one short connection per question and
closes it; `SentinelScripts.serve` runs the watcher beside its pipeline.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.resp import RedisAddress, parse_url
from apix_trio.broker.redis.support import RedisTuning, backoff_delay
from apix_trio.broker.redis.topology import ask_once
from apix_trio.observability.logs import get_logger

log = get_logger(__name__)

UNKNOWN_MASTER_PORT = 0
"""Where the broker points before any sentinel named a master: nowhere (port
0 refuses every connection), so calls fail `unavailable` and `ready` is false."""


def parse_sentinel_url(url: str) -> tuple[list[RedisAddress], RedisAddress]:
    """The sentinels' addresses (no credentials) and the template for the
    data servers (credentials, database, TLS of the URL)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels: list[RedisAddress] = []
    template: RedisAddress | None = None
    for host in hosts.split(","):
        host = host.strip()
        if not host:
            continue
        rebuilt = urllib.parse.urlunsplit(
            (parts.scheme, f"{userinfo}@{host}" if userinfo else host, parts.path, parts.query, "")
        )
        address = parse_url(rebuilt)
        if address.path is not None:
            raise ValueError("sentinels are reached over TCP (redis:// or rediss://)")
        template = template or address
        sentinels.append(attrs.evolve(address, username=None, password=None, db=0))
    if template is None:
        raise ValueError("broker.redis_url lists no sentinel (redis://h1:26379,h2:26379)")
    return sentinels, template


def unknown_master(template: RedisAddress) -> RedisAddress:
    return attrs.evolve(template, host="127.0.0.1", port=UNKNOWN_MASTER_PORT)


class SentinelWatcher:
    """Knows the current master; tells followers when it changes."""

    def __init__(
        self,
        sentinels: list[RedisAddress],
        master_name: str,
        template: RedisAddress,
        timeout: float,
        tuning: RedisTuning,
    ) -> None:
        self.master = unknown_master(template)
        self.followers: list[Callable[[RedisAddress], None]] = []
        self._sentinels = sentinels
        self._name = master_name.encode()
        self._template = template
        self._timeout = timeout
        self._tuning = tuning
        self._wanted = trio.Event()

    def request_check(self) -> None:
        """Ask the sentinels now rather than at the next interval."""
        self._wanted.set()

    async def locate(self) -> RedisAddress:
        """The master as the sentinels name it and it confirms (module docstring)."""
        problems: list[str] = []
        for sentinel in self._sentinels:
            where = f"sentinel {sentinel.host}:{sentinel.port}"
            try:
                reply = await ask_once(sentinel, self._timeout, b"SENTINEL",
                                   b"GET-MASTER-ADDR-BY-NAME", self._name)  # fmt: skip
                if not isinstance(reply, list) or len(reply) != 2:
                    problems.append(f"{where}: does not know {self._name.decode()!r}")
                    continue
                master = attrs.evolve(self._template, host=str(reply[0]), port=int(reply[1]))
                role = await ask_once(master, self._timeout, b"ROLE")
                if isinstance(role, list) and role and role[0] == "master":
                    return master
                problems.append(f"{where}: names {reply[0]}:{reply[1]}, which is not a master")
            except (BrokerUnavailable, ValueError) as exc:
                problems.append(f"{where}: {exc}")
        raise BrokerUnavailable("redis sentinel: no master found: " + "; ".join(problems))

    def _moved(self, master: RedisAddress) -> None:
        if master == self.master:
            return
        old = self.master
        self.master = master
        if old.port != UNKNOWN_MASTER_PORT:
            log.warning(
                "redis_master_changed",
                old=f"{old.host}:{old.port}",
                new=f"{master.host}:{master.port}",
            )
        for follower in self.followers:
            follower(master)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask the sentinels forever; reports started after the first round."""
        failures = 0
        started = False
        while True:
            try:
                self._moved(await self.locate())
            except BrokerUnavailable as exc:
                if failures == 0:
                    log.warning("redis_sentinel_no_master", reason=str(exc))
                failures += 1
            else:
                failures = 0
            if not started:
                started = True
                task_status.started()
            if failures:
                delay = backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
            else:
                delay = self._tuning.health_interval
            self._wanted = trio.Event()
            with trio.move_on_after(delay):
                await self._wanted.wait()


class SentinelScripts(ScriptBatcher):
    """The pipeline on whichever server the sentinels name master."""

    def __init__(
        self, watcher: SentinelWatcher, timeout: float, wait_replicas: int, tuning: RedisTuning
    ) -> None:
        super().__init__("redis://", timeout, wait_replicas, tuning)
        self._address = watcher.master
        self.watcher = watcher
        self._connected: trio.CancelScope | None = None
        watcher.followers.append(self.retarget)

    def retarget(self, address: RedisAddress) -> None:
        """Send the next calls to `address`; drop the connection to the old one."""
        self._address = address
        if self._connected is not None:
            self._connected.cancel()

    async def _run_connection(self, connection: Any) -> None:
        with trio.CancelScope() as scope:
            self._connected = scope
            try:
                await super()._run_connection(connection)
            except BrokerUnavailable:
                self.watcher.request_check()
                raise
            finally:
                self._connected = None
        raise BrokerUnavailable("the Redis master changed (sentinel)")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The watcher and the pipeline (`ScriptBatcher.serve`)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.watcher.run)
            await super().serve(task_status=task_status)
            nursery.cancel_scope.cancel()

