"""The embedded broker: every broker interface in one process's memory, with
the same contract (and contract tests) as Redis.

- `events`: `MemoryBroker` (storage, history, retention, idempotency, fan-out).
- `groups`: consumer groups over its channels.
- `sessions`: session records with expiry.
(Connection leases: `broker.leases.MemoryLeases`.)
"""
