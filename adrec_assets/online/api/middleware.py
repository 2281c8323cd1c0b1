"""The API's ASGI middlewares: :class:`BodyLimit` (413 for oversized bodies),
:class:`LoopbackOnly` (421 for a request addressed to another host name, in loopback
development mode) and :class:`Observe` (metrics and one access-log line per request, never
the query string). Their refusals have the API's one error shape, ``{"error", "field"}``."""

from __future__ import annotations

import ipaddress
import logging
import re
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adrec_assets.online.api.metrics import Metrics
from adrec_assets.online.api.schemas import MAX_BODY_BYTES

log = logging.getLogger("adrec.serve")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, also when no Content-Length says so.

    With a Content-Length the server delivers exactly that many bytes, so the header decides.
    Without one (``Transfer-Encoding: chunked``) the body is read here, up to the limit, before
    the app sees any of it: a body that grows past the limit is answered 413 here. (Raised from
    inside the app's ``receive`` instead, the limit would reach FastAPI's body parser, which
    turns any exception there into its own 400 ``{"detail"}``.) GET and HEAD pass untouched:
    no route reads their body."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await _too_large(self.limit, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                await _too_large(self.limit, send)
                return
            more = message.get("more_body", False)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()  # then: the disconnect, as usual

        await self.app(scope, replayed, send)


#: A Host header: a name or IPv4 address, or an IPv6 address in brackets, and an optional port.
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[0-9a-z.-]+))(?::[0-9]{1,5})?")


def is_loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``, an address in
    127.0.0.0/8 or ``[::1]``, with an optional port. Nothing else, not ``localhost.`` nor any
    name a DNS server answers for."""
    match = _HOST.fullmatch(host.lower()) if host else None
    if match is None:
        return False
    address = match["ipv6"] or match["name"]
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class LoopbackOnly:
    """Answer only requests addressed to a loopback name (:func:`is_loopback_host`): what the
    service does without a token (``python -m adrec_assets.serve`` adds this middleware then).

    Why: without a token every caller that reaches the loopback address may write and read.
    A web page the developer opens elsewhere can do so by DNS rebinding: its own name, re-
    pointed at 127.0.0.1, makes the service the page's origin, so the browser lets the page
    send requests and read the answers. Such a request still carries ``Host: <that name>``
    (a browser always sends the Host, and a page cannot set it), which is what tells it apart.

    Why 421 Misdirected Request (RFC 9110 15.5.20) and not 403: the request was sent to a
    server that does not serve that authority; it is not a caller without rights, and no
    credential would make it acceptable. A missing Host, or more than one, is refused too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = [value for name, value in scope["headers"] if name == b"host"]
            if len(hosts) != 1 or not is_loopback_host(hosts[0].decode("latin-1")):
                message = ("without ADREC_API_TOKEN the service answers only requests addressed to localhost, "
                           "127.0.0.1 or [::1]")  # fmt: skip
                await _refuse(421, message, "host", send)
                return
        await self.app(scope, receive, send)


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


async def _too_large(limit: int, send: Send) -> None:
    await _refuse(413, f"request body is larger than {limit} bytes", None, send)


async def _refuse(status: int, message: str, field: str | None, send: Send) -> None:
    response = JSONResponse({"error": message, "field": field}, status_code=status)
    await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
