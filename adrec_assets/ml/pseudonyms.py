"""Keyed pseudonyms for users: artifacts never hold a raw user identifier.

A pseudonym is HMAC-SHA256(key, raw_id), hex, truncated to 128 bits. Without the key a
pseudonym cannot be linked back to a user (no dictionary attack on guessable ids); an
operator holding the key recomputes ``pseudonymize(raw_id, key)`` to find a user's row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import warnings
from collections.abc import Iterable

import numpy as np

KEY_ENV_VAR = "ADREC_ID_KEY"
DEV_KEY = "adrec-dev-key-NOT-FOR-PRODUCTION"
PSEUDONYM_HEX_CHARS = 32


class InsecureKeyWarning(UserWarning):
    """The development pseudonym key is in use: pseudonyms are linkable by anyone."""


def resolve_key(explicit: str | None = None) -> bytes:
    """Key from the argument, else ``$ADREC_ID_KEY``, else the dev key with a loud warning."""
    key = explicit or os.environ.get(KEY_ENV_VAR, "")
    if not key:
        warnings.warn(
            f"!!! {KEY_ENV_VAR} is not set: user pseudonyms use the PUBLIC development key and "
            f"can be reversed by anyone who can guess user ids. Set {KEY_ENV_VAR} to a secret "
            "(e.g. `openssl rand -hex 32`) before processing real users. !!!",
            InsecureKeyWarning,
            stacklevel=2,
        )
        key = DEV_KEY
    return key.encode("utf-8")


def pseudonymize(raw_id: str, key: bytes) -> str:
    digest = hmac.new(key, str(raw_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]


def pseudonymize_many(raw_ids: Iterable[str], key: bytes) -> np.ndarray:
    """Pseudonymize each distinct id once (click logs repeat users many times)."""
    # Object dtype keeps ids exactly as given (numpy's fixed-width str drops trailing NULs).
    raw = np.asarray([str(r) for r in raw_ids], dtype=object)
    uniq, inverse = np.unique(raw, return_inverse=True)
    mapped = np.asarray([pseudonymize(u, key) for u in uniq], dtype=f"<U{PSEUDONYM_HEX_CHARS}")
    return mapped[inverse] if len(raw) else np.zeros(0, dtype=f"<U{PSEUDONYM_HEX_CHARS}")
