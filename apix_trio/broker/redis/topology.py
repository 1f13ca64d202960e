"""Which Redis node holds what: mode detection, the cluster slot map, redirections.

Theory of operation
-------------------
`broker.redis_mode` says how `broker.redis_url` is to be read (CONFIG.md):
`standalone` (one server), `cluster` (any one node of a Redis Cluster),
`sentinel` (the sentinels, see `sentinel`), or `auto`: `detect_cluster` asks
the server `INFO cluster` and picks cluster for `cluster_enabled:1`.

On a cluster every key lives in one of 16384 hash slots (`keys.hash_slot`)
and every slot on one master. `SlotMap` is a snapshot of `CLUSTER SLOTS`:
the master of each slot, and every node named (masters and replicas), which
are the candidates to ask next time (`fetch_slot_map` asks them in turn, so
losing the node named in the URL does not lose the cluster).

A node asked about a slot it does not serve answers with a redirection
(`parse_redirect`): `MOVED <slot> <host:port>` (the slot lives elsewhere now:
refresh the map, send again) or `ASK <slot> <host:port>` (the slot is being
migrated and this key is already on the target: send `ASKING` and the
command to that node, once). A redirected command did not run, so sending it
again is safe.

Error handling: `fetch_slot_map` and `detect_cluster` raise BrokerUnavailable
when no node answers in time.

Resource handling: every connection opened here is closed before returning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio

from apix_trio.broker.model import BrokerUnavailable
from apix_trio.broker.redis.keys import SLOTS
from apix_trio.broker.redis.resp import RedisAddress, ReplyError, open_connection

MODES = ("auto", "standalone", "cluster", "sentinel")

_REDIRECT = re.compile(r"(?:^|: )(MOVED|ASK) ([0-9]+) (\S+)$")


@attrs.frozen
class Redirect:
    """A `MOVED` or `ASK` error reply: the command did not run."""

    kind: str
    """"MOVED" or "ASK"."""
    slot: int
    node: tuple[str, int]


def parse_redirect(error: str) -> Redirect | None:
    """The redirection in an error text (a ReplyError's or a BrokerUnavailable's
    message ending in `MOVED 3999 127.0.0.1:6381`), else None."""
    match = _REDIRECT.search(error.strip())
    if match is None:
        return None
    host, _, port = match[3].rpartition(":")
    if not port.isdigit():
        return None
    return Redirect(match[1], int(match[2]), (host.strip("[]"), int(port)))


def node_address(seed: RedisAddress, host: str, port: int) -> RedisAddress:
    """The address of another node of the same deployment: the seed's
    credentials, database and TLS settings with another host and port."""
    return attrs.evolve(seed, host=host or seed.host, port=port, path=None)


@attrs.frozen
class SlotMap:
    """A snapshot of `CLUSTER SLOTS`."""

    owners: tuple[RedisAddress | None, ...]
    """The master of each slot (None: nobody serves it now)."""
    nodes: tuple[RedisAddress, ...]
    """Every node named, masters first: where to ask next time."""

    @property
    def complete(self) -> bool:
        return all(owner is not None for owner in self.owners)

    @property
    def masters(self) -> tuple[RedisAddress, ...]:
        return tuple(dict.fromkeys(owner for owner in self.owners if owner is not None))

    def owner(self, slot: int) -> RedisAddress | None:
        return self.owners[slot]


EMPTY_MAP = SlotMap(owners=(None,) * SLOTS, nodes=())


def parse_slots(reply: Any, seed: RedisAddress) -> SlotMap:
    """A SlotMap from a `CLUSTER SLOTS` reply (`[[start, end, [host, port, id,
    ...], replica..., ], ...]`). Error handling: ValueError when malformed."""
    owners: list[RedisAddress | None] = [None] * SLOTS
    masters: list[RedisAddress] = []
    replicas: list[RedisAddress] = []
    try:
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            if not 0 <= start <= end < SLOTS:
                raise ValueError(f"slot range {start}-{end}")
            nodes = [node_address(seed, _text(node[0]), int(node[1])) for node in entry[2:]]
            master = nodes[0]
            owners[start : end + 1] = [master] * (end - start + 1)
            masters.append(master)
            replicas.extend(nodes[1:])
    except (TypeError, IndexError) as exc:
        raise ValueError(f"malformed CLUSTER SLOTS reply: {exc}") from exc
    return SlotMap(owners=tuple(owners), nodes=tuple(dict.fromkeys([*masters, *replicas])))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def fetch_slot_map(candidates: Iterable[RedisAddress], per_node: float) -> SlotMap:
    """The slot map as the first candidate that answers sees it (each one
    gets `per_node` seconds). Error handling: BrokerUnavailable naming the last
    failure when none answers."""
    failure = "no Redis Cluster node to ask"
    for address in dict.fromkeys(candidates):
        try:
            reply = await ask_once(address, per_node, b"CLUSTER", b"SLOTS")
            return parse_slots(reply, address)
        except (BrokerUnavailable, ValueError) as exc:
            failure = f"{address.host}:{address.port}: {exc}"
    raise BrokerUnavailable(f"redis cluster slots: {failure}")


async def detect_cluster(address: RedisAddress, bound: float) -> bool:
    """True when the server at `address` reports `cluster_enabled:1`.
    Error handling: BrokerUnavailable when it does not answer."""
    info = await ask_once(address, bound, b"INFO", b"cluster")
    return any(line.strip() == "cluster_enabled:1" for line in str(info).splitlines())


async def ask_once(address: RedisAddress, bound: float, *command: bytes) -> Any:
    """One command on a connection of its own, within `bound` seconds."""
    reply: Any = None
    with trio.move_on_after(bound) as scope:
        connection = await open_connection(address)
        try:
            reply = await connection.execute(*command)
        finally:
            await connection.aclose()
    if scope.cancelled_caught:
        raise BrokerUnavailable(f"no answer within {bound:g} s")
    if isinstance(reply, ReplyError):
        raise BrokerUnavailable(f"{command[0].decode()} failed: {reply}")
    return reply


def describe_map(slot_map: SlotMap) -> list[str]:
    """`host:port slots a-b` per master range, for logs."""
    out: list[str] = []
    start = 0
    owners: Sequence[RedisAddress | None] = slot_map.owners
    for slot in range(1, SLOTS + 1):
        if slot == SLOTS or owners[slot] != owners[start]:
            owner = owners[start]
            where = f"{owner.host}:{owner.port}" if owner is not None else "nobody"
            out.append(f"{where} {start}-{slot - 1}")
            start = slot
    return out
