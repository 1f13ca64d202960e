"""Python clients: `client` (one connection, on trio-websocket) and
`reconnect` (reconnects and resumes, exactly once per channel).

`apix_trio.client` and `apix_trio.reconnect` are the same modules' old paths.
"""
