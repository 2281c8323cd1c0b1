"""The HTTP face of :class:`~adrec_assets.online.service.RecommendationService` (FastAPI).

Versioned endpoints with pydantic models (the OpenAPI document at ``/openapi.json`` and
``/docs`` is generated from them), Prometheus metrics, bearer-token auth on the write
endpoints, and one error shape for every refusal: ``{"error": ..., "field": ...}`` with a 4xx
status. The access log never holds a query string (it would carry raw user ids).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adrec_assets.online.demo import router as demo_router
from adrec_assets.online.index import AdIndexError
from adrec_assets.online.service import MAX_ID_CHARS, POLICIES, RecommendationService, ServiceError
from adrec_assets.online.store import StoreInputError

log = logging.getLogger("adrec.serve")
MAX_BODY_BYTES = 8 * 1024 * 1024  # a 5 MiB image, base64-encoded, plus its JSON
MAX_EVENTS_PER_BATCH = 1000

IdText = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


# ---------------------------------------------------------------------- models
class Item(BaseModel):
    ad_id: str
    position: int = Field(description="0-based slot in the slate")
    score: float = Field(description="the model's score u . p_a + score_bias_a")
    propensity: float = Field(description="probability that the policy shows this ad at this position")
    text: str
    has_image: bool
    live: bool = Field(description="added through POST /v1/ads (not yet in the source's catalogue)")


class Assignment(BaseModel):
    experiment: str
    arm: str


class Recommendations(BaseModel):
    request_id: str = Field(description="quote it in the events of this slate")
    model_version: str = Field(description="the published snapshot that answered")
    user_status: Literal["known", "updated_online", "new"] = Field(
        description="known: trained vector; updated_online: moved by clicks since; new: the global-mean prior"
    )
    policy: str
    randomized: bool = Field(description="slate order permuted for position-bias estimation")
    experiments: list[Assignment]
    items: list[Item]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: IdText
    user_id: IdText
    ad_id: IdText
    position: int = Field(ge=0, le=999)
    type: Literal["impression", "click"]
    timestamp: float = Field(gt=0, lt=4e9, description="seconds since the epoch (UTC)")


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)


class EventsAccepted(BaseModel):
    accepted: int
    duplicates: int = Field(description="events already recorded for the same request, position and type")
    clicks: int


class NewAd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ad_id: IdText
    text: str = Field(min_length=1, max_length=10_000)
    image_base64: str | None = Field(default=None, max_length=7_000_000, description="PNG/JPEG/... bytes, base64")
    fields: dict[str, Any] = Field(  # each value checked by the service (a string or a number)
        default_factory=dict,
        max_length=64,
        description="Structured fields the source declares (ad_fields.json), e.g. {\"year\": 1995, "
        "\"genres\": \"Comedy|Drama\"}; a declared field left out counts as unknown",
    )


class AdAdded(BaseModel):
    ad_id: str
    model_version: str
    score_bias: float
    slot: int


class AdRetired(BaseModel):
    ad_id: str
    retired: bool
    model_version: str


class AdInfo(BaseModel):
    ad_id: str
    text: str
    has_image: bool
    live: bool
    fields: dict[str, str] = Field(default_factory=dict, description="the ad's structured fields")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    source: str
    model_version: str | None
    n_ads: int
    index_kind: str | None
    store: str
    encoder: str
    pending_events: int


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


ERRORS = {status: {"model": ErrorBody} for status in (401, 404, 409, 413, 422, 503)}


# ---------------------------------------------------------------------- metrics
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Prometheus series of one app (its own registry: several apps in one process stay apart).

    Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start)
    every worker writes its series to files there and a scrape answered by any worker reads
    all of them (prometheus-client's multiprocess mode): counters and histograms add up over
    the workers, gauges keep one series per live worker (``pid`` label). Without it a scrape
    would see only the counts of the worker that happened to take the connection."""

    def __init__(self, serving: Callable[[], tuple[str | None, int, int]] = lambda: (None, 0, 0)) -> None:
        """``serving``: (model version or None, live ads, reloads) of the process, read for the gauges."""
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self._serving = serving
        self._served_version: str | None = None
        self.requests = Counter(
            "adrec_requests", "HTTP requests by endpoint and status.", ["endpoint", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "adrec_request_seconds", "Request latency by endpoint.", ["endpoint"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )  # fmt: skip
        per_worker = {"registry": self.registry, "multiprocess_mode": "liveall"}
        self.model = Gauge("adrec_model_info", "The served snapshot (value 1).", ["model_version"], **per_worker)
        self.index_ads = Gauge("adrec_index_ads", "Ads in the live index.", **per_worker)
        self.events = Counter("adrec_events", "Accepted events by type.", ["type"], registry=self.registry)
        self.reloads = Gauge("adrec_reloads", "Snapshot swaps since start.", **per_worker)

    def refresh(self) -> None:
        """Set the gauges to what this process serves now: at every scrape, and in
        multiprocess mode after every request too (a scrape is answered by one worker; the
        others' gauges are as fresh as their last request). A replaced version is set to 0,
        not removed: in multiprocess mode its value would stay in this worker's file."""
        version, index_ads, reloads = self._serving()
        if self._served_version is not None and self._served_version != version:
            self.model.labels(self._served_version).set(0)
        if version is not None:
            self.model.labels(version).set(1)
            self.index_ads.set(index_ads)
        self._served_version = version
        self.reloads.set(reloads)

    def exposition(self) -> bytes:
        """The text format: this app's registry, or every worker's files in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        workers = CollectorRegistry()
        multiprocess.MultiProcessCollector(workers)
        return generate_latest(workers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, also when no Content-Length says so."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(self.limit, send)


class Observe:
    """Count and time every HTTP request by route template (never the query string, which
    holds the user id), and log one line each. Plain ASGI, not ``@app.middleware("http")``:
    Starlette's BaseHTTPMiddleware runs each request through extra tasks and memory streams,
    a measurable share of a millisecond request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if self.metrics.multiprocess:
                self.metrics.refresh()
            log.info("%s %s %d %.1f ms", scope["method"], endpoint, status, seconds * 1000)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    response = JSONResponse({"error": f"request body is larger than {limit} bytes", "field": None}, status_code=413)
    await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


# ---------------------------------------------------------------------- the app
def create_app(service: RecommendationService, *, start: bool = True) -> FastAPI:
    """The API over a started (or, with ``start``, to-be-started) service."""
    from contextlib import asynccontextmanager

    def serving() -> tuple[str | None, int, int]:
        state = service._state
        return (None, 0, service.reloads) if state is None else (state.version, len(state.index), service.reloads)

    metrics = Metrics(serving)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        if start:
            service.start()
        try:
            yield
        finally:
            if start:
                service.stop()
            if metrics.multiprocess:
                multiprocess.mark_process_dead(os.getpid())  # drop this worker's gauges from the scrape

    app = FastAPI(
        title="adrec",
        version="1",
        summary="Privacy-first ad recommendations: live index, online user updates, exploration, experiments.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(BodyLimit)
    app.include_router(demo_router, include_in_schema=False)  # GET /demo: a page over this API

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = service.config.api_token
        if expected is None:
            return  # loopback development mode: serve.py refuses other addresses without a token
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization or not authorization.startswith("Bearer ") or not hmac.compare_digest(given, expected):
            raise ServiceErrorResponse(401, "write endpoints need the header 'Authorization: Bearer <ADREC_API_TOKEN>'")

    app.add_middleware(Observe, metrics=metrics)  # outside BodyLimit: refused bodies are counted too

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(StoreInputError)
    @app.exception_handler(AdIndexError)
    async def refused_input(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": None}, status_code=422)

    @app.exception_handler(ServiceErrorResponse)
    async def http_error(_request: Request, exc: ServiceErrorResponse) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        location = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path')) or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        )
        return JSONResponse({"error": problems or "invalid request", "field": location or None}, status_code=422)

    # The hot path runs on the event loop, not in the thread pool: it is short (~1 ms of CPU,
    # the store's calls are local round trips) and the thread hop plus GIL hand-offs cost more
    # than they overlap (2 workers at 1M ads: 750 -> ~900-980 requests/s, benchmarks/README.md).
    # It returns the service's dict as JSON: the service builds exactly the declared model.
    @app.get("/v1/recommendations", response_model=Recommendations, tags=["recommendations"])
    async def recommendations(
        user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS, description="your user id (never stored)")],
        k: Annotated[int, Query(ge=1, le=1000)] = 10,
        policy: Annotated[Literal[POLICIES] | None, Query(description="override the configured policy")] = None,  # type: ignore[valid-type]
    ) -> dict:
        """The k best ads for a user, by one inner-product search of the live index."""
        return JSONResponse(service.recommend(user_id, k, policy))  # built by the service: no re-validation

    @app.post("/v1/events", response_model=EventsAccepted, tags=["events"], dependencies=[Depends(require_token)])
    def events(batch: EventBatch) -> dict:
        """Impressions and clicks of served slates. A click moves the user's vector at once."""
        result = service.record_events([e.model_dump() for e in batch.events])
        metrics.events.labels("click").inc(result["clicks"])
        metrics.events.labels("impression").inc(result["accepted"] - result["clicks"])
        return result

    @app.post("/v1/ads", response_model=AdAdded, status_code=201, tags=["ads"], dependencies=[Depends(require_token)])
    def add_ad(ad: NewAd) -> dict:
        """Encode, project and index a new ad: recommendable in the next request."""
        image = None
        if ad.image_base64 is not None:
            try:
                image = base64.b64decode(ad.image_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ServiceErrorResponse(422, "image_base64 is not valid base64", "image_base64") from None
        return service.add_ad(ad.ad_id, ad.text, image, fields=ad.fields)

    @app.delete("/v1/ads/{ad_id}", response_model=AdRetired, tags=["ads"], dependencies=[Depends(require_token)])
    def retire_ad(ad_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]) -> dict:
        """Retire an ad: never served again, also after a reload, until the source drops it."""
        return service.retire_ad(ad_id)

    @app.get("/v1/ads/{ad_id}", response_model=AdInfo, tags=["ads"])
    def ad(ad_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]) -> dict:
        """An ad's text and whether it has an image."""
        state = service.state
        return {"ad_id": ad_id, **service.ad_info(state, ad_id)}

    @app.get("/v1/ads/{ad_id}/image", tags=["ads"], responses={200: {"content": {"image/*": {}}}})
    def ad_image(ad_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]) -> Response:
        """The ad's image bytes."""
        data = service.ad_image(ad_id)
        return Response(content=data, media_type=_image_type(data))

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> dict:
        """Liveness and what is served."""
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
    def prometheus() -> Response:
        """Prometheus text format: requests and latency per endpoint, model version, index size."""
        metrics.refresh()
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


class ServiceErrorResponse(Exception):
    """An HTTP-level refusal raised by the app itself (auth, base64)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _image_type(data: bytes) -> str:
    for signature, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                            (b"RIFF", "image/webp")):  # fmt: skip
        if data.startswith(signature):
            return kind
    return "application/octet-stream"
