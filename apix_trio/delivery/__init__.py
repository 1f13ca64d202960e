"""Delivery guarantees (the RetryManager): consumer groups, retries, sessions.

- `groups`: `GroupManager`, this node's group memberships and readers.
- `group_reader`: one reader per (org, channel, group): credit, retry timers
  with backoff, hand-over, dead letters.
- `backoff`: the pure retry and jitter maths (shared with the Python clients).
- `sessions`: `SessionKeeper`, the session records that make resume possible.
- `ports`: the interfaces through which this layer reaches connections and
  the node's services above it.
"""
