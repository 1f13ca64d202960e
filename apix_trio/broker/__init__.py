"""Brokers (the MessageQueueManager): interfaces beside their embedded (`memory/`)
and Redis Streams (`redis/`) implementations.

Interfaces: `events` (the `Broker`: storage, history, fan-out), `groups`,
`sessions`, `leases`; their shared vocabulary is `model`.
"""

from apix_trio.broker.events import Broker
from apix_trio.broker.model import (
    BrokerError,
    BrokerUnavailable,
    Listener,
    Page,
    Published,
    Retention,
)
from apix_trio.protocol.event import Event

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Event",
    "Listener",
    "Page",
    "Published",
    "Retention",
]
