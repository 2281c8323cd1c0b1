"""How refusals become HTTP answers: every one is an :class:`~.schemas.ErrorBody`
(``{"error": ..., "field": ...}``) with a 4xx status. The handlers are registered by
:func:`adrec_assets.online.api.app.create_app`."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adrec_assets.online.service import ServiceError


class ServiceErrorResponse(Exception):
    """An HTTP-level refusal raised by the API itself (auth, base64)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)


async def refused_input(_request: Request, exc: ValueError) -> JSONResponse:
    """The store's and the index's refusals of an input (StoreInputError, AdIndexError)."""
    return JSONResponse({"error": str(exc), "field": None}, status_code=422)


async def http_error(_request: Request, exc: ServiceErrorResponse) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=headers)


async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's validation errors: the first one's location as ``field``, up to five messages."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    location = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path')) or 'body'}: {e.get('msg')}"
        for e in exc.errors()[:5]
    )
    return JSONResponse({"error": problems or "invalid request", "field": location or None}, status_code=422)
