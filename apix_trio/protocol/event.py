"""An event as stored and delivered (PROTOCOL.md "Events"), the one value the
protocol codec, the router and every broker share."""

from __future__ import annotations

import attrs


@attrs.frozen
class Event:
    """One stored event. `data` is the JSON text of the event's data."""

    id: str
    ts: int
    data: str
    sender: str
    key: str | None = None
