"""`broker.redis_mode`: which pipeline and bus reader the Redis broker runs.

- `standalone`: one server (`batch.ScriptBatcher`, `bus.BusReader`);
- `cluster`: `cluster.ClusterScripts` (a pipeline per master, calls routed
  by slot) and `cluster_bus.ClusterBus` (a reader per shard on its master,
  or on an in-sync replica of it with `publish_wait_replicas >= 1`);
  `broker.redis_url` names any one node;
- `sentinel`: `sentinel.SentinelScripts` and a `following.FollowingBusReader`,
  both on whichever server the sentinels name master (the reader on an
  in-sync replica of it with `publish_wait_replicas >= 1`);
- `auto` (the default): `INFO cluster` decides between cluster and
  standalone. When the server does not answer, detection is retried with
  the capped backoff for up to `broker.operation_timeout`, then the broker
  starts as standalone and logs `redis_mode_unknown` (error): a node meant
  for a cluster should say `cluster` explicitly so that it can start while
  the cluster is down.

Error handling: ValueError for a sentinel URL that lists no sentinel.
Nothing else: a deployment that is down at start gives a broker that is not
`ready` until it answers.
"""

from __future__ import annotations

import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.batch import ScriptBatcher
from apix_trio.broker.redis.bus import BusReader
from apix_trio.broker.redis.cluster import ClusterScripts
from apix_trio.broker.redis.cluster_bus import ClusterBus
from apix_trio.broker.redis.following import FollowingBusReader
from apix_trio.broker.redis.keys import KeyLayout
from apix_trio.broker.redis.resp import RedisAddress, parse_url
from apix_trio.broker.redis.sentinel import SentinelScripts, SentinelWatcher, parse_sentinel_url
from apix_trio.broker.redis.support import RedisTuning, backoff_delay
from apix_trio.broker.redis.topology import detect_cluster
from apix_trio.observability.logs import get_logger
from apix_trio.settings import BrokerSettings

log = get_logger(__name__)


async def choose_mode(broker: BrokerSettings, tuning: RedisTuning) -> str:
    """`broker.redis_mode`, with `auto` resolved (see the module docstring)."""
    mode = broker.redis_mode
    if mode != "auto":
        return mode
    seed = parse_url(broker.redis_url)
    failures = 0
    with trio.move_on_after(broker.operation_timeout):
        while True:
            try:
                cluster = await detect_cluster(seed, broker.operation_timeout)
            except BrokerUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("redis_mode_detect_failed", reason=str(exc))
                await trio.sleep(backoff_delay(failures, tuning.backoff_base, tuning.backoff_cap))
                continue
            mode = "cluster" if cluster else "standalone"
            log.info("redis_mode_detected", mode=mode)
            return mode
    log.error(
        "redis_mode_unknown",
        hint="Redis did not answer INFO; starting standalone. "
        "Set broker.redis_mode (cluster or standalone) to start without asking.",
    )
    return "standalone"


async def open_mode(
    broker: BrokerSettings, layout: KeyLayout, tuning: RedisTuning
) -> tuple[ScriptBatcher, BusReader] | None:
    """The pipeline and bus reader for a cluster or sentinel deployment;
    None for a standalone server (the broker's own defaults)."""
    mode = await choose_mode(broker, tuning)
    timeout = broker.operation_timeout
    if mode == "sentinel":
        return await _sentinel(broker, layout, tuning)
    if mode != "cluster":
        return None
    seed: RedisAddress = parse_url(broker.redis_url)
    scripts = ClusterScripts(seed, timeout, broker.publish_wait_replicas, tuning)
    try:
        await scripts.refresh()
    except BrokerUnavailable as exc:  # the supervisor keeps asking
        log.warning("redis_unavailable", reason=str(exc))
    bus = ClusterBus(
        scripts, seed, layout, timeout, tuning, read_replicas=broker.publish_wait_replicas > 0
    )
    return scripts, bus


async def _sentinel(
    broker: BrokerSettings, layout: KeyLayout, tuning: RedisTuning
) -> tuple[ScriptBatcher, BusReader]:
    timeout = broker.operation_timeout
    sentinels, template = parse_sentinel_url(broker.redis_url)
    watcher = SentinelWatcher(sentinels, broker.sentinel_master, template, timeout, tuning)
    try:
        watcher.master = await watcher.locate()
    except BrokerUnavailable as exc:  # the watcher keeps asking
        log.warning("redis_sentinel_no_master", reason=str(exc))
    scripts = SentinelScripts(watcher, timeout, broker.publish_wait_replicas, tuning)
    read_replicas = broker.publish_wait_replicas > 0  # deliver what reached a replica
    bus = FollowingBusReader(
        watcher.master,
        layout,
        timeout,
        tuning,
        on_failure=watcher.request_check,
        replicas_only=read_replicas,
    )
    watcher.followers.append(bus.retarget)
    return scripts, bus
