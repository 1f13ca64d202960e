"""Op handlers, one module per family of ops (PROTOCOL.md's op table).

- `dispatch`: `run_command`, exactly one reply per command; `unavailable`
  within the bound; the handler table.
- `session`: `auth`, `refresh`, `ping`; `resume`: session resume.
- `channels`: `subscribe`, `unsubscribe`; `groups`: group `subscribe`, `ack`.
- `events`: `publish`, `history`.
- `base`: `OpError`, `Then`, `Later`, permission checks.
"""
