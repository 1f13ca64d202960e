"""The Redis key layout of the broker: which key holds what, in which slot.

Every key starts with the configured prefix, then the hash tag of a bus shard,
then (for per-org data) the org:

    <prefix>:{b<shard>}:<org>:c:<channel>        channel stream (the events)
    <prefix>:{b<shard>}:<org>:m:<channel>        channel meta: last id, max deleted id
    <prefix>:{b<shard>}:<org>:k:<channel>:<key>  idempotency record of one key
    <prefix>:{b<shard>}:bus                      fan-out bus stream of the shard
    <prefix>:{b<shard>}:bus:seq                  the bus shard's entry counter
    <prefix>:<org>:audit                         the org's audit trail (stream: redis/audit.py)
    <prefix>:<org>:lat                           the org's latency snapshots (redis/latency.py)

`shard` is a stable hash (crc32) of (org, channel) modulo `bus_shards`, so a
channel, its meta, its idempotency records and its bus shard share one hash
slot, and the publish script touches one slot (Redis Cluster safe).

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

    def bus(self, shard: int) -> str:
        return f"{self.tag(shard)}:bus"

    def bus_seq(self, shard: int) -> str:
        return f"{self.tag(shard)}:{BUS_SEQ_SUFFIX}"

    def buses(self) -> list[str]:
        return [self.bus(shard) for shard in range(self.bus_shards)]

    def audit(self, org: str) -> str:
        """The org's audit trail (one key: no hash tag needed)."""
        return f"{self.prefix}:{escape(org)}:audit"

    def latency(self, org: str) -> str:
        """The org's latency snapshots, one hash field per (slot, node)."""
        return f"{self.prefix}:{escape(org)}:lat"

    def org_pattern(self, org: str) -> str:
        """A SCAN MATCH pattern for every key of `org` (for operators and tests)."""
        return f"{self.prefix}:{{b*}}:{escape(org)}:*"
