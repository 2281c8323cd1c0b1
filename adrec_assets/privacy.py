"""Keyed pseudonyms for users: artifacts never hold a raw user identifier.

A pseudonym is HMAC-SHA256(key, raw_id), hex, truncated to 128 bits. Without the key a
pseudonym cannot be linked back to a user (no dictionary attack on guessable ids); an
operator holding the key recomputes ``pseudonymize(raw_id, key)`` to find a user's row.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import warnings
from collections.abc import Iterable

import numpy as np

from adrec_assets.settings import ALLOW_DEV_KEY, ID_KEY

DEV_KEY = "adrec-dev-key-NOT-FOR-PRODUCTION"
PSEUDONYM_HEX_CHARS = 32
MIN_KEY_CHARS = 16
#: What a pseudonym looks like: the HMAC's hex digest, truncated. Every reader that accepts
#: pseudonyms (source files, the online store, experiments, the checks) validates with it.
PSEUDONYM_PATTERN = re.compile(f"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}")
#: Values people leave in config templates: as guessable as no key at all.
PLACEHOLDER_KEYS = frozenset({"change-me", "changeme", "change_me", "secret", "password", "key", "xxx", "todo"})


class InsecureKeyWarning(UserWarning):
    """The development pseudonym key is in use: pseudonyms are linkable by anyone."""


class InsecureKeyError(RuntimeError):
    """No usable secret key: pseudonyms made with it could be reversed by guessing user ids."""


def resolve_key(explicit: str | None = None) -> bytes:
    """The pseudonym key: the argument, else ``$ADREC_ID_KEY``.

    An empty, placeholder (``CHANGE-ME``) or short key is refused, because pseudonyms made
    with a guessable key are as linkable as raw ids. A development machine opts in to the
    public development key with ``ADREC_ALLOW_DEV_KEY=1`` (``make run`` does), and gets a
    loud warning.
    """
    key = explicit or ID_KEY.get() or ""
    problem = None
    if not key:
        problem = f"{ID_KEY.name} is not set"
    elif key.strip().lower() in PLACEHOLDER_KEYS:
        problem = f"{ID_KEY.name} is the placeholder {key!r}"
    elif len(key) < MIN_KEY_CHARS and key != DEV_KEY:
        problem = f"{ID_KEY.name} has {len(key)} characters (< {MIN_KEY_CHARS})"
    if problem is None and key != DEV_KEY:
        return key.encode("utf-8")
    if not ALLOW_DEV_KEY.get():
        raise InsecureKeyError(
            f"{problem or 'the public development key is configured'}: refusing to pseudonymize users with a "
            f"guessable key. Set {ID_KEY.name} to a secret (e.g. `openssl rand -hex 32`); on a development "
            f"machine only, {ALLOW_DEV_KEY.name}=1 allows the public development key."
        )
    warnings.warn(
        f"!!! {problem or 'the development key is configured'}: user pseudonyms use the PUBLIC development key "
        f"({ALLOW_DEV_KEY.name}=1) and can be reversed by anyone who can guess user ids. Set {ID_KEY.name} to a "
        "secret (e.g. `openssl rand -hex 32`) before processing real users. !!!",
        InsecureKeyWarning,
        stacklevel=2,
    )
    return DEV_KEY.encode("utf-8")


def key_fingerprint(key: bytes) -> str:
    """A short public tag of a key (an HMAC of a constant, so it reveals nothing of the key):
    recorded with the click graph so that a reader using another key can say so."""
    return hmac.new(key, b"adrec pseudonym key fingerprint v1", hashlib.sha256).hexdigest()[:16]


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


def redact(raw_id: object) -> str:
    """What an error message or log may say about a raw user id: its length and type only, so a
    message that reaches an event log or a ticket never carries the identifier. Point at the
    row instead (file and line), which the operator can open."""
    text = str(raw_id)
    return f"<redacted {type(raw_id).__name__} of {len(text)} chars>"
