"""Acks of one node's group members, coalesced: one broker call per batch.

Theory of operation
-------------------
Members ack from their own op workers, each with its own `ack` op. Sent one
by one, every ack would be one script call and one reply to wait for; under
load the ack path, not Redis, would bound the group's throughput. So
`AckBatcher.ack` queues the ids and waits; one flusher task per group key
(started on the first queued ack) takes *every* ack queued so far, issues
one `ConsumerGroups.ack_many` for them (one Lua script, one round trip), and
answers each caller with its own count. Acks that arrive while a batch is in
flight make up the next batch, sent as soon as that one returns: at most one
ack batch per group is in flight, and acks issued in one tick share one.

Each caller's count is what its own `ack` would have returned (lists are
acked in arrival order, an id in two lists counts for the first). The
group reader learns about the acked ids once per batch (`on_acked`), which
frees its members' credit in bulk.

Error handling: a batch that meets BrokerUnavailable fails every caller in
it with that error (nothing is lost: unacked events are retried and
reclaimed as usual). A caller cancelled while waiting does not stop its
batch; the ids are acked anyway (an ack is idempotent).

Resource handling: flusher tasks run in the nursery given by `spawn` (the
group manager's), and end when no ack is queued for their group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from apix_trio.broker.groups import ConsumerGroups
from apix_trio.broker.model import BrokerUnavailable

GroupKey = tuple[str, str, str]


@attrs.define(eq=False, slots=True)
class _Request:
    ids: Sequence[str]
    done: trio.Event = attrs.Factory(trio.Event)
    count: int = 0
    error: BrokerUnavailable | None = None


@attrs.define(eq=False)
class _Queue:
    requests: list[_Request] = attrs.Factory(list)
    flushing: bool = False


class AckBatcher:
    """Coalesced acks for every group of one node. See the module docstring."""

    def __init__(
        self,
        groups: Callable[[], ConsumerGroups],
        on_acked: Callable[[GroupKey, list[str], int], None],
    ) -> None:
        self._groups = groups
        self._on_acked = on_acked
        self._queues: dict[GroupKey, _Queue] = {}
        self.batches = 0
        """Broker calls made (for tests and metrics)."""

    async def ack(
        self, key: GroupKey, ids: Sequence[str], spawn: Callable[..., Any] | None
    ) -> int:
        """Ack `ids` on the group `key` with whatever else is queued; how many
        of them were pending.

        `spawn(fn, *args)` starts a task (a nursery's `start_soon`); None
        when the node is stopping. Error handling: BrokerUnavailable from
        the broker, or when there is nothing to run the batch.
        """
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        request = _Request(ids)
        queue.requests.append(request)
        if not queue.flushing:
            if spawn is None:
                queue.requests.remove(request)
                raise BrokerUnavailable("group delivery is not running")
            queue.flushing = True
            spawn(self._flush, key, queue)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.count

    async def _flush(self, key: GroupKey, queue: _Queue) -> None:
        requests: list[_Request] = []
        try:
            while queue.requests:
                requests, queue.requests = queue.requests, []
                self.batches += 1
                try:
                    counts = await self._groups().ack_many(*key, [r.ids for r in requests])
                except BrokerUnavailable as exc:
                    for request in requests:
                        request.error = exc
                        request.done.set()
                    continue
                acked: list[str] = []
                for request, count in zip(requests, counts, strict=True):
                    acked.extend(request.ids)
                    request.count = count
                    request.done.set()
                self._on_acked(key, acked, sum(counts))
        finally:
            queue.flushing = False
            for request in [*requests, *queue.requests]:  # cancelled: the node is stopping
                if not request.done.is_set():
                    request.error = BrokerUnavailable("group delivery stopped")
                    request.done.set()
            queue.requests = []
            if self._queues.get(key) is queue:
                del self._queues[key]
