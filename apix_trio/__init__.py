"""apix-trio: a real-time WebSocket and event-streaming server on Trio."""

__version__ = "0.1.0"
