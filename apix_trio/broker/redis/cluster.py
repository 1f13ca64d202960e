"""Script calls on a Redis Cluster: each to the master owning its keys' slot.

Theory of operation
-------------------
`ClusterScripts` is the broker's `ScriptBatcher` on a cluster: the same
`call(script, keys, args, write=...)`, so groups, sessions, leases (and any
other module adding scripts) run on a cluster unchanged, as long as every
script's keys share one hash slot (`keys`). It holds one plain
`ScriptBatcher` per master (`_NodeScripts`: one pipelined connection each,
with its own NOSCRIPT reloads and its own `WAIT` for
`broker.publish_wait_replicas`, which counts that master's replicas) and
routes each call by the slot of its first key through the current
`topology.SlotMap`:

- `MOVED`: the slot lives on another master now. The map is refreshed and
  the call sent again (it did not run), to the new owner or, while the map
  does not know it yet, to the node the redirection named.
- `ASK` (a slot being migrated, the key already on the target): `ASKING` and
  the call go to the target together, on a short-lived connection of their
  own (migrations are rare; the target's pipeline must not carry ASKING
  ahead of unrelated calls).
- `TRYAGAIN` (a call whose keys a migration has split between two masters,
  or that would create keys in a slot being imported): it did not run; it
  is sent again after a short backoff (20 ms doubling, at most 0.5 s) until
  the migration is done or the caller's time is up.
- a master that fails (refused, reset, silent): its calls fail with
  `BrokerUnavailable` within `broker.operation_timeout` as on one server
  (they are not resent: one that was written may have run), and the map is
  refreshed at once; after a replica took over, the next calls go to it.

The supervisor (`serve_health`) refreshes the slot map every
`health_interval` (asking the nodes it knows in turn, so the node named in
the URL may die) and PINGs every master through its pipeline; `healthy`
is true while the map covers all 16384 slots and every master answered.
While not, it retries with the capped backoff. `on_map` listeners (the bus
readers) hear of every new map.

Resource handling: `serve` owns a nursery running every master's pipeline;
all are closed when it is cancelled, failing calls still on them.

Error handling: as `ScriptBatcher.call`; redirections are followed at most
`MAX_REDIRECTS` times within the caller's `operation_timeout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import (
    BatchStatistics,
    ScriptBatcher,
    fence_command,
    too_few_replicas,
    wait_command,
)
from apix_trio.broker.redis.keys import hash_slot
from apix_trio.broker.redis.resp import RedisAddress, ReplyError, open_connection
from apix_trio.broker.redis.scripts import Script
from apix_trio.broker.redis.support import RedisTuning, backoff_delay, pack_command
from apix_trio.broker.redis.topology import (
    EMPTY_MAP,
    SlotMap,
    describe_map,
    fetch_slot_map,
    node_address,
    parse_redirect,
)
from apix_trio.observability.logs import get_logger

log = get_logger(__name__)

MAX_REDIRECTS = 5
TRYAGAIN_DELAY = 0.02
TRYAGAIN_CAP = 0.5
"""Backoff (s) before resending a call that met TRYAGAIN (a migration in progress)."""
REFRESH_MIN_INTERVAL = 0.1
"""Seconds between two slot map refreshes asked for by failures."""


class _NodeScripts(ScriptBatcher):
    """The pipeline to one master (a ScriptBatcher on a fixed address)."""

    def __init__(
        self, address: RedisAddress, timeout: float, wait_replicas: int, tuning: RedisTuning
    ) -> None:
        super().__init__("redis://", timeout, wait_replicas, tuning)
        self._address = address


class ClusterScripts(ScriptBatcher):
    """`ScriptBatcher` on a Redis Cluster; see the module docstring.

    A ScriptBatcher by type (every module takes one) that keeps no pipeline
    of its own: its state is one `_NodeScripts` per master.
    """

    def __init__(
        self,
        seed: RedisAddress,
        timeout: float,
        wait_replicas: int,
        tuning: RedisTuning,
        *,
        slot_map: SlotMap = EMPTY_MAP,
    ) -> None:
        # No super().__init__: nothing of the single-connection pipeline is used.
        self._seed = seed
        self._timeout = timeout
        self._wait_replicas = wait_replicas
        self._tuning = tuning
        self.slot_map = slot_map
        self.on_map: list[Callable[[SlotMap], None]] = []
        self._nodes: dict[RedisAddress, _NodeScripts] = {}
        self._nursery: trio.Nursery | None = None
        self._refresh_wanted = trio.Event()
        self._closed = False
        self._healthy = False
        self._redirects = 0

    # `healthy` is an attribute of ScriptBatcher; here it is kept by the supervisor.
    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value

    @property
    def redirects(self) -> int:
        """MOVED and ASK replies followed so far."""
        return self._redirects

    def statistics(self) -> BatchStatistics:
        parts = [node.statistics() for node in self._nodes.values()]
        return BatchStatistics(
            queued=sum(p.queued for p in parts),
            batches=sum(p.batches for p in parts),
            calls=sum(p.calls for p in parts),
            unavailable=sum(p.unavailable for p in parts),
            in_flight=sum(p.in_flight for p in parts),
        )

    def close(self) -> None:
        self._closed = True
        for node in self._nodes.values():
            node.close()

    # -- calls --------------------------------------------------------------------

    async def call(
        self,
        script: Script,
        keys: tuple[bytes, ...],
        args: tuple[bytes, ...],
        *,
        write: bool,
        durable_read: bool = False,
    ) -> Any:
        """`ScriptBatcher.call`, on the master owning `keys[0]`'s slot."""
        if self._closed:
            raise BrokerUnavailable("the Redis broker is closed")
        slot = hash_slot(keys[0]) if keys else 0
        deadline = trio.current_time() + self._timeout
        target = self.slot_map.owner(slot)
        asking: RedisAddress | None = None
        redirects = retries = 0
        with trio.move_on_at(deadline):
            while True:
                if target is None:
                    self.request_refresh()
                    raise BrokerUnavailable(f"no Redis Cluster master serves slot {slot} now")
                try:
                    if asking is not None:
                        return await self._call_asking(
                            asking, script, keys, args, write=write, durable_read=durable_read
                        )
                    return await self._node(target).call(
                        script, keys, args, write=write, durable_read=durable_read
                    )
                except BrokerUnavailable as exc:
                    error = str(exc)
                    redirect = parse_redirect(error)
                    if redirect is None and "TRYAGAIN" in error:
                        # keys of one call split by a migration; it did not run
                        retries += 1
                        asking, redirects = None, 0  # start over at the owner
                        await trio.sleep(backoff_delay(retries, TRYAGAIN_DELAY, TRYAGAIN_CAP))
                        continue
                    if redirect is None:
                        self.request_refresh()  # the master may have failed over
                        raise
                redirects += 1
                self._redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise BrokerUnavailable(f"redis cluster: {redirects} redirections in a row")
                moved_to = node_address(self._seed, *redirect.node)
                if redirect.kind == "ASK":
                    asking = moved_to
                else:
                    asking = None
                    self.request_refresh()
                    target = moved_to
        raise BrokerUnavailable(f"redis did not answer within {self._timeout:g} s")

    def _node(self, address: RedisAddress) -> _NodeScripts:
        node = self._nodes.get(address)
        if node is None:
            if self._nursery is None:
                raise BrokerUnavailable("the Redis Cluster pipelines are not running")
            node = _NodeScripts(address, self._timeout, self._wait_replicas, self._tuning)
            self._nodes[address] = node
            self._nursery.start_soon(node.serve)
        return node

    async def _call_asking(
        self,
        address: RedisAddress,
        script: Script,
        keys: tuple[bytes, ...],
        args: tuple[bytes, ...],
        *,
        write: bool,
        durable_read: bool,
    ) -> Any:
        """ASKING + the call on a connection of its own (see the module docstring);
        SCRIPT LOAD first, so NOSCRIPT cannot happen. Bounded by the caller."""
        evalsha = pack_command(b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys, *args)
        commands = [pack_command(b"SCRIPT", b"LOAD", script.source.encode())]
        commands += [pack_command(b"ASKING"), evalsha]
        fenced = durable_read and self._wait_replicas > 0 and bool(keys)
        if fenced:  # the slot is importing here: the fence needs ASKING too
            commands += [pack_command(b"ASKING"), fence_command(keys[0])]
        if (write or fenced) and self._wait_replicas > 0:
            commands.append(wait_command(self._wait_replicas, self._timeout))
        connection = await open_connection(address)
        try:
            await connection.send(b"".join(commands))
            replies = [await connection.read_reply() for _ in commands]
        finally:
            await connection.aclose()
        reply = replies[2]
        if isinstance(reply, ReplyError):
            raise BrokerUnavailable(f"redis {script.name} failed: {reply}")
        acked = replies[-1] if len(replies) > 3 else None
        if fenced and isinstance(replies[4], ReplyError):
            acked = 0
        if acked is not None and not (isinstance(acked, int) and acked >= self._wait_replicas):
            raise BrokerUnavailable(too_few_replicas(acked, self._wait_replicas, read=fenced))
        return reply

    async def ping(self) -> None:
        """PING every master. Error handling: BrokerUnavailable naming the first that failed."""
        slot_map = self.slot_map
        if not slot_map.complete:
            raise BrokerUnavailable("the Redis Cluster slot map does not cover every slot")
        failures: list[str] = []

        async def ping_one(node: _NodeScripts, address: RedisAddress) -> None:
            try:
                await node.ping()
            except BrokerUnavailable as exc:
                failures.append(f"{address.host}:{address.port}: {exc}")

        async with trio.open_nursery() as nursery:
            for address in slot_map.masters:
                nursery.start_soon(ping_one, self._node(address), address)
        if failures:
            raise BrokerUnavailable("redis cluster master down: " + "; ".join(failures))

    # -- the slot map -----------------------------------------------------------------

    def request_refresh(self) -> None:
        """Ask the supervisor for a new slot map now (rate-limited)."""
        self._refresh_wanted.set()

    async def refresh(self) -> SlotMap:
        """Fetch the slot map now; tell `on_map` listeners when it changed."""
        candidates = [*self.slot_map.nodes, self._seed]
        slot_map = await fetch_slot_map(candidates, self._timeout)
        if slot_map != self.slot_map:
            if self.slot_map is not EMPTY_MAP:
                log.warning("redis_cluster_map_changed", masters=describe_map(slot_map))
            self.slot_map = slot_map
            for listener in self.on_map:
                listener(slot_map)
        return slot_map

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every master's pipeline (started as they are first needed)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def serve_health(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Refresh the map and PING every master forever; reports started after
        the first round (whatever its outcome)."""
        failures = 0
        started = False
        while True:
            try:
                await self.refresh()
                await self.ping()
            except BrokerUnavailable as exc:
                if self._healthy or failures == 0:
                    log.warning("redis_unavailable", reason=str(exc))
                self._healthy = False
                failures += 1
                delay = backoff_delay(failures, self._tuning.backoff_base, self._tuning.backoff_cap)
            else:
                if not self._healthy:
                    masters = len(self.slot_map.masters)
                    log.info("redis_available", failures=failures, masters=masters)
                self._healthy = True
                failures = 0
                delay = self._tuning.health_interval
            if not started:
                started = True
                task_status.started()
            self._refresh_wanted = trio.Event()
            with trio.move_on_after(delay):
                await self._refresh_wanted.wait()
                await trio.sleep(REFRESH_MIN_INTERVAL)
