"""A minimal trio-native Redis client: one RESP2 connection on a trio stream.

Theory of operation
-------------------
The broker needs very little of a Redis client: send commands packed by
`support.pack_command` (many at once), read their replies in order, and
connect (TCP, TLS or a unix socket, then AUTH and SELECT from the URL).
`RedisConnection` does exactly that on a trio stream, with hiredis' C
`Reader` parsing the replies; there is no asyncio loop, no trio<->asyncio
crossing and no per-command Python packing or parsing in between. Chosen
over redis-py under trio-asyncio and over coredis by measurement
(`scripts/bench_redis_clients.py`, docs/architecture.md "Redis client").

Replies are what hiredis makes of RESP2: `str` (or `bytes` with
`decode=False`), `int`, `None`, lists; an error reply is returned (not
raised) as a `hiredis.ReplyError`, so that one failed command in a pipeline
does not hide the replies of the others.

Error handling: every transport failure (refused, reset, closed, EOF, TLS,
a malformed reply) raises `BrokerUnavailable`; so does an error reply to
the AUTH/SELECT handshake. A connection that failed is unusable: close it
and open another. Nothing here has a timeout of its own; callers bound
each step (`trio.move_on_after`) and drop the connection when it expires,
so that no late reply can be taken for the answer to a later command.

Resource handling: `open_connection` returns an open connection that the
caller closes with `aclose()` (also on failure paths).
"""

from __future__ import annotations

import select
import ssl
import urllib.parse
from typing import Any

import attrs
import hiredis
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.support import pack_command

ReplyError = hiredis.ReplyError
"""The type of an error reply (returned in place of the reply, not raised)."""

RECEIVE_SIZE = 1 << 18
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.frozen
class RedisAddress:
    """Where Redis is and how to log in, from a `redis://`, `rediss://` or
    `unix://` URL (see `parse_url`)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """The unix socket (`unix://`); host and port are then unused."""
    tls: bool = False
    tls_verify: bool = True
    tls_ca_file: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0


def parse_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS;
    query `ssl_cert_reqs=none` to skip verification, `ssl_ca_certs=FILE`),
    `unix://[[user]:password@]/path[?db=N&password=P]`.

    Error handling: ValueError for any other scheme, a bad port or db.
    """
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (redis://, rediss://, unix://): {parts.scheme}://")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    password = query.get("password", password)
    username = query.get("username", username)
    db_text = query.get("db", "")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        return RedisAddress(
            path=urllib.parse.unquote(parts.path),
            username=username,
            password=password,
            db=_db(db_text or "0"),
        )
    path_db = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,  # urlsplit raises ValueError for a bad port
        tls=scheme == "rediss",
        tls_verify=query.get("ssl_cert_reqs", "required").lower() not in ("none", "cert_none"),
        tls_ca_file=query.get("ssl_ca_certs"),
        username=username,
        password=password,
        db=_db(db_text or path_db or "0"),
    )


def _db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ValueError(f"the Redis database must be a number: {text!r}") from None
    if db < 0:
        raise ValueError(f"the Redis database must not be negative: {db}")
    return db


class RedisConnection:
    """One open connection to Redis. Not safe for two tasks reading at once
    (the broker gives each connection one reader task)."""

    def __init__(self, stream: trio.abc.Stream, *, decode: bool) -> None:
        self._stream = stream
        self._reader = (
            hiredis.Reader(encoding="utf-8", errors="replace") if decode else hiredis.Reader()
        )
        self.closed = False
        self._poll = select.poll()
        self._poll.register(_fileno(stream), select.POLLIN | select.POLLRDHUP)

    def readable_while_idle(self) -> bool:
        """True when the socket has something to read although no reply is
        due: Redis closed the connection (CLIENT KILL, its `timeout`, a
        restart) or sent something unasked. Such a connection must not be
        written to: what is sent on it would be lost (redis-py checks the
        same before it reuses a pooled connection)."""
        return bool(self._poll.poll(0)) or self._reader.has_data()

    async def send(self, data: bytes) -> None:
        """Write `data` (one or more packed commands) completely."""
        try:
            await self._stream.send_all(data)
        except _TRANSPORT_ERRORS as exc:
            raise BrokerUnavailable(f"redis connection lost while sending: {exc!r}") from exc

    def reply_nowait(self) -> Any:
        """The next reply if it was received completely already, else False
        (a reply is never the bool False in RESP2)."""
        try:
            return self._reader.gets()
        except hiredis.ProtocolError as exc:
            raise BrokerUnavailable(f"redis sent a malformed reply: {exc}") from exc

    async def receive(self) -> None:
        """Wait for more bytes and feed them to the parser."""
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except _TRANSPORT_ERRORS as exc:
            raise BrokerUnavailable(f"redis connection lost: {exc!r}") from exc
        if not data:
            raise BrokerUnavailable("redis closed the connection")
        self._reader.feed(data)  # type: ignore[arg-type]  # any buffer will do

    async def read_reply(self) -> Any:
        """The next reply (an error reply is returned as a ReplyError)."""
        reply = self.reply_nowait()
        while reply is False:
            await self.receive()
            reply = self.reply_nowait()
        return reply

    async def execute(self, *args: bytes) -> Any:
        """Send one command, return its reply (an error reply is returned)."""
        await self.send(pack_command(*args))
        return await self.read_reply()

    async def aclose(self) -> None:
        """Close the stream (abruptly: unread replies are discarded)."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            try:
                await trio.aclose_forcefully(self._stream)
            except _TRANSPORT_ERRORS:
                pass


async def open_connection(address: RedisAddress, *, decode: bool = True) -> RedisConnection:
    """Connect, log in (AUTH) and select the database of `address`.

    The caller bounds the time (`trio.move_on_after`). Error handling:
    BrokerUnavailable when Redis cannot be reached or refuses the login.
    """
    try:
        stream: trio.abc.Stream
        if address.path is not None:
            stream = await trio.open_unix_socket(address.path)
        elif address.tls:
            stream = await trio.open_ssl_over_tcp_stream(
                address.host, address.port, ssl_context=_tls_context(address)
            )
        else:
            stream = await trio.open_tcp_stream(address.host, address.port)
    except (*_TRANSPORT_ERRORS, ssl.SSLError) as exc:
        raise BrokerUnavailable(f"redis connect failed: {exc!r}") from exc
    connection = RedisConnection(stream, decode=decode)
    try:
        if address.password is not None:
            login = (address.username.encode(),) if address.username else ()
            _check(await connection.execute(b"AUTH", *login, address.password.encode()), "AUTH")
        if address.db:
            _check(await connection.execute(b"SELECT", b"%d" % address.db), "SELECT")
        if address.tls:
            # TLS errors surface as BrokenResourceError from the first exchange;
            # without a login there was none yet, so make one now.
            _check(await connection.execute(b"PING"), "PING")
    except BaseException:
        await connection.aclose()
        raise
    return connection


def _fileno(stream: trio.abc.Stream) -> int:
    """The socket under a SocketStream, or under an SSLStream over one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(f"not a socket stream: {stream!r}")
    return stream.socket.fileno()


def _check(reply: Any, what: str) -> None:
    if isinstance(reply, ReplyError):
        raise BrokerUnavailable(f"redis refused {what}: {reply}")


def _tls_context(address: RedisAddress) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=address.tls_ca_file)
    if not address.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
