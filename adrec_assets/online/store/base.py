"""The online store contract: :class:`OnlineStore` validates and encodes, backends store.

What is stored (every key prefixed by the store's ``namespace``, the source name):

* user vectors learnt online, keyed by (user space id, pseudonym): a vector learnt against
  one trained user space is meaningless in the next, so after a reload to a new space the
  old keys are simply never read again (:meth:`OnlineStore.drop_user_space` cleans them up).
  Only 32-hex pseudonyms are accepted as keys, never raw user ids.
* retired ads, live ads added through the API, an impression/click event queue (at-least-
  once: events are handed out again until :meth:`OnlineStore.mark_flushed`), and small
  named array blobs (e.g. a bandit posterior).
* event claims: :meth:`OnlineStore.append_events_once` claims each event's key and queues
  the event in one atomic step, so of identical events posted at the same moment (threads,
  processes, replicas) exactly one is queued; a claim lasts its TTL.
* the store's epoch (:meth:`OnlineStore.epoch`): an id created once with the store's data
  and kept in it. Sequence numbers are unique only within one epoch: a fresh store (a new
  SQLite file, a Redis emptied or restarted without persistence) numbers from 1 again under
  a new epoch, so names built from (epoch, seq) never repeat.

A backend subclasses :class:`OnlineStore` and implements its abstract ``_`` hooks (inputs
already validated, payloads already encoded by :mod:`.codec`) plus ``ping`` and ``close``, and
says which of its exceptions mean "the backend did not answer" (``_is_unavailable``): every
public method raises those as :class:`StoreUnavailableError`, so callers (the service's 503
and its health) need not know the backend.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from adrec_assets.online.store.codec import (
    _check_ad_id,
    _check_meta,
    _check_namespace,
    _check_pseudonym,
    _check_token,
    _check_user_record,
    _check_vector,
    _decode_arrays,
    _encode_arrays,
    _encode_live_ad,
    _event_json,
)
from adrec_assets.online.store.records import LiveAd, StoreInputError, StoreUnavailableError, UserState

#: User-space dimension of the trained models (see ``user_embeddings``).
USER_DIM = 128
#: A user's stored record is at most this many float32 numbers (4 KB): the vector, then
#: optionally its posterior (:mod:`adrec_assets.online.user_posterior`).
MAX_USER_RECORD = 1024
#: Content (encoder) dimension of an ad (``AD_EMBEDDING_DIM`` of the encoders).
CONTENT_DIM = 768


class OnlineStore(ABC):
    """The contract every backend implements; public methods validate, backends store.

    Input errors (:class:`StoreInputError` subclasses) are raised before anything is written.
    """

    def __init__(
        self,
        namespace: str,
        *,
        user_dim: int = USER_DIM,
        content_dim: int = CONTENT_DIM,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.namespace = _check_namespace(namespace)
        self.user_dim = int(user_dim)
        self.content_dim = int(content_dim)
        self._clock = clock

    # -- user vectors
    def get_user(self, space: str, pseudonym: str) -> np.ndarray | None:
        """The user's online vector in ``space``, or None (never updated there)."""
        state = self.get_user_state(space, pseudonym)
        return None if state is None else state.vector

    def get_user_state(self, space: str, pseudonym: str) -> UserState | None:
        """Vector plus update count and last-update time, or None."""
        return self._get_users(_check_token(space, "user space id"), [_check_pseudonym(pseudonym)])[0]

    def get_users(self, space: str, pseudonyms: Sequence[str]) -> list[np.ndarray | None]:
        """Vectors aligned with ``pseudonyms`` (None where a user has none in ``space``)."""
        space = _check_token(space, "user space id")
        keys = [_check_pseudonym(p) for p in pseudonyms]
        return [None if s is None else s.vector for s in self._get_users(space, keys)] if keys else []

    def update_user(self, space: str, pseudonym: str, update: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
        """Atomically replace the user's record by ``update(current or None)`` and count it.

        A record is the user's ``user_dim`` vector, optionally followed by more numbers (their
        posterior), at most :data:`MAX_USER_RECORD` in all.

        Concurrent updates of one user (threads, processes, replicas) are serialized, so none
        is lost. ``update`` must be a pure function of its argument: the Redis backend may call
        it again after losing a race. If it raises, or returns an invalid vector
        (:class:`InvalidVectorError`), nothing is written. Returns the stored vector.
        """
        space = _check_token(space, "user space id")
        pseudonym = _check_pseudonym(pseudonym)
        if not callable(update):
            raise TypeError("update must be callable: current vector (or None) -> new vector")

        def apply(current: np.ndarray | None) -> np.ndarray:
            new = update(None if current is None else current.copy())
            return _check_user_record(
                new, self.user_dim, MAX_USER_RECORD, f"update_user({space!r}, {pseudonym!r}) result"
            )

        return self._update_user(space, pseudonym, apply)

    def drop_user_space(self, space: str) -> int:
        """Delete every user vector of an old user space (housekeeping after a reload);
        returns how many were deleted."""
        return self._drop_user_space(_check_token(space, "user space id"))

    # -- retired ads
    def retire_ad(self, ad_id: str) -> None:
        """Mark ``ad_id`` retired (idempotent)."""
        self._retire_ad(_check_ad_id(ad_id))

    def unretire_ad(self, ad_id: str) -> bool:
        """Make ``ad_id`` recommendable again; False if it was not retired."""
        return self._unretire_ad(_check_ad_id(ad_id))

    def is_retired(self, ad_id: str) -> bool:
        return self._is_retired(_check_ad_id(ad_id))

    def retired_ads(self) -> set[str]:
        return self._retired_ads()

    # -- live ads
    def put_live_ad(self, ad_id: str, content_vector: np.ndarray, meta: Mapping[str, str] | None = None) -> None:
        """Store (or replace) an ad added through the API, so restarts and replicas serve it."""
        ad_id = _check_ad_id(ad_id)
        vector = _check_vector(content_vector, self.content_dim, f"content_vector of live ad {ad_id!r}")
        self._put_live_ad(ad_id, _encode_live_ad(vector, _check_meta(meta or {}, ad_id), float(self._clock())))

    def add_live_ad(
        self, ad_id: str, content_vector: np.ndarray, meta: Mapping[str, str] | None = None
    ) -> float | None:
        """Store a new live ad unless one of that id is live (stored and not retired), in one
        atomic step: of concurrent adds of one id (threads, workers, replicas) exactly one
        succeeds. A retired ad is replaced and un-retired in the same step. Returns the stored
        ``added_at`` (what :meth:`live_ads` will report), or None when refused."""
        ad_id = _check_ad_id(ad_id)
        vector = _check_vector(content_vector, self.content_dim, f"content_vector of live ad {ad_id!r}")
        added_at = float(self._clock())
        blob = _encode_live_ad(vector, _check_meta(meta or {}, ad_id), added_at)
        return added_at if self._add_live_ad(ad_id, blob) else None

    def live_version(self) -> int:
        """A counter of changes to the live and retired ads (0 for none yet): replicas poll it
        and read the ads themselves only when it moved."""
        return self._live_version()

    def live_ads(self) -> list[LiveAd]:
        """All live ads, sorted by ad id."""
        return sorted(self._live_ads(), key=lambda a: a.ad_id)

    def drop_live_ad(self, ad_id: str) -> bool:
        """Forget a live ad; False if there was none."""
        return self._drop_live_ad(_check_ad_id(ad_id))

    # -- event queue
    def append_events(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Queue JSON-serializable event dicts (all or none); returns their sequence numbers,
        strictly increasing across calls (gaps allowed, never reused)."""
        encoded = _event_json(rows)
        return self._append_events(encoded) if encoded else []

    def append_events_once(
        self, keyed_rows: Sequence[tuple[str, Mapping[str, Any]]], ttl_seconds: float
    ) -> list[int | None]:
        """Queue each ``(key, row)`` whose key is not claimed yet and claim it for
        ``ttl_seconds``, atomically: of identical events posted at the same moment by threads,
        processes or replicas, exactly one gets a sequence number, the others None (a
        duplicate; so does a key repeated in one call). A crash leaves a key claimed with its
        row queued, or neither. All rows are validated first: a bad one queues and claims
        nothing. Keys are event ids (printable ASCII, no spaces)."""
        if isinstance(keyed_rows, (str, bytes, Mapping)) or not isinstance(keyed_rows, Sequence):
            raise StoreInputError(f"append_events_once takes a list of (key, row) pairs, got {keyed_rows!r}")
        pairs = []
        for i, pair in enumerate(keyed_rows):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise StoreInputError(f"keyed row {i} must be a (key, row) pair, got {pair!r}")
            pairs.append(pair)
        keys = [_check_token(key, "event key") for key, _ in pairs]
        ttl = _check_ttl(ttl_seconds)
        encoded = _event_json([row for _, row in pairs])
        return self._append_events_once(list(zip(keys, encoded)), ttl) if encoded else []

    def recorded_events(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is claimed (its event was queued by :meth:`append_events_once`
        and its claim has not expired), aligned with ``keys``."""
        checked = [_check_token(key, "event key") for key in keys]
        return self._recorded_events(checked) if checked else []

    def epoch(self) -> str:
        """This store's epoch: created once with its data (on first use) and kept in it; the
        same for every replica and reopen of that data, new for a fresh store. Event files are
        named with it, so a fresh store, whose sequence numbers start again at 1, never
        replaces files an earlier one wrote."""
        return self._epoch(uuid.uuid4().hex[:16])

    def pending_events(self, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` events not yet marked flushed, as (seq, row), seq ascending.
        The same events come back on every call (and after a crash) until ``mark_flushed``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise StoreInputError(f"limit must be a positive int, got {limit!r}")
        return [(seq, json.loads(row)) for seq, row in self._pending_events(limit)]

    def mark_flushed(self, up_to_seq: int) -> int:
        """Drop every queued event with seq <= ``up_to_seq`` (after its file is written);
        returns how many were dropped."""
        if isinstance(up_to_seq, bool) or not isinstance(up_to_seq, (int, np.integer)):
            raise StoreInputError(f"up_to_seq must be an int sequence number, got {up_to_seq!r}")
        return self._mark_flushed(int(up_to_seq))

    # -- leases (one replica at a time does a chore)
    def hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Take the lease ``name`` for ``owner``, or extend it if ``owner`` holds it; False
        while another owner holds an unexpired one. Replicas use it so that only one of them
        flushes the shared event queue (two flushing at once could write overlapping batches,
        i.e. duplicate events). A holder that dies loses the lease after ``ttl_seconds``."""
        name, owner = _check_token(name, "lease name"), _check_token(owner, "lease owner")
        return self._hold_lease(name, owner, _check_ttl(ttl_seconds))

    def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease back if ``owner`` holds it (a replica shutting down cleanly), so
        another can take it at once instead of after the TTL; False if it did not hold it."""
        return self._release_lease(_check_token(name, "lease name"), _check_token(owner, "lease owner"))

    # -- served requests (what a slate was, so its events can be attributed)
    def put_request(self, request_id: str, record: Mapping[str, Any], ttl_seconds: float) -> None:
        """Remember what request ``request_id`` served (a JSON-serializable dict) for
        ``ttl_seconds``: events referencing it are checked and enriched with it."""
        request_id = _check_token(request_id, "request id")
        if not (isinstance(ttl_seconds, (int, float)) and ttl_seconds > 0):
            raise StoreInputError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
        (payload,) = _event_json([record])
        self._put_request(request_id, payload, float(ttl_seconds))

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The record of a served request, or None (unknown or expired)."""
        payload = self._get_request(_check_token(request_id, "request id"))
        return None if payload is None else json.loads(payload)

    # -- named array blobs
    def put_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the named blob atomically (readers see the old or the new dict, never a mix)."""
        name = _check_token(name, "blob name")
        self._put_blob(name, _encode_arrays(name, arrays))

    def get_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """The named blob's arrays (fresh copies), or None if never stored."""
        blob = self._get_blob(_check_token(name, "blob name"))
        return None if blob is None else _decode_arrays(blob)

    def update_arrays(
        self, name: str, update: Callable[[dict[str, np.ndarray] | None], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """Atomically replace the named blob by ``update(current arrays or None)``; returns
        what was stored. Like :meth:`update_user`: ``update`` may run more than once under
        contention (keep it pure); a raise or an invalid result stores nothing. Replicas
        merging what each learnt into one shared blob use this instead of last-write-wins."""
        name = _check_token(name, "blob name")

        def apply(current: bytes | None) -> bytes:
            return _encode_arrays(name, update(None if current is None else _decode_arrays(current)))

        return _decode_arrays(self._update_blob(name, apply))

    # -- lifecycle
    @abstractmethod
    def ping(self) -> bool:
        """True when the backend answers (for ``/healthz``); never raises."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; later calls raise :class:`StoreClosedError`."""

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- backend hooks (inputs already validated / encoded)
    @abstractmethod
    def _get_users(self, space: str, pseudonyms: list[str]) -> list[UserState | None]: ...

    @abstractmethod
    def _update_user(
        self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]
    ) -> np.ndarray: ...

    @abstractmethod
    def _drop_user_space(self, space: str) -> int: ...

    @abstractmethod
    def _retire_ad(self, ad_id: str) -> None: ...

    @abstractmethod
    def _unretire_ad(self, ad_id: str) -> bool: ...

    @abstractmethod
    def _is_retired(self, ad_id: str) -> bool: ...

    @abstractmethod
    def _retired_ads(self) -> set[str]: ...

    @abstractmethod
    def _put_live_ad(self, ad_id: str, blob: bytes) -> None: ...

    @abstractmethod
    def _live_ads(self) -> list[LiveAd]: ...

    @abstractmethod
    def _add_live_ad(self, ad_id: str, blob: bytes) -> bool: ...

    @abstractmethod
    def _live_version(self) -> int: ...

    def _is_unavailable(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by the backend) means it did not answer; see the module."""
        return False

    @abstractmethod
    def _drop_live_ad(self, ad_id: str) -> bool: ...

    @abstractmethod
    def _append_events(self, rows: list[str]) -> list[int]: ...

    @abstractmethod
    def _append_events_once(self, keyed_rows: list[tuple[str, str]], ttl_seconds: float) -> list[int | None]: ...

    @abstractmethod
    def _recorded_events(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    def _epoch(self, candidate: str) -> str:
        """The stored epoch, or ``candidate`` stored atomically as the epoch if none is."""

    @abstractmethod
    def _pending_events(self, limit: int) -> list[tuple[int, str]]: ...

    @abstractmethod
    def _mark_flushed(self, up_to_seq: int) -> int: ...

    @abstractmethod
    def _hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool: ...

    @abstractmethod
    def _release_lease(self, name: str, owner: str) -> bool: ...

    @abstractmethod
    def _put_request(self, request_id: str, payload: str, ttl_seconds: float) -> None: ...

    @abstractmethod
    def _get_request(self, request_id: str) -> str | None: ...

    @abstractmethod
    def _put_blob(self, name: str, blob: bytes) -> None: ...

    @abstractmethod
    def _get_blob(self, name: str) -> bytes | None: ...

    @abstractmethod
    def _update_blob(self, name: str, apply: Callable[[bytes | None], bytes]) -> bytes: ...


def _check_ttl(ttl_seconds: object) -> float:
    if not (
        isinstance(ttl_seconds, (int, float)) and not isinstance(ttl_seconds, bool) and 0 < ttl_seconds < float("inf")
    ):
        raise StoreInputError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
    return float(ttl_seconds)


def _guard(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: OnlineStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            if self._is_unavailable(exc):
                raise StoreUnavailableError(
                    f"{type(self).__name__} {method.__name__}: {type(exc).__name__}: {exc}"
                ) from exc
            raise

    return guarded


for _name, _member in list(vars(OnlineStore).items()):
    if not _name.startswith("_") and callable(_member) and _name not in ("ping", "close"):
        setattr(OnlineStore, _name, _guard(_member))
