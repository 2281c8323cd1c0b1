"""The API's request and response models and its shared limits (the OpenAPI document at
``/openapi.json`` and ``/docs`` is generated from them). Every refusal has the shape of
:class:`ErrorBody`: ``{"error": ..., "field": ...}`` with a 4xx status."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adrec_assets.online.service import MAX_ID_CHARS

MAX_BODY_BYTES = 8 * 1024 * 1024  # a 5 MiB image, base64-encoded, plus its JSON
MAX_EVENTS_PER_BATCH = 1000

IdText = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


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
    user_status: Literal["known", "updated_online", "new"] | None = Field(
        description="known: trained vector; updated_online: moved by clicks since; new: the global-mean prior. "
        "Null unless the caller holds the read or the write token (or the service runs without a token, on loopback)"
    )
    policy: str
    randomized: bool = Field(description="slate order permuted for position-bias estimation")
    experiments: list[Assignment]
    items: list[Item]
    recorded: bool = Field(
        True,
        description="false when the online store could not remember the slate (an outage): it is still served, "
        "but its events are refused as unknown",
    )


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
        description='Structured fields the source declares (ad_fields.json), e.g. {"year": 1995, '
        '"genres": "Comedy|Drama"}; a declared field left out counts as unknown',
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
    reasons: list[str] = Field(default_factory=list, description="why it is degraded (empty when ok)")
    source: str
    model_version: str | None
    n_ads: int
    index_kind: str | None
    store: str
    encoder: str
    pending_events: int = Field(description="queued events not yet flushed, counted up to 1,000; -1: store unreachable")


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


#: The refusals every operation documents (one :class:`ErrorBody` shape for all of them).
ERRORS = {status: {"model": ErrorBody} for status in (401, 404, 409, 413, 422, 503)}
