"""The configuration model: every setting of CONFIG.md, with its default.

This module only describes settings (frozen attrs classes). Reading them
from TOML, `APIX_*` variables and flags, and validating them, lives in
`apix_trio.config`.
"""

from __future__ import annotations

import os
import socket

import attrs


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class ServerSettings:
    host: str = "127.0.0.1"
    ws_port: int = 8080
    ws_path: str = "/ws"
    http_port: int = 8081
    allowed_origins: tuple[str, ...] = ()
    shutdown_grace: float = 10.0
    node_id: str = attrs.field(factory=_default_node_id)
    workers: int = 1  # node processes sharing the ports; "auto" in sources = one per core
    tls_cert: str = ""  # PEM certificate chain; with tls_key: wss:// and https://
    tls_key: str = ""  # PEM private key of tls_cert


@attrs.frozen
class BrokerSettings:
    redis_url: str = ""
    key_prefix: str = "apix"
    bus_shards: int = 16
    publish_wait_replicas: int = 0
    redis_mode: str = "auto"  # auto | standalone | cluster | sentinel
    sentinel_master: str = ""  # with sentinel: the monitored master's name
    # Added settings (not in the contract, all optional):
    operation_timeout: float = 4.0  # seconds before a broker call answers `unavailable`


@attrs.frozen
class AuthSettings:
    public_keys: tuple[str, ...] = ()
    dev_key_dir: str = ".apix"
    algorithms: tuple[str, ...] = ("RS256",)
    issuer: str = ""
    audience: str = ""
    leeway: float = 5.0
    hmac_secret: str = attrs.field(default="", repr=False)
    timeout: float = 5.0
    expiry_warning: float = 30.0


@attrs.frozen
class LimitSettings:
    max_message_bytes: int = 65536
    max_subscriptions: int = 128
    outbox_size: int = 1024
    ops_per_second: float = 100.0
    max_connections_per_org: int = 0
    bad_frames: int = 10
    # Added: bytes queued per connection before it counts as slow.
    outbox_bytes: int = 4 * 1024 * 1024


@attrs.frozen
class HeartbeatSettings:
    interval: float = 25.0
    timeout: float = 10.0


@attrs.frozen
class DeliverySettings:
    retry_base: float = 1.0
    retry_factor: float = 2.0
    retry_max: float = 60.0
    max_attempts: int = 5
    dedupe_window: float = 600.0
    visibility_timeout: float = 30.0
    # Added: unacked group events a member holds at once (its in-flight window).
    group_prefetch: int = 32


@attrs.frozen
class SessionSettings:
    ttl: float = 300.0


@attrs.frozen
class PresenceSettings:
    ttl: float = 30.0
    max_members: int = 10000


@attrs.frozen
class ApiSettings:
    """The HTTP server API (`server.http_port`)."""

    rate_per_org: float = 1000.0  # requests per second per org (burst 2 x rate)
    max_body_bytes: int = 1048576  # largest request body; larger: 413


@attrs.frozen
class StateSettings:
    max_value_bytes: int = 65536
    max_keys_per_org: int = 100000


@attrs.frozen
class AuditSettings:
    max_entries: int = 100_000
    ttl: float = 2_592_000.0


@attrs.frozen
class LogSettings:
    level: str = "info"
    format: str = "json"


@attrs.frozen
class ChannelOptions:
    """Per-namespace channel behaviour ([defaults] and [[namespaces]])."""

    history_size: int = 100
    history_ttl: float = 3600.0
    presence: bool = False
    client_publish: bool = True


@attrs.frozen
class Namespace:
    pattern: str
    options: ChannelOptions


@attrs.frozen
class Settings:
    server: ServerSettings = attrs.field(factory=ServerSettings)
    broker: BrokerSettings = attrs.field(factory=BrokerSettings)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    limits: LimitSettings = attrs.field(factory=LimitSettings)
    heartbeat: HeartbeatSettings = attrs.field(factory=HeartbeatSettings)
    delivery: DeliverySettings = attrs.field(factory=DeliverySettings)
    sessions: SessionSettings = attrs.field(factory=SessionSettings)
    presence: PresenceSettings = attrs.field(factory=PresenceSettings)
    api: ApiSettings = attrs.field(factory=ApiSettings)
    state: StateSettings = attrs.field(factory=StateSettings)
    audit: AuditSettings = attrs.field(factory=AuditSettings)
    log: LogSettings = attrs.field(factory=LogSettings)
    defaults: ChannelOptions = attrs.field(factory=ChannelOptions)
    namespaces: tuple[Namespace, ...] = ()
