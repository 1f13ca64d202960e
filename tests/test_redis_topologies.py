"""The Redis Cluster and Sentinel set-ups of `tests.redis_topologies` form, fail
over and tear down (the broker's own tests on them build on these)."""

from __future__ import annotations

import pytest

from tests.redis_topologies import RedisClusterSetup, RedisSentinelSetup, command

pytestmark = pytest.mark.timeout(120)


def test_cluster_forms_and_fails_over(redis_cluster: RedisClusterSetup) -> None:
    masters = redis_cluster.master_ports()
    assert len(masters) == 3
    slots = command(masters[0], "CLUSTER", "SLOTS")
    assert isinstance(slots, list) and len(slots) == 3  # one contiguous range per master
    redis_cluster.kill_master(masters[0])
    redis_cluster.wait_failover(masters[0])
    after = redis_cluster.master_ports()
    assert len(after) == 3 and masters[0] not in after


def test_sentinel_promotes_the_replica(redis_sentinel: RedisSentinelSetup) -> None:
    old = redis_sentinel.master_port()
    assert old == redis_sentinel.master.port
    redis_sentinel.kill_master()
    new = redis_sentinel.wait_failover(old)
    assert new == redis_sentinel.replica.port
    assert command(new, "ROLE")[0] == "master"  # type: ignore[index]
