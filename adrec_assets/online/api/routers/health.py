"""Operations: ``GET /healthz`` (liveness and what is served) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from adrec_assets.online.api.deps import MetricsDep, ServiceDep
from adrec_assets.online.api.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz(service: ServiceDep) -> dict:
    """Liveness and what is served."""
    return service.health()


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(metrics: MetricsDep) -> Response:
    """Prometheus text format: requests and latency per endpoint, model version, index size."""
    metrics.refresh()
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
