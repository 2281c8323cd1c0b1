"""The in-memory backend: process memory, for tests and simulations (no durability)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from adrec_assets.online.store.base import CONTENT_DIM, USER_DIM, OnlineStore
from adrec_assets.online.store.codec import _decode_live_ad
from adrec_assets.online.store.records import LiveAd, StoreClosedError, UserState


class MemoryState:
    """The data behind one or more :class:`MemoryStore` objects: what the file is to
    :class:`SQLiteStore` or the server to :class:`RedisStore`. Stores opened on one state see
    each other's writes (a reopen, another replica, another namespace); a new state is empty.
    Everything lives in this process only and is gone with it."""

    def __init__(self) -> None:
        # Reentrant: update_user holds it while calling the caller's update function.
        self.lock = threading.RLock()
        self.users: dict[tuple[str, str, str], UserState] = {}
        self.retired: dict[tuple[str, str], float] = {}
        self.live_ads: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.events: dict[str, deque[tuple[int, str]]] = {}
        self.last_seq = 0  # shared by all namespaces, like SQLite's AUTOINCREMENT: never reused
        self.requests: dict[tuple[str, str], tuple[str, float]] = {}
        self.request_expiry: list[tuple[float, tuple[str, str]]] = []  # heap of (expires, key)
        self.leases: dict[tuple[str, str], tuple[str, float]] = {}  # (namespace, name) -> (owner, expires)
        self.claims: dict[tuple[str, str], float] = {}  # (namespace, event key) -> expires
        self.claim_expiry: list[tuple[float, tuple[str, str]]] = []  # heap of (expires, key)
        self.epochs: dict[str, str] = {}  # namespace -> epoch
        self.live_versions: dict[str, int] = {}  # namespace -> changes to its live or retired ads


class MemoryStore(OnlineStore):
    """The store contract in process memory: for tests and simulations, never for serving.

    Why it exists: a simulation posts hundreds of thousands of events, and
    :class:`SQLiteStore` pays a transaction (and with ``synchronous="FULL"`` an fsync) for
    each write. This backend keeps the same validation, encoding and semantics (events as
    JSON, sequence numbers never reused, served requests expiring by the store's clock), so
    code run against it behaves as against the others, minus durability. Thread-safe: one
    lock per :class:`MemoryState` serializes every operation, so an ``update_user`` is
    atomic across threads and across stores sharing the state.
    """

    def __init__(
        self,
        namespace: str,
        *,
        state: MemoryState | None = None,
        user_dim: int = USER_DIM,
        content_dim: int = CONTENT_DIM,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(namespace, user_dim=user_dim, content_dim=content_dim, clock=clock)
        self.state = state if state is not None else MemoryState()
        self._closed = False

    def _open(self) -> MemoryState:
        if self._closed:
            raise StoreClosedError(f"MemoryStore for namespace {self.namespace!r} is closed")
        return self.state

    def _get_users(self, space: str, pseudonyms: list[str]) -> list[UserState | None]:
        state = self._open()
        with state.lock:
            found = [state.users.get((self.namespace, space, p)) for p in pseudonyms]
        return [None if s is None else UserState(s.vector.copy(), s.n_updates, s.updated_at) for s in found]

    def _update_user(self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
        state = self._open()
        key = (self.namespace, space, pseudonym)
        with state.lock:
            current = state.users.get(key)
            new = apply(None if current is None else current.vector.copy())
            stored = np.array(new, dtype=np.float32)
            n_updates = (0 if current is None else current.n_updates) + 1
            state.users[key] = UserState(stored, n_updates, float(self._clock()))
        return stored.copy()

    def _drop_user_space(self, space: str) -> int:
        state = self._open()
        with state.lock:
            doomed = [key for key in state.users if key[0] == self.namespace and key[1] == space]
            for key in doomed:
                del state.users[key]
        return len(doomed)

    def _bump(self, state: MemoryState) -> None:
        state.live_versions[self.namespace] = state.live_versions.get(self.namespace, 0) + 1

    def _live_version(self) -> int:
        state = self._open()
        with state.lock:
            return state.live_versions.get(self.namespace, 0)

    def _retire_ad(self, ad_id: str) -> None:
        state = self._open()
        with state.lock:
            if (self.namespace, ad_id) not in state.retired:
                state.retired[(self.namespace, ad_id)] = float(self._clock())
                self._bump(state)

    def _unretire_ad(self, ad_id: str) -> bool:
        state = self._open()
        with state.lock:
            found = state.retired.pop((self.namespace, ad_id), None) is not None
            if found:
                self._bump(state)
            return found

    def _is_retired(self, ad_id: str) -> bool:
        state = self._open()
        with state.lock:
            return (self.namespace, ad_id) in state.retired

    def _retired_ads(self) -> set[str]:
        state = self._open()
        with state.lock:
            return {ad for namespace, ad in state.retired if namespace == self.namespace}

    def _put_live_ad(self, ad_id: str, blob: bytes) -> None:
        state = self._open()
        with state.lock:
            state.live_ads[(self.namespace, ad_id)] = blob
            self._bump(state)

    def _add_live_ad(self, ad_id: str, blob: bytes) -> bool:
        state = self._open()
        key = (self.namespace, ad_id)
        with state.lock:
            if key in state.live_ads and key not in state.retired:
                return False
            state.live_ads[key] = blob
            state.retired.pop(key, None)
            self._bump(state)
            return True

    def _live_ads(self) -> list[LiveAd]:
        state = self._open()
        with state.lock:
            rows = [(ad, blob) for (namespace, ad), blob in state.live_ads.items() if namespace == self.namespace]
        return [_decode_live_ad(ad, blob) for ad, blob in rows]

    def _drop_live_ad(self, ad_id: str) -> bool:
        state = self._open()
        with state.lock:
            found = state.live_ads.pop((self.namespace, ad_id), None) is not None
            if found:
                self._bump(state)
            return found

    def _append_events(self, rows: list[str]) -> list[int]:
        state = self._open()
        with state.lock:
            first = state.last_seq + 1
            state.last_seq += len(rows)
            queue = state.events.setdefault(self.namespace, deque())
            queue.extend(zip(range(first, first + len(rows)), rows))
        return list(range(first, first + len(rows)))

    def _append_events_once(self, keyed_rows: list[tuple[str, str]], ttl_seconds: float) -> list[int | None]:
        state = self._open()
        now = float(self._clock())
        seqs: list[int | None] = []
        with state.lock:  # claim and queue under one lock: no other caller in between
            while state.claim_expiry and state.claim_expiry[0][0] < now:  # forget expired claims
                expires, old = heapq.heappop(state.claim_expiry)
                if state.claims.get(old) == expires:  # not claimed again since
                    del state.claims[old]
            queue = state.events.setdefault(self.namespace, deque())
            for key, row in keyed_rows:
                claimed = state.claims.get((self.namespace, key))
                if claimed is not None and claimed >= now:
                    seqs.append(None)
                    continue
                state.claims[(self.namespace, key)] = now + ttl_seconds
                heapq.heappush(state.claim_expiry, (now + ttl_seconds, (self.namespace, key)))
                state.last_seq += 1
                queue.append((state.last_seq, row))
                seqs.append(state.last_seq)
        return seqs

    def _recorded_events(self, keys: list[str]) -> list[bool]:
        state = self._open()
        now = float(self._clock())
        with state.lock:
            return [state.claims.get((self.namespace, key), -1.0) >= now for key in keys]

    def _epoch(self, candidate: str) -> str:
        state = self._open()
        with state.lock:
            return state.epochs.setdefault(self.namespace, candidate)

    def _pending_events(self, limit: int) -> list[tuple[int, str]]:
        state = self._open()
        with state.lock:
            return list(itertools.islice(state.events.get(self.namespace, ()), limit))

    def _mark_flushed(self, up_to_seq: int) -> int:
        state = self._open()
        with state.lock:
            queue = state.events.get(self.namespace)
            dropped = 0
            while queue and queue[0][0] <= up_to_seq:
                queue.popleft()
                dropped += 1
        return dropped

    def _hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        state = self._open()
        now = float(self._clock())
        with state.lock:
            holder = state.leases.get((self.namespace, name))
            if holder is not None and holder[0] != owner and holder[1] > now:
                return False
            state.leases[(self.namespace, name)] = (owner, now + ttl_seconds)
            return True

    def _release_lease(self, name: str, owner: str) -> bool:
        state = self._open()
        with state.lock:
            holder = state.leases.get((self.namespace, name))
            if holder is None or holder[0] != owner:
                return False
            del state.leases[(self.namespace, name)]
            return True

    def _put_request(self, request_id: str, payload: str, ttl_seconds: float) -> None:
        state = self._open()
        now = float(self._clock())
        key = (self.namespace, request_id)
        with state.lock:
            state.requests[key] = (payload, now + ttl_seconds)
            heapq.heappush(state.request_expiry, (now + ttl_seconds, key))
            while state.request_expiry and state.request_expiry[0][0] < now:  # forget expired records
                expires, old = heapq.heappop(state.request_expiry)
                if old in state.requests and state.requests[old][1] == expires:  # not re-put since
                    del state.requests[old]

    def _get_request(self, request_id: str) -> str | None:
        state = self._open()
        with state.lock:
            found = state.requests.get((self.namespace, request_id))
        if found is None or found[1] < float(self._clock()):
            return None
        return found[0]

    def _put_blob(self, name: str, blob: bytes) -> None:
        state = self._open()
        with state.lock:
            state.blobs[(self.namespace, name)] = blob

    def _get_blob(self, name: str) -> bytes | None:
        state = self._open()
        with state.lock:
            return state.blobs.get((self.namespace, name))

    def _update_blob(self, name: str, apply: Callable[[bytes | None], bytes]) -> bytes:
        state = self._open()
        with state.lock:
            blob = apply(state.blobs.get((self.namespace, name)))
            state.blobs[(self.namespace, name)] = blob
        return blob

    def ping(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True  # the data stays in its MemoryState: a store reopened on it sees it

    def __repr__(self) -> str:
        return f"MemoryStore(namespace={self.namespace!r})"
