"""The Redis key layout of the broker: which key holds what, in which slot.

Every key starts with the configured prefix, then the hash tag of a bus shard,
then (for per-org data) the org:

    <prefix>:{b<shard>}:<org>:c:<channel>        channel stream (the events)
    <prefix>:{b<shard>}:<org>:m:<channel>        channel meta: last id, max deleted id
    <prefix>:{b<shard>}:<org>:k:<channel>:<key>  idempotency record of one key
    <prefix>:{b<shard>}:bus                      fan-out bus stream of the shard
    <prefix>:{b<shard>}:bus:seq                  the bus shard's entry counter
    <prefix>:{b<shard>}:<org>:r:<channel>        redrive cursors of the channel's groups
    <prefix>:{o:<org>}:dir:conns                 connection directory: conn -> record
    <prefix>:{o:<org>}:dir:nodes                 connection directory: node leases
    <prefix>:{b<shard>}:<org>:p:<channel>        presence members: conn -> member JSON
    <prefix>:{b<shard>}:<org>:po:<channel>       presence join order: conn, scored by join number
    <prefix>:{b<shard>}:<org>:pn:<channel>       presence nodes: conn -> node incarnation
    <prefix>:{b<shard>}:<org>:pu:<channel>       presence users: sub -> members with that sub
    <prefix>:{b<shard>}:<org>:pm:<channel>       presence meta: last position, join counter
    <prefix>:{presence}:nodes                    presence node leases (zset, scored by expiry)
    <prefix>:{presence}:idx:<node>               channels where a node may hold members

`shard` is a stable hash (crc32) of (org, channel) modulo `bus_shards`, so a
channel, its meta, its idempotency records and its bus shard share one hash
slot, and the publish script touches one slot (Redis Cluster safe). A
channel's presence keys sit in the slot of its pseudo-channel
`$presence.<channel>` (`broker.presence`), whose changes go out on that
slot's bus shard. The node-level presence keys share the `{presence}` tag.

Client-chosen parts (org, channel, idempotency key) are escaped with `escape`:
every character outside `[A-Za-z0-9_.@-]` becomes `%XX` per UTF-8 byte. After
escaping no part contains `:`, `{`, `}`, `%`-ambiguity or glob characters, so
the `:`-separated structure can be parsed back unambiguously: a channel can
never pose as another channel's idempotency key, no part can escape its org,
and a brace in a channel name can never become a hash tag (the only `{...}`
is the shard tag, which comes first; the prefix is checked to have no braces).
Channels made of the protocol's usual characters (`chat.room42`) stay as they
are; `user:alice` is stored as `user%3Aalice`.

Pure: no I/O, no Redis import.
"""

from __future__ import annotations

import re
import string
import zlib

import attrs

from apix_trio.broker.presence import PRESENCE_PREFIX

_SAFE = frozenset(string.ascii_letters + string.digits + "_.@-")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")

BUS_SEQ_SUFFIX = "bus:seq"


def escape(part: str) -> str:
    """`part` with every character outside `[A-Za-z0-9_.@-]` as `%XX` bytes."""
    if _UNSAFE.search(part) is None:
        return part
    out: list[str] = []
    for ch in part:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{byte:02X}" for byte in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


_ESCAPED = re.compile(r"(?:%[0-9A-F]{2})+")


def unescape(part: str) -> str:
    """The inverse of `escape` (ValueError for text `escape` cannot produce)."""

    def decode(match: re.Match[str]) -> str:
        raw = bytes.fromhex(match.group(0).replace("%", ""))
        return raw.decode("utf-8", "surrogatepass")

    return _ESCAPED.sub(decode, part)


def check_prefix(prefix: str) -> None:
    """Raise ValueError for a prefix that would break the hash tag or globbing."""
    if not prefix:
        raise ValueError("broker.key_prefix must not be empty")
    bad = sorted(set(prefix) & set("{}*?[]\\ \r\n\t"))
    if bad:
        raise ValueError(f"broker.key_prefix must not contain {''.join(bad)!r}")


@attrs.frozen
class ChannelKeys:
    """The keys of one channel (all in the slot of its bus shard)."""

    shard: int
    stream: str
    meta: str
    bus: str
    bus_seq: str
    key_base: str
    """Idempotency records are `key_base + escape(key)`."""

    def idempotency(self, key: str) -> str:
        return self.key_base + escape(key)


