"""The API's two ASGI middlewares: :class:`BodyLimit` (413 for oversized bodies) and
:class:`Observe` (metrics and one access-log line per request, never the query string)."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adrec_assets.online.api.metrics import Metrics
from adrec_assets.online.api.schemas import MAX_BODY_BYTES

log = logging.getLogger("adrec.serve")


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
