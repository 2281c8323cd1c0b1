"""How refusals become HTTP answers: every one is an :class:`~.schemas.ErrorBody`
(``{"error": ..., "field": ...}``) with a 4xx status, and so is a failure of the service
itself (a 500 that names no detail of it: the traceback goes to the server's log only). The
handlers are registered by :func:`adrec_assets.online.api.app.create_app`; besides the
service's and the API's own refusals they cover what Starlette and FastAPI answer by
themselves (no route: 404, another method: 405, a body the JSON parser gives up on), which
would otherwise answer ``{"detail": ...}`` or plain text."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

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


async def store_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """The online store did not answer (down, stalled, locked, out of disk): 503, retry soon;
    the request changed nothing (a store write is one transaction)."""
    return JSONResponse(
        {"error": f"the online store is unavailable, nothing was recorded; retry shortly ({exc})", "field": None},
        status_code=503,
        headers={"Retry-After": "1"},
    )


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


async def http_exception(_request: Request, exc: HTTPException) -> Response:
    """Starlette's and FastAPI's own refusals: no route (404), another method (405, with its
    ``Allow`` header), a body the JSON parser cannot take (FastAPI's 400: a 422 here, as for
    malformed JSON, with field ``body``)."""
    if exc.status_code in (204, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    status, message, field = exc.status_code, str(exc.detail), None
    if status == 400 and exc.__cause__ is not None:  # FastAPI: "There was an error parsing the body"
        reason = "it is nested too deeply" if isinstance(exc.__cause__, RecursionError) else "it is not valid JSON"
        status, message, field = 422, f"the request body cannot be parsed: {reason}", "body"
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=exc.headers)


async def internal(_request: Request, exc: Exception) -> JSONResponse:
    """Any exception no handler took: 500 in the error shape, naming nothing of the service's
    internals. Starlette re-raises the exception after this answer, so the server logs it with
    its traceback."""
    return JSONResponse(
        {"error": "internal error: the service could not answer this request (its log has the details)", "field": None},
        status_code=500,
    )
