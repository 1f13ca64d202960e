"""Operator routes: liveness, readiness, Prometheus metrics, a JSON snapshot."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from apix_trio.http.deps import api_state
from apix_trio.http.errors import json_response
from apix_trio.http.models import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get(
    "/api/v1/health", response_model=Health, summary="Liveness: 200 while the process serves"
)
async def health(request: Request) -> Response:
    node = api_state(request).hub.settings.server.node_id
    return json_response(200, orjson.dumps({"status": "ok", "node": node}))


@router.get(
    "/api/v1/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary=(
        "Readiness: 200 when the node accepts connections, the broker answers and the "
        "delivery canary came back within heartbeat.interval, else 503"
    ),
)
async def ready(request: Request) -> Response:
    hub = api_state(request).hub
    ready, reason = hub.readiness()
    body: dict[str, Any] = {"ready": ready, "node": hub.settings.server.node_id, "reason": reason}
    return json_response(200 if ready else 503, orjson.dumps(body))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    body = api_state(request).hub.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/api/v1/stats", summary="JSON snapshot of this node: connections, channels, router")
async def stats(request: Request) -> Response:
    hub = api_state(request).hub
    router_stats = hub.router.statistics()
    body = {
        "node": hub.settings.server.node_id,
        "connections": len(hub.registry),
        "channels": router_stats.channels,
        "subscriptions": router_stats.subscriptions,
        "dispatched": router_stats.dispatched,
        "broker_ready": hub.broker.ready,
        "accepting": hub.accepting,
    }
    return json_response(200, orjson.dumps(body))
