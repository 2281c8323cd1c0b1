"""The app factory: the routers over one service, its middleware and its error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from adrec_assets.online.api import errors
from adrec_assets.online.api.metrics import Metrics
from adrec_assets.online.api.middleware import BodyLimit, LoopbackOnly, Observe
from adrec_assets.online.api.routers import ads, demo, events, health, recommendations
from adrec_assets.online.api.schemas import ERRORS
from adrec_assets.online.index import AdIndexError
from adrec_assets.online.service import RecommendationService, ServiceError
from adrec_assets.online.store import StoreInputError, StoreUnavailableError


def create_app(service: RecommendationService, *, start: bool = True, loopback_only: bool = False) -> FastAPI:
    """The API over a started (or, with ``start``, to-be-started) service.

    ``loopback_only``: answer only requests whose ``Host`` is a loopback name (421 for any
    other, :class:`~.middleware.LoopbackOnly`): what ``python -m adrec_assets.serve`` asks for
    when it serves without a token, so that no web page can reach the open service by DNS
    rebinding. An app served on a socket without a token must set it."""
    metrics = Metrics(service.serving, service.slot_counts.totals)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start:
            service.start()
        if metrics.multiprocess:
            metrics.refresh()  # this worker's gauges from its start, not from its first request
        try:
            yield
        finally:
            if start:
                service.stop()
            metrics.worker_exits()

    app = FastAPI(
        title="adrec",
        version="1",
        summary="Privacy-first ad recommendations: live index, online user updates, exploration, experiments.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service, app.state.metrics = service, metrics  # read by the routers' dependencies (deps.py)
    app.add_middleware(BodyLimit)
    if loopback_only:
        app.add_middleware(LoopbackOnly)  # before any body is read
    app.add_middleware(Observe, metrics=metrics)  # outermost: refused requests are counted too

    app.add_exception_handler(ServiceError, errors.service_error)
    app.add_exception_handler(StoreInputError, errors.refused_input)
    app.add_exception_handler(StoreUnavailableError, errors.store_unavailable)
    app.add_exception_handler(AdIndexError, errors.refused_input)
    app.add_exception_handler(errors.ServiceErrorResponse, errors.http_error)
    app.add_exception_handler(RequestValidationError, errors.invalid)
    app.add_exception_handler(HTTPException, errors.http_exception)  # Starlette's 404/405, FastAPI's parse errors
    app.add_exception_handler(Exception, errors.internal)  # the 500, in the same shape

    # In this order (the hot path's router first: each included router a request passes costs).
    for router in (recommendations.router, events.router, ads.router, health.router):
        app.include_router(router)
    app.include_router(demo.router)  # GET /demo: a page over this API, not in the OpenAPI document
    return app
