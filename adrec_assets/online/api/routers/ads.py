"""``/v1/ads``: add and retire live ads (writes, behind the token), read an ad and its image
(reads, behind the read token when the service has one)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Path, Response

from adrec_assets.online.api.deps import Authorized, ReadAccess, ServiceDep
from adrec_assets.online.api.errors import ServiceErrorResponse
from adrec_assets.online.api.schemas import AdAdded, AdInfo, AdRetired, NewAd
from adrec_assets.online.service import MAX_ID_CHARS

router = APIRouter(tags=["ads"])

AdId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]


@router.post("/v1/ads", response_model=AdAdded, status_code=201)
def add_ad(_: Authorized, service: ServiceDep, ad: NewAd) -> dict:
    """Encode, project and index a new ad: recommendable in the next request."""
    image = None
    if ad.image_base64 is not None:
        try:
            image = base64.b64decode(ad.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceErrorResponse(422, "image_base64 is not valid base64", "image_base64") from None
    return service.add_ad(ad.ad_id, ad.text, image, fields=ad.fields)


@router.delete("/v1/ads/{ad_id}", response_model=AdRetired)
def retire_ad(_: Authorized, service: ServiceDep, ad_id: AdId) -> dict:
    """Retire an ad: never served again, also after a reload, until the source drops it."""
    return service.retire_ad(ad_id)


@router.get("/v1/ads/{ad_id}", response_model=AdInfo)
def ad(_: ReadAccess, service: ServiceDep, ad_id: AdId) -> dict:
    """An ad's text and whether it has an image."""
    state = service.state
    return {"ad_id": ad_id, **service.ad_info(state, ad_id)}


@router.get("/v1/ads/{ad_id}/image", responses={200: {"content": {"image/*": {}}}})
def ad_image(_: ReadAccess, service: ServiceDep, ad_id: AdId) -> Response:
    """The ad's image bytes."""
    data = service.ad_image(ad_id)
    return Response(content=data, media_type=image_type(data))


def image_type(data: bytes) -> str:
    """The media type of image bytes, by their signature."""
    for signature, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                            (b"RIFF", "image/webp")):  # fmt: skip
        if data.startswith(signature):
            return kind
    return "application/octet-stream"
