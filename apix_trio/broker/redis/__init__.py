"""The Redis Streams broker: every broker interface on Redis, shared by many nodes.

Only the modules of this package import `redis`, `asyncio` or `trio_asyncio`;
Redis and asyncio exceptions are mapped to `broker.model.BrokerUnavailable`
here and nowhere else (`support`).

- `events`: `RedisBroker` and `open_redis_broker` (the trio-asyncio loop, its
  tasks, supervision).
- `batch`: `ScriptBatcher`, every script call of the node pipelined in batches.
- `bus`: the sharded fan-out bus reader.
- `scripts`, `group_scripts`: the Lua scripts (one hash slot each).
- `keys`: the key layout (org-scoped, escaped, hash-tagged).
- `groups`, `sessions`, `leases`: the other interfaces on Redis.
"""
