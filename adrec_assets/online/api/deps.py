"""The routers' dependencies, as ``Annotated[..., Depends()]`` aliases: the service and the
metrics of the app (set by :func:`~adrec_assets.online.api.app.create_app` on ``app.state``),
and the bearer-token check of the write endpoints.

Each is an ``async def``: FastAPI awaits those on the event loop, where a plain ``def``
would cost a thread-pool hop on every request. ``GET /v1/recommendations`` takes the
``Request`` and calls :func:`service_of` instead of :data:`ServiceDep`: resolving a
dependency there costs several times what the ``Request`` parameter does, on every request
(figures: benchmarks/README.md)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from adrec_assets.online.api.errors import ServiceErrorResponse
from adrec_assets.online.api.metrics import Metrics
from adrec_assets.online.service import RecommendationService


def service_of(request: Request) -> RecommendationService:
    """The app's service, for the one route that takes the request itself (the hot path)."""
    return request.app.state.service


async def get_service(request: Request) -> RecommendationService:
    return service_of(request)


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[RecommendationService, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_token(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """``Authorization: Bearer <ADREC_API_TOKEN>`` when the service has a token, else nothing."""
    expected = service.config.api_token
    if expected is None:
        return  # loopback development mode: serve.py refuses other addresses without a token
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not authorization or not authorization.startswith("Bearer ") or not hmac.compare_digest(given, expected):
        raise ServiceErrorResponse(401, "write endpoints need the header 'Authorization: Bearer <ADREC_API_TOKEN>'")


#: A write endpoint's parameter: the caller passed :func:`require_token`.
Authorized = Annotated[None, Depends(require_token)]
