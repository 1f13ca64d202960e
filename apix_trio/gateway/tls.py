"""TLS for the WebSocket listener (`wss://`): the server's SSL context.

`server.tls_cert` and `server.tls_key` (PEM files) turn TLS on for both
listeners: the WebSocket one through `trio.SSLListener` (each connection a
`trio.SSLStream`; the TLS handshake runs inside the upgrade's time limit),
the HTTP one through hypercorn's own `certfile`/`keyfile`. The context is
built once at start-up; a file that cannot be used stops the server before
it listens (exit status 2, like any other bad setting).
"""

from __future__ import annotations

import ssl

from apix_trio.settings import ServerSettings


class TlsConfigError(Exception):
    """The certificate or key cannot be used; `str()` says which and why."""


def server_ssl_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The SSL context of `server.tls_cert`/`server.tls_key`, or None without TLS.

    Error handling: raises TlsConfigError when only one of the two is set,
    or the files are unreadable, not PEM, or do not belong together.
    """
    if not server.tls_cert and not server.tls_key:
        return None
    if not server.tls_cert or not server.tls_key:
        raise TlsConfigError("server.tls_cert and server.tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise TlsConfigError(
            f"cannot use {server.tls_cert!r} with {server.tls_key!r}: {detail}"
        ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context
