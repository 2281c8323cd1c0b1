"""The routers' dependencies, as ``Annotated[..., Depends()]`` aliases: the service and the
metrics of the app (set by :func:`~adrec_assets.online.api.app.create_app` on ``app.state``),
and the bearer-token checks: :data:`Authorized` for the writes, :data:`ReadAccess` (and
:func:`read_access` on the hot path) for the reads.

Each is an ``async def``: FastAPI awaits those on the event loop, where a plain ``def``
would cost a thread-pool hop on every request. ``GET /v1/recommendations`` takes the
``Request`` and calls :func:`service_of` and :func:`read_access` instead of dependencies:
resolving a dependency there costs several times what the ``Request`` parameter does, on
every request (figures: benchmarks/README.md).

**Tokens.** ``Authorization: Bearer <token>`` (the scheme in any case, RFC 7235). The write
token (``ADREC_API_TOKEN``) writes and reads; the read token (``ADREC_READ_TOKEN``, optional)
reads. Without a write token the service is in loopback development mode: every caller may
do everything, and :func:`~adrec_assets.online.api.app.create_app` with ``loopback_only``
(what ``python -m adrec_assets.serve`` builds then) answers only requests addressed to a
loopback name, so a web page cannot reach it by DNS rebinding. Any header that is missing
where a token is needed, malformed, not ASCII or wrong is a 401 with field
``authorization``; tokens are compared as bytes in constant time."""

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


def _credentials(authorization: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header as its bytes, or None for a
    missing or malformed header (another scheme, no token, blanks inside it). Starlette decodes
    header bytes as latin-1, so encoding back gives the bytes the client sent."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(char.isspace() for char in token):
        return None
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:  # not from an HTTP header
        return None


def _holds(given: bytes | None, *tokens: str | None) -> bool:
    """Whether ``given`` is one of the configured ``tokens`` (each compared, in constant time)."""
    found = False
    for token in tokens:
        if token is not None and given is not None:
            found |= hmac.compare_digest(given, token.encode("utf-8"))
    return found


async def require_token(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """``Authorization: Bearer <ADREC_API_TOKEN>`` when the service has a token, else nothing."""
    expected = service.config.api_token
    if expected is None:
        return  # loopback development mode: serve.py refuses other addresses and other Host names
    if not _holds(_credentials(authorization), expected):
        raise ServiceErrorResponse(
            401, "write endpoints need the header 'Authorization: Bearer <ADREC_API_TOKEN>'", "authorization"
        )


#: A write endpoint's parameter: the caller passed :func:`require_token`.
Authorized = Annotated[None, Depends(require_token)]


def read_access(request: Request) -> bool:
    """Whether the caller of a read is authenticated (it may learn user-level facts such as
    ``user_status``): it holds the read or the write token, or the service has no token
    (loopback development mode: the caller is local). Raises the 401 where the service has a
    read token and the caller does not hold one, and for a header that holds no valid token
    (a wrong credential is refused, never read as none)."""
    config = service_of(request).config
    if config.api_token is None:
        return True
    authorization = request.headers.get("authorization")
    if authorization is None and config.read_token is None:
        return False  # an anonymous read of an open service: served, without user_status
    if _holds(_credentials(authorization), config.api_token, config.read_token):
        return True
    raise ServiceErrorResponse(
        401, "reads need the header 'Authorization: Bearer <ADREC_READ_TOKEN or ADREC_API_TOKEN>'", "authorization"
    )


async def get_read_access(request: Request) -> bool:
    return read_access(request)


#: A read endpoint's parameter: :func:`read_access` (True: the caller is authenticated).
ReadAccess = Annotated[bool, Depends(get_read_access)]
