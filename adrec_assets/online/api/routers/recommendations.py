"""``GET /v1/recommendations``: the hot path."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from adrec_assets.online.api.deps import read_access, service_of
from adrec_assets.online.api.schemas import Recommendations
from adrec_assets.online.service import MAX_ID_CHARS, POLICIES

router = APIRouter(tags=["recommendations"])


# The hot path runs in the thread pool, not on the event loop: it calls the online store
# (a round trip to Redis or SQLite), and a store that stalls must not stall the loop, and with
# it /healthz and /metrics (issue 28; on the loop it measured faster, benchmarks/README.md).
# It returns the service's dict as JSON: the service builds exactly the declared model. It
# reads the service off the request and checks the read token itself, not through
# dependencies: see deps.py for the cost.
@router.get("/v1/recommendations", response_model=Recommendations)
def recommendations(
    request: Request,
    user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS, description="your user id (never stored)")],
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    policy: Annotated[Literal[POLICIES] | None, Query(description="override the configured policy")] = None,  # type: ignore[valid-type]
) -> dict:
    """The k best ads for a user, by one inner-product search of the live index. With
    ``ADREC_READ_TOKEN`` set the call needs the read or the write token; ``user_status`` is
    told only to a caller holding one (else null): whether an id is in the training data, or
    clicked recently, is not for anyone who can reach the port."""
    authenticated = read_access(request)
    answer = service_of(request).recommend(user_id, k, policy)
    if not authenticated:
        answer["user_status"] = None
    return JSONResponse(answer)  # built by the service: no re-validation
