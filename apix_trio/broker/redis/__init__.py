"""The Redis Streams broker: every broker interface on Redis, shared by many nodes.

Only the modules of this package speak to Redis, through `resp` (a trio-native
RESP client on hiredis); transport failures and error replies become
`broker.model.BrokerUnavailable` here and nowhere else.

- `events`: `RedisBroker` and `open_redis_broker` (its tasks, supervision).
- `batch`: `ScriptBatcher`, every script call of the node pipelined in batches.
- `bus`: the sharded fan-out bus reader.
- `scripts`, `group_scripts`: the Lua scripts (one hash slot each).
- `keys`: the key layout (org-scoped, escaped, hash-tagged).
- `groups`, `sessions`, `leases`: the other interfaces on Redis.
"""
