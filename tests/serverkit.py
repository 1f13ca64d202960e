"""Start a real apix-trio server inside the test's trio run, on free ports.

`running_server` yields a `Kit`: the ports, the hub, and `token()` minting
development tokens signed by the server's own dev key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from apix_trio.auth.devkeys import ensure_dev_keys, mint_token
from apix_trio.gateway.hub import Hub
from apix_trio.server import RunningServer, serve
from apix_trio.settings import (
    AuthSettings,
    BrokerSettings,
    ChannelOptions,
    Namespace,
    ServerSettings,
    Settings,
)

ALL = (">",)


@attrs.define
class Kit:
    running: RunningServer
    settings: Settings
    key_path: Path

    @property
    def hub(self) -> Hub:
        return self.running.hub

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.running.ws_port}{self.settings.server.ws_path}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    def token(
        self,
        org: str = "acme",
        sub: str = "alice",
        *,
        pub: tuple[str, ...] = ALL,
        subs: tuple[str, ...] = ALL,
        state: tuple[str, ...] = ALL,
        roles: tuple[str, ...] = (),
        ttl: int = 3600,
        **extra: Any,
    ) -> str:
        return mint_token(
            self.key_path,
            org=org,
            sub=sub,
            ttl=ttl,
            pub=pub,
            sub_patterns=subs,
            state=state,
            roles=roles,
            **extra,
        )


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Settings for a test server: free ports, dev keys under tmp_path."""
    server = attrs.evolve(
        ServerSettings(ws_port=0, http_port=0, node_id="test-node", shutdown_grace=5),
        **sections.pop("server", {}),
    )
    auth = attrs.evolve(
        AuthSettings(dev_key_dir=str(tmp_path / "keys")), **sections.pop("auth", {})
    )
    broker = attrs.evolve(BrokerSettings(), **sections.pop("broker", {}))
    namespaces = sections.pop(
        "namespaces",
        (Namespace("small.>", ChannelOptions(history_size=5, history_ttl=3600)),),
    )
    settings = Settings(server=server, auth=auth, broker=broker, namespaces=namespaces)
    for name, values in sections.items():
        settings = attrs.evolve(settings, **{name: attrs.evolve(getattr(settings, name), **values)})
    return settings


@asynccontextmanager
async def running_server(
    tmp_path: Path,
    *,
    wall_clock: Callable[[], float] | None = None,
    **sections: Any,
) -> AsyncIterator[Kit]:
    settings = make_settings(tmp_path, **sections)
    private, _public, _created = ensure_dev_keys(settings.auth.dev_key_dir)
    kwargs: dict[str, Any] = {}
    if wall_clock is not None:
        kwargs["wall_clock"] = wall_clock
    async with trio.open_nursery() as nursery:
        running: RunningServer = await nursery.start(
            lambda task_status: serve(settings, task_status=task_status, **kwargs)
        )
        try:
            yield Kit(running, settings, Path(private))
        finally:
            running.shutdown()