@attrs.frozen
class PresenceKeys:
    """The presence keys of one channel (all in the slot of its pseudo-channel)."""

    shard: int
    members: str
    order: str
    nodes: str
    users: str
    meta: str
    bus: str
    bus_seq: str


@attrs.frozen
class KeyLayout:
    prefix: str
    bus_shards: int

    def __attrs_post_init__(self) -> None:
        check_prefix(self.prefix)
        if self.bus_shards < 1:
            raise ValueError("broker.bus_shards must be at least 1")

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{b{shard}}}"

    def shard_of(self, org: str, channel: str) -> int:
        text = f"{escape(org)}:{escape(channel)}".encode()
        return zlib.crc32(text) % self.bus_shards

    def channel(self, org: str, channel: str) -> ChannelKeys:
        shard = self.shard_of(org, channel)
        base = f"{self.tag(shard)}:{escape(org)}"
        name = escape(channel)
        return ChannelKeys(
            shard=shard,
            stream=f"{base}:c:{name}",
            meta=f"{base}:m:{name}",
            bus=self.bus(shard),
            bus_seq=self.bus_seq(shard),
            key_base=f"{base}:k:{name}:",
        )

    def presence(self, org: str, channel: str) -> PresenceKeys:
        """`channel`'s presence keys, in the slot of `$presence.<channel>`."""
        shard = self.shard_of(org, PRESENCE_PREFIX + channel)
        base = f"{self.tag(shard)}:{escape(org)}"
        name = escape(channel)
        return PresenceKeys(
            shard=shard,
            members=f"{base}:p:{name}",
            order=f"{base}:po:{name}",
            nodes=f"{base}:pn:{name}",
            users=f"{base}:pu:{name}",
            meta=f"{base}:pm:{name}",
            bus=self.bus(shard),
            bus_seq=self.bus_seq(shard),
        )

    def presence_nodes(self) -> str:
        """The zset of presence node leases (node-level, no org)."""
        return f"{self.prefix}:{{presence}}:nodes"

    def presence_index(self, node: str) -> str:
        """The set of `[org, channel]` where node incarnation `node` may hold members."""
        return f"{self.prefix}:{{presence}}:idx:{escape(node)}"

    def bus(self, shard: int) -> str:
        return f"{self.tag(shard)}:bus"

    def bus_seq(self, shard: int) -> str:
        return f"{self.tag(shard)}:{BUS_SEQ_SUFFIX}"

    def buses(self) -> list[str]:
        return [self.bus(shard) for shard in range(self.bus_shards)]

    def redrive_cursors(self, org: str, channel: str) -> str:
        """The hash of `channel`'s group redrive cursors (in the channel's slot)."""
        keys = self.channel(org, channel)
        return f"{self.tag(keys.shard)}:{escape(org)}:r:{escape(channel)}"

    def stream_pattern(self, org: str, channel_prefix: str) -> str:
        """A SCAN MATCH pattern for the streams of `org`'s channels starting
        with `channel_prefix` (escaping leaves no glob character)."""
        return f"{self.prefix}:{{b*}}:{escape(org)}:c:{escape(channel_prefix)}*"

    def channel_of_stream(self, org: str, key: str) -> str | None:
        """The channel name of `org`'s stream key `key` (as `stream_pattern`
        finds them), or None when `key` is not one."""
        head = f"{self.prefix}:{{b"
        tag_end = key.find("}:", len(head))
        middle = f"}}:{escape(org)}:c:"
        if not key.startswith(head) or tag_end < 0 or not key.startswith(middle, tag_end):
            return None
        try:
            return unescape(key[tag_end + len(middle) :])
        except ValueError:
            return None

    def directory(self, org: str) -> tuple[str, str]:
        """The connection directory of `org`: (records hash, node leases zset),
        both in the org's own slot."""
        base = f"{self.prefix}:{{o:{escape(org)}}}:dir"
        return f"{base}:conns", f"{base}:nodes"

    def org_pattern(self, org: str) -> str:
        """A SCAN MATCH pattern for every key of `org` (for operators and tests)."""
        return f"{self.prefix}:{{b*}}:{escape(org)}:*"
