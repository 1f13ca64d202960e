"""Per-channel behaviour from `[defaults]` and `[[namespaces]]` (first match wins)."""

from __future__ import annotations

from apix_trio.auth.permissions import compile_namespace_pattern
from apix_trio.broker.model import Retention
from apix_trio.settings import ChannelOptions, Settings

_CACHE_LIMIT = 65536


class Namespaces:
    """Resolves a channel name to its options and retention, with a bounded cache."""

    def __init__(self, settings: Settings) -> None:
        self._defaults = settings.defaults
        self._dedupe_window = settings.delivery.dedupe_window
        self._rules = [
            (compile_namespace_pattern(ns.pattern), ns.options) for ns in settings.namespaces
        ]
        self._cache: dict[str, ChannelOptions] = {}

    def options(self, channel: str) -> ChannelOptions:
        found = self._cache.get(channel)
        if found is not None:
            return found
        found = self._defaults
        for pattern, options in self._rules:
            if pattern.matches(channel):
                found = options
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[channel] = found
        return found

    def retention(self, channel: str) -> Retention:
        options = self.options(channel)
        return Retention(
            history_size=options.history_size,
            history_ttl=options.history_ttl,
            dedupe_window=self._dedupe_window,
        )
