"""``POST /v1/events``: impressions and clicks of served slates."""

from __future__ import annotations

from fastapi import APIRouter

from adrec_assets.online.api.deps import Authorized, MetricsDep, ServiceDep
from adrec_assets.online.api.schemas import EventBatch, EventsAccepted

router = APIRouter(tags=["events"])


@router.post("/v1/events", response_model=EventsAccepted)
def events(_: Authorized, service: ServiceDep, metrics: MetricsDep, batch: EventBatch) -> dict:
    """Impressions and clicks of served slates. A click moves the user's vector at once."""
    result = service.record_events([e.model_dump() for e in batch.events])
    metrics.events.labels("click").inc(result["clicks"])
    metrics.events.labels("impression").inc(result["accepted"] - result["clicks"])
    return result
