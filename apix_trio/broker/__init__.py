"""Brokers: the interface (`base`) and its embedded and Redis implementations."""

from apix_trio.broker.base import (
    Broker,
    BrokerError,
    BrokerUnavailable,
    Event,
    Listener,
    Page,
    Published,
    Retention,
)

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
