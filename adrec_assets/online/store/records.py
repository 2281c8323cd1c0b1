"""The online store's records and errors: what its methods return and what they raise."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class StoreInputError(ValueError):
    """Base class of the store's input errors; nothing is written when one is raised."""


class InvalidKeyError(StoreInputError):
    """A namespace, user space id, pseudonym, ad id or blob name is empty or malformed."""


class InvalidVectorError(StoreInputError):
    """A vector has the wrong shape, a non-numeric dtype or NaN/inf values."""


class InvalidMetaError(StoreInputError):
    """Live-ad metadata is not a ``dict[str, str]``."""


class InvalidEventError(StoreInputError):
    """An event row is not a JSON-serializable dict with str keys (NaN/inf are not JSON)."""


class InvalidArraysError(StoreInputError):
    """A named blob holds something other than numeric/bool/fixed-width-string arrays."""


class StoreFormatError(ValueError):
    """Stored data was written by an incompatible version of this package."""


class StoreClosedError(RuntimeError):
    """The store was closed; open a new one."""


class StoreUnavailableError(RuntimeError):
    """The backend did not answer: down, timed out, locked past its busy timeout or out of
    disk. What the call would have written was not written (each write is one transaction or
    one script); retry later. The service answers 503 and reports itself degraded."""


class ConcurrentUpdateError(RuntimeError):
    """An optimistic update kept losing races (Redis WATCH) beyond its retry budget."""


@dataclass(frozen=True)
class UserState:
    """A user's online vector and how it got there (the service reports "updated online")."""

    vector: np.ndarray  # (user_dim,) float32
    n_updates: int
    updated_at: float  # unix seconds of the last update


@dataclass(frozen=True)
class LiveAd:
    """An ad added through the API: its content vector is projected by the serving model."""

    ad_id: str
    content_vector: np.ndarray  # (content_dim,) float32
    meta: dict[str, str] = field(default_factory=dict)
    added_at: float = 0.0
