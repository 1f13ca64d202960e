"""The internal HTTP listener: health, readiness, metrics and the server API (`api`)."""
