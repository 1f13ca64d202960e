"""The Redis key layout of the broker: which key holds what, in which slot.

Every key starts with the configured prefix, then the hash tag of a bus shard,
then (for per-org data) the org:

    <prefix>:{<tag>}:<org>:c:<channel>        channel stream (the events)
    <prefix>:{<tag>}:<org>:m:<channel>        channel meta: last id, max deleted id
    <prefix>:{<tag>}:<org>:k:<channel>:<key>  idempotency record of one key
    <prefix>:{<tag>}:bus                      fan-out bus stream of the shard
    <prefix>:{<tag>}:bus:seq                  the bus shard's entry counter
    <prefix>:{<tag>}:fence                    durable-read fence (batch.py; expires in 1 s)
    <prefix>:{<tag>}:<org>:r:<channel>        redrive cursors of the channel's groups
    <prefix>:{o:<org>}:dir:conns              connection directory: conn -> record
    <prefix>:{o:<org>}:dir:nodes              connection directory: node leases
    <prefix>:{<tag>}:<org>:p:<channel>        presence members: conn -> member JSON
    <prefix>:{<tag>}:<org>:po:<channel>       presence join order: conn, scored by join number
    <prefix>:{<tag>}:<org>:pn:<channel>       presence nodes: conn -> node incarnation
    <prefix>:{<tag>}:<org>:pu:<channel>       presence users: sub -> members with that sub
    <prefix>:{<tag>}:<org>:pm:<channel>       presence meta: last position, join counter
    <prefix>:{presence}:nodes                 presence node leases (zset, scored by expiry)
    <prefix>:{presence}:idx:<node>            channels where a node may hold members
    <prefix>:{<tag>}:<org>:v:<key>            state value of one key: n = version, v = value
    <prefix>:{<tag>}:<org>:vn                 the org's count of state keys with a value
    <prefix>:<org>:audit                      the org's audit trail (stream: redis/audit.py)
    <prefix>:<org>:lat                        the org's latency snapshots (redis/latency.py)

`shard` is a stable hash (crc32) of (org, channel) modulo `bus_shards`, so a
channel, its meta, its idempotency records and its bus shard share one hash
slot, and the publish script touches one slot (Redis Cluster safe). A
channel's presence keys sit in the slot of its pseudo-channel
`$presence.<channel>` (`broker.presence`), whose changes go out on that
slot's bus shard. The node-level presence keys share the `{presence}` tag. Every
state key of an org, its counter and the bus shard its changes go out on sit
in one slot `s`, the shard of the org's pseudo-channel `$state`
(`state_shard`), so a change and the org-wide limit are one atomic script.

`<tag>` is `b<shard>.<n>` with the smallest `n >= 0` whose hash slot falls in
the shard's own 1/`bus_shards` share of the 16384 slots (`shard_tag`): shard
0 in the first share, shard 1 in the second, and so on. On a Redis Cluster,
whose masters own contiguous slot ranges, the shards (and the channels on
them) are therefore spread over every master, deterministically: every node
computes the same tags.

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

import binascii
import functools
import re
import string
import zlib

import attrs

from apix_trio.broker.presence import PRESENCE_PREFIX

_SAFE = frozenset(string.ascii_letters + string.digits + "_.@-")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")

BUS_SEQ_SUFFIX = "bus:seq"
SLOTS = 16384
"""Hash slots of a Redis Cluster."""


def hash_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
    (the part between the first `{` and the next `}`, when not empty) or of
    the whole key, modulo 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def fence_key(key: bytes) -> bytes:
    """The durable-read fence key in `key`'s hash slot: `key` up to the end
    of its hash tag, then `:fence` (`<prefix>:{<tag>}:fence`); a key without
    a tag (one slot of its own) gets `<key>:fence`, which hashes elsewhere
    but is only ever used where the slot does not matter (no cluster)."""
    start = key.find(b"{")
    end = key.find(b"}", start + 1) if start >= 0 else -1
    if end > start + 1:
        return key[: end + 1] + b":fence"
    return key + b":fence"


def slot_share(shard: int, shards: int) -> range:
    """The slots whose keys shard `shard` of `shards` keeps: its 1/`shards` share."""
    return range(shard * SLOTS // shards, (shard + 1) * SLOTS // shards)


@functools.lru_cache(maxsize=8)
def shard_tags(shards: int) -> tuple[str, ...]:
    """The hash tag of every shard (see the module docstring): deterministic,
    each in its shard's share of the slots."""
    if not 1 <= shards <= SLOTS:
        raise ValueError(f"bus shards must be 1-{SLOTS}, not {shards}")
    tags = []
    for shard in range(shards):
        share = slot_share(shard, shards)
        n = 0
        while hash_slot(f"b{shard}.{n}") not in share:
            n += 1
        tags.append(f"b{shard}.{n}")
    return tuple(tags)


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
class StateKeys:
    """The state keys of one org (all in one slot, see the module docstring)."""

    shard: int
    value_base: str
    """A key's value hash is `value_base + escape(key)`."""
    count: str
    bus: str
    bus_seq: str

    def value(self, key: str) -> str:
        return self.value_base + escape(key)


STATE_SLOT_CHANNEL = "$state"
"""The pseudo-channel whose shard holds an org's state (see `KeyLayout.state`)."""


@attrs.frozen
class KeyLayout:
    prefix: str
    bus_shards: int

    def __attrs_post_init__(self) -> None:
        check_prefix(self.prefix)
        if self.bus_shards < 1:
            raise ValueError("broker.bus_shards must be at least 1")

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard_tags(self.bus_shards)[shard]}}}"

    def slot(self, shard: int) -> int:
        """The hash slot of every key of shard `shard`."""
        return hash_slot(shard_tags(self.bus_shards)[shard])

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

    def state(self, org: str) -> StateKeys:
        """`org`'s state keys, all in the slot of its `$state` shard."""
        shard = self.shard_of(org, STATE_SLOT_CHANNEL)
        base = f"{self.tag(shard)}:{escape(org)}"
        return StateKeys(
            shard=shard,
            value_base=f"{base}:v:",
            count=f"{base}:vn",
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

    def audit(self, org: str) -> str:
        """The org's audit trail (one key: no hash tag needed)."""
        return f"{self.prefix}:{escape(org)}:audit"

    def latency(self, org: str) -> str:
        """The org's latency snapshots, one hash field per (slot, node)."""
        return f"{self.prefix}:{escape(org)}:lat"

    def org_pattern(self, org: str) -> str:
        """A SCAN MATCH pattern for every key of `org` (for operators and tests)."""
        return f"{self.prefix}:{{b*}}:{escape(org)}:*"
