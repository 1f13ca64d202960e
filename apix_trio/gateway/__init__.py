"""The WebSocket gateway (ApiXGateway and ConnectionManager).

- `handshake`: the upgrade checks (path, Origin, subprotocol, header auth),
  then `Connection.run`.
- `websocket`: one server WebSocket on wsproto over a trio stream.
- `connection`: one connection's tasks (reader, writer, op worker, timers) and
  its close procedure.
- `outbox`: the bounded per-connection queue (items and bytes; 4009).
- `ratelimit`: token bucket and the abuse rule (4029).
- `registry`, `slots`: live connections; the cluster-wide per-org cap.
- `hub`: what every connection of the node shares.
"""
