"""The admin-change hook: every admin route that changes something calls
`audit_admin` once, after the change, with the request's fields.

It writes one JSON log line (`admin_change`) and the org's audit trail entry
(HTTP_API.md, "Audit trail": `admin.disconnect`, `admin.redrive`) through the
node's `AuditTrail`, which never raises and never blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apix_trio.auth.identity import Identity
from apix_trio.gateway.hub import Hub
from apix_trio.observability.logs import get_logger

log = get_logger("apix.audit")


def audit_admin(
    hub: Hub, identity: Identity, kind: str, detail: Mapping[str, Any], *, ip: str = ""
) -> None:
    """Record admin change `kind` (e.g. `admin.disconnect`) by `identity`."""
    hub.audit.record_admin(
        identity.org, kind.removeprefix("admin."), sub=identity.sub, ip=ip, detail=detail
    )
    try:
        log.info(
            "admin_change",
            type=kind,
            org=identity.org,
            sub=identity.sub,
            node=hub.settings.server.node_id,
            detail=dict(detail),
        )
    except Exception:  # an audit write never fails the operation
        log.exception("audit_failed", type=kind)
