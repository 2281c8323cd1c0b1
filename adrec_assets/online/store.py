"""The online store: state the service shares between restarts and between replicas.

Implementations of one contract (:class:`OnlineStore`):

* :class:`SQLiteStore` (default) — one embedded file (``data/online/``), WAL mode, nothing
  to start; safe for several threads (one connection per thread) and several processes on
  one host (SQLite file locks; writes are ``BEGIN IMMEDIATE`` transactions).
* :class:`RedisStore` — several service replicas share one Redis.
* :class:`MemoryStore` — process memory, for tests and simulations (no durability).

:func:`open_store` picks by URL: ``redis://`` / ``rediss://`` -> Redis, anything else is a
SQLite path.

What is stored (every key prefixed by the store's ``namespace``, the source name):

* user vectors learnt online, keyed by (user space id, pseudonym): a vector learnt against
  one trained user space is meaningless in the next, so after a reload to a new space the
  old keys are simply never read again (:meth:`OnlineStore.drop_user_space` cleans them up).
  Only 32-hex pseudonyms are accepted as keys, never raw user ids.
* retired ads, live ads added through the API, an impression/click event queue (at-least-
  once: events are handed out again until :meth:`OnlineStore.mark_flushed`), and small
  named array blobs (e.g. a bandit posterior).

Nothing is pickled: vectors are raw little-endian float32 bytes, array blobs a JSON header
(dtype, shape, offset) followed by the raw bytes, events and metadata JSON.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import re
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from adrec_assets.privacy import PSEUDONYM_HEX_CHARS

#: User-space dimension of the trained models (see ``user_embeddings``).
USER_DIM = 128
#: Content (encoder) dimension of an ad (``AD_EMBEDDING_DIM`` of the encoders).
CONTENT_DIM = 768
SQLITE_FILENAME = "adrec-online.sqlite3"
REDIS_PREFIXES = ("redis://", "rediss://")
SCHEMA_VERSION = 1

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TOKEN = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces: user space ids, blob names
_PSEUDONYM = re.compile(rf"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}")
_ARRAY_KINDS = "biufcSU"  # numeric, bool and fixed-width strings: all decodable without pickle
_BLOB_MAGIC = b"ADRB"


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
    """Stored data was written by an incompatible version of this module."""


class StoreClosedError(RuntimeError):
    """The store was closed; open a new one."""


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


def default_sqlite_path() -> Path:
    """``$ADREC_DATA_DIR/online/adrec-online.sqlite3`` (default: the checkout's ``data/``)."""
    from adrec_assets.sources.catalog import data_dir  # lazy: pulls pandas

    return data_dir() / "online" / SQLITE_FILENAME


# ---------------------------------------------------------------------- validation / encoding
def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidKeyError(
            f"namespace must be a source name of letters, digits, '_', '.', '-' (1-128 chars), got {namespace!r}"
        )
    return namespace


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidKeyError(f"{what} must be 1-256 printable ASCII chars without spaces, got {value!r}")
    return value


def _check_pseudonym(pseudonym: object) -> str:
    if not isinstance(pseudonym, str) or not _PSEUDONYM.fullmatch(pseudonym):
        raise InvalidKeyError(
            f"pseudonym must be {PSEUDONYM_HEX_CHARS} lowercase hex chars (pseudonymize(raw_id, key)), got "
            f"{pseudonym!r}; the online store never keys on raw user ids"
        )
    return pseudonym


def _check_ad_id(ad_id: object) -> str:
    if not isinstance(ad_id, str) or not ad_id or "\x00" in ad_id:
        raise InvalidKeyError(f"ad id must be a non-empty str without NUL, got {ad_id!r}")
    return ad_id


def _check_vector(vector: object, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(vector)
    if arr.dtype.kind not in "fiu":
        raise InvalidVectorError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    if arr.shape != (dim,):
        raise InvalidVectorError(f"{what}: expected shape ({dim},), got {arr.shape}")
    arr = np.asarray(arr, dtype="<f4")
    if not np.isfinite(arr).all():
        raise InvalidVectorError(f"{what}: contains NaN or inf (as float32)")
    return arr


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _vector_from(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)  # a writable copy


def _check_meta(meta: object, ad_id: str) -> dict[str, str]:
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidMetaError(f"meta of live ad {ad_id!r} must be a dict[str, str], got {meta!r}")
    return dict(meta)


def _event_json(rows: object) -> list[str]:
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise InvalidEventError(f"append_events takes a list of dict rows, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not all(isinstance(k, str) for k in row):
            raise InvalidEventError(f"event row {i} must be a dict with str keys, got {row!r}")
        try:
            out.append(json.dumps(dict(row), allow_nan=False, separators=(",", ":"), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise InvalidEventError(
                f"event row {i} is not JSON-serializable ({exc}); convert numpy values with .item()"
            ) from None
    return out


def _pack(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _BLOB_MAGIC + struct.pack("<I", len(head)) + head + payload


def _unpack(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    if blob[:4] != _BLOB_MAGIC:
        raise StoreFormatError("stored blob lacks the adrec header; it was not written by this module")
    (n,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8 : 8 + n].decode("utf-8")), memoryview(blob)[8 + n :]


def _encode_arrays(name: str, arrays: object) -> bytes:
    if not isinstance(arrays, Mapping):
        raise InvalidArraysError(f"arrays {name!r}: expected a dict[str, np.ndarray], got {type(arrays).__name__}")
    entries, chunks, offset = [], [], 0
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise InvalidArraysError(f"arrays {name!r}: keys must be non-empty str, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in _ARRAY_KINDS:
            raise InvalidArraysError(f"arrays {name!r}[{key!r}]: dtype {arr.dtype} cannot be stored without pickle")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise InvalidArraysError(f"arrays {name!r}[{key!r}]: contains NaN or inf; shared model state must be finite")
        data = np.ascontiguousarray(arr).tobytes()
        entries.append({"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    return _pack({"arrays": entries}, b"".join(chunks))


def _decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    header, payload = _unpack(blob)
    out = {}
    for e in header["arrays"]:
        raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
        out[e["key"]] = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
    return out


def _encode_live_ad(vector: np.ndarray, meta: dict[str, str], added_at: float) -> bytes:
    return _pack({"meta": meta, "added_at": added_at}, _vector_bytes(vector))


def _decode_live_ad(ad_id: str, blob: bytes) -> LiveAd:
    header, payload = _unpack(blob)
    return LiveAd(ad_id, _vector_from(bytes(payload)), dict(header["meta"]), float(header["added_at"]))


# ---------------------------------------------------------------------- the contract
class OnlineStore(ABC):
    """The contract both backends implement; public methods validate, backends store.

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
        """Atomically replace the user's vector by ``update(current or None)`` and count it.

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
            return _check_vector(new, self.user_dim, f"update_user({space!r}, {pseudonym!r}) result")

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
        if not (isinstance(ttl_seconds, (int, float)) and not isinstance(ttl_seconds, bool) and ttl_seconds > 0):
            raise StoreInputError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
        return self._hold_lease(name, owner, float(ttl_seconds))

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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- backend hooks (inputs already validated / encoded)
    @abstractmethod
    def _get_users(self, space: str, pseudonyms: list[str]) -> list[UserState | None]: ...

    @abstractmethod
    def _update_user(self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray: ...

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
    def _drop_live_ad(self, ad_id: str) -> bool: ...

    @abstractmethod
    def _append_events(self, rows: list[str]) -> list[int]: ...

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


# ---------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    namespace TEXT NOT NULL, space TEXT NOT NULL, pseudonym TEXT NOT NULL,
    vector BLOB NOT NULL, n_updates INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, space, pseudonym)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retired_ads (
    namespace TEXT NOT NULL, ad_id TEXT NOT NULL, retired_at REAL NOT NULL,
    PRIMARY KEY (namespace, ad_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS live_ads (
    namespace TEXT NOT NULL, ad_id TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (namespace, ad_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    namespace TEXT NOT NULL, name TEXT NOT NULL, blob BLOB NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
-- AUTOINCREMENT: a seq is never reused, even after every row was flushed and deleted
-- (plain rowids restart at max+1, which would overwrite already flushed event files).
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL, row TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_namespace ON events (namespace, seq);
CREATE TABLE IF NOT EXISTS requests (
    namespace TEXT NOT NULL, id TEXT NOT NULL, payload TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (namespace, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_expiry ON requests (expires);
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
"""


class SQLiteStore(OnlineStore):
    """Embedded store in one SQLite file (WAL). One connection per thread (and per process
    after a fork); every write is a ``BEGIN IMMEDIATE`` transaction, so read-modify-write
    sequences from threads and processes are serialized by SQLite's file lock.

    ``synchronous="FULL"`` (default) fsyncs each commit so a power loss loses no queued
    event; ``"NORMAL"`` is faster and still survives process crashes (WAL).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str,
        user_dim: int = USER_DIM,
        content_dim: int = CONTENT_DIM,
        clock: Callable[[], float] = time.time,
        synchronous: str = "FULL",
        busy_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(namespace, user_dim=user_dim, content_dim=content_dim, clock=clock)
        if synchronous not in ("FULL", "NORMAL"):
            raise StoreInputError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.path = Path(path) if path is not None else default_sqlite_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._write_lock = (os.getpid(), threading.Lock())  # see _Write; a forked child makes its own
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def _create_schema(self) -> None:
        self._conn().execute("PRAGMA journal_mode=WAL")  # persistent in the file
        with self._write() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreFormatError(
                    f"{self.path} has online-store schema v{version}; this code knows v{SCHEMA_VERSION}: upgrade adrec"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosedError(f"SQLiteStore({str(self.path)!r}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE) below
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._all_lock:
                self._all.append(conn)
        return conn

    class _Write:
        """``with store._write() as conn``: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error.

        Threads of one process queue on ``lock`` first: SQLite's own wait for a busy write
        lock sleeps in growing steps (up to 100 ms), which under 8 concurrent requests put a
        ~135 ms p99 on every size of catalogue; a Python lock wakes the next writer at once.
        Processes still meet at SQLite's file lock."""

        def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
            self.conn, self.lock = conn, lock

        def __enter__(self) -> sqlite3.Connection:
            self.lock.acquire()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
            try:
                self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.lock.release()

    def _write(self) -> SQLiteStore._Write:
        pid, lock = self._write_lock
        if pid != os.getpid():  # after a fork: the parent's lock may have been held by another thread
            self._write_lock = (os.getpid(), threading.Lock())
            lock = self._write_lock[1]
        return SQLiteStore._Write(self._conn(), lock)

    def _get_users(self, space: str, pseudonyms: list[str]) -> list[UserState | None]:
        found: dict[str, UserState] = {}
        conn = self._conn()
        for start in range(0, len(pseudonyms), 500):
            chunk = pseudonyms[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for p, vec, n, t in conn.execute(
                "SELECT pseudonym, vector, n_updates, updated_at FROM users "
                f"WHERE namespace=? AND space=? AND pseudonym IN ({marks})",
                (self.namespace, space, *chunk),
            ):
                found[p] = UserState(_vector_from(vec), int(n), float(t))
        return [found.get(p) for p in pseudonyms]

    def _update_user(self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
        with self._write() as c:
            row = c.execute(
                "SELECT vector, n_updates FROM users WHERE namespace=? AND space=? AND pseudonym=?",
                (self.namespace, space, pseudonym),
            ).fetchone()
            n_updates = (0 if row is None else row[1]) + 1
            new = apply(None if row is None else _vector_from(row[0]))
            c.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, space, pseudonym) DO UPDATE SET "
                "vector=excluded.vector, n_updates=excluded.n_updates, updated_at=excluded.updated_at",
                (self.namespace, space, pseudonym, _vector_bytes(new), n_updates, float(self._clock())),
            )
        return new

    def _drop_user_space(self, space: str) -> int:
        with self._write() as c:
            return c.execute("DELETE FROM users WHERE namespace=? AND space=?", (self.namespace, space)).rowcount

    def _retire_ad(self, ad_id: str) -> None:
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO retired_ads VALUES (?, ?, ?)", (self.namespace, ad_id, float(self._clock())))

    def _unretire_ad(self, ad_id: str) -> bool:
        with self._write() as c:
            return c.execute("DELETE FROM retired_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)).rowcount > 0

    def _is_retired(self, ad_id: str) -> bool:
        q = "SELECT 1 FROM retired_ads WHERE namespace=? AND ad_id=?"
        return self._conn().execute(q, (self.namespace, ad_id)).fetchone() is not None

    def _retired_ads(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT ad_id FROM retired_ads WHERE namespace=?", (self.namespace,))}

    def _put_live_ad(self, ad_id: str, blob: bytes) -> None:
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO live_ads VALUES (?, ?, ?)", (self.namespace, ad_id, blob))

    def _live_ads(self) -> list[LiveAd]:
        rows = self._conn().execute("SELECT ad_id, blob FROM live_ads WHERE namespace=?", (self.namespace,))
        return [_decode_live_ad(a, b) for a, b in rows]

    def _drop_live_ad(self, ad_id: str) -> bool:
        with self._write() as c:
            return c.execute("DELETE FROM live_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)).rowcount > 0

    def _append_events(self, rows: list[str]) -> list[int]:
        with self._write() as c:
            insert = "INSERT INTO events (namespace, row) VALUES (?, ?)"
            return [c.execute(insert, (self.namespace, r)).lastrowid for r in rows]

    def _pending_events(self, limit: int) -> list[tuple[int, str]]:
        q = "SELECT seq, row FROM events WHERE namespace=? ORDER BY seq LIMIT ?"
        return [(int(s), r) for s, r in self._conn().execute(q, (self.namespace, limit))]

    def _mark_flushed(self, up_to_seq: int) -> int:
        with self._write() as c:
            return c.execute("DELETE FROM events WHERE namespace=? AND seq<=?", (self.namespace, up_to_seq)).rowcount

    def _hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        now = float(self._clock())
        with self._write() as c:
            row = c.execute("SELECT owner, expires FROM leases WHERE namespace=? AND name=?", (self.namespace, name)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            c.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)", (self.namespace, name, owner, now + ttl_seconds))
            return True

    def _release_lease(self, name: str, owner: str) -> bool:
        with self._write() as c:
            q = "DELETE FROM leases WHERE namespace=? AND name=? AND owner=?"
            return c.execute(q, (self.namespace, name, owner)).rowcount > 0

    def _put_request(self, request_id: str, payload: str, ttl_seconds: float) -> None:
        now = float(self._clock())
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)", (self.namespace, request_id, payload, now + ttl_seconds))
            if hash(request_id) % 64 == 0:  # now and then, forget expired records
                c.execute("DELETE FROM requests WHERE expires < ?", (now,))

    def _get_request(self, request_id: str) -> str | None:
        q = "SELECT payload FROM requests WHERE namespace=? AND id=? AND expires >= ?"
        row = self._conn().execute(q, (self.namespace, request_id, float(self._clock()))).fetchone()
        return None if row is None else str(row[0])

    def _put_blob(self, name: str, blob: bytes) -> None:
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (self.namespace, name, blob, float(self._clock())))

    def _get_blob(self, name: str) -> bytes | None:
        row = self._conn().execute("SELECT blob FROM blobs WHERE namespace=? AND name=?", (self.namespace, name)).fetchone()
        return None if row is None else bytes(row[0])

    def _update_blob(self, name: str, apply: Callable[[bytes | None], bytes]) -> bytes:
        with self._write() as c:  # one write transaction: no other writer between the read and the write
            row = c.execute("SELECT blob FROM blobs WHERE namespace=? AND name=?", (self.namespace, name)).fetchone()
            blob = apply(None if row is None else bytes(row[0]))
            c.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (self.namespace, name, blob, float(self._clock())))
        return blob

    def ping(self) -> bool:
        try:
            return self._conn().execute("SELECT 1").fetchone() == (1,)
        except (sqlite3.Error, StoreClosedError):
            return False

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, namespace={self.namespace!r})"


# ---------------------------------------------------------------------- Redis
# Atomic append: reserve n sequence numbers and XADD each with the explicit id "<seq>-0", so
# concurrent appenders (replicas) can never insert out of order.
_APPEND_LUA = """
local n = #ARGV
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
for i = 1, n do
  redis.call('XADD', KEYS[2], string.format('%d-0', first + i - 1), 'r', ARGV[i])
end
return first
"""

# Lease: take it when free or expired, extend it when the caller already holds it.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(OnlineStore):
    """Store in Redis so several replicas share one state. Keys are
    ``adrec:{<namespace>}:...`` (the hash tag keeps a namespace in one Cluster slot).

    User records are hashes updated with WATCH/MULTI (optimistic; retried on conflict, each
    retry means another writer succeeded). Events are a stream with ids ``<seq>-0`` from an
    INCRBY counter (Lua, atomic), trimmed exactly with ``XTRIM MINID`` (Redis >= 6.2).
    Durability is the server's: run it with AOF (``appendonly yes``) or events can be lost
    on a Redis crash.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        user_dim: int = USER_DIM,
        content_dim: int = CONTENT_DIM,
        clock: Callable[[], float] = time.time,
        max_update_retries: int = 1000,
        socket_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(namespace, user_dim=user_dim, content_dim=content_dim, clock=clock)
        import redis  # optional dependency: only the Redis backend needs it

        self._redis_mod = redis
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
        self._prefix = f"adrec:{{{self.namespace}}}:"
        self._max_retries = int(max_update_retries)
        self._append = self._client.register_script(_APPEND_LUA)
        self._lease = self._client.register_script(_LEASE_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)
        self._closed = False

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    @property
    def _r(self) -> Any:
        if self._closed:
            raise StoreClosedError(f"RedisStore for namespace {self.namespace!r} is closed")
        return self._client

    @staticmethod
    def _state(fields: dict[bytes, bytes]) -> UserState | None:
        if not fields:
            return None
        return UserState(_vector_from(fields[b"v"]), int(fields[b"n"]), float(fields[b"t"]))

    def _get_users(self, space: str, pseudonyms: list[str]) -> list[UserState | None]:
        pipe = self._r.pipeline(transaction=False)
        for p in pseudonyms:
            pipe.hgetall(self._key("user", space, p))
        return [self._state(f) for f in pipe.execute()]

    def _read_modify_write(self, key: str, compute: Callable[[Any], tuple[Any, Callable[[Any], object]]], what: str) -> Any:
        """Optimistic transaction on one key: WATCH it, ``compute(pipe)`` reads (immediate
        mode) and returns (result, write(pipe)); the write is queued in MULTI and executed.
        Another writer in between makes EXEC fail: re-read and re-compute, ``max_update_retries``
        times at most."""
        with self._r.pipeline(transaction=True) as pipe:
            for _ in range(self._max_retries):
                try:
                    pipe.watch(key)
                    result, write = compute(pipe)
                    pipe.multi()
                    write(pipe)
                    pipe.execute()
                    return result
                except self._redis_mod.WatchError:
                    continue  # another writer changed the key in between: re-read, re-apply
                finally:
                    pipe.reset()
        raise ConcurrentUpdateError(f"{what} lost {self._max_retries} races in a row; raise max_update_retries or write it less often")

    def _update_user(self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
        key = self._key("user", space, pseudonym)

        def compute(pipe: Any) -> tuple[np.ndarray, Callable[[Any], object]]:
            state = self._state(pipe.hgetall(key))
            new = apply(None if state is None else state.vector)
            n = 1 if state is None else state.n_updates + 1
            return new, lambda p: p.hset(key, mapping={"v": _vector_bytes(new), "n": n, "t": repr(float(self._clock()))})

        return self._read_modify_write(key, compute, f"update_user({space!r}, {pseudonym!r})")

    def _drop_user_space(self, space: str) -> int:
        glob_safe = re.sub(r"([\\*?\[\]])", r"\\\1", self._key("user", space, ""))
        pattern = glob_safe + "?" * PSEUDONYM_HEX_CHARS
        deleted = 0
        batch: list[bytes] = []
        for key in self._r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self._r.delete(*batch)
                batch = []
        if batch:
            deleted += self._r.delete(*batch)
        return deleted

    def _retire_ad(self, ad_id: str) -> None:
        self._r.sadd(self._key("retired"), ad_id)

    def _unretire_ad(self, ad_id: str) -> bool:
        return bool(self._r.srem(self._key("retired"), ad_id))

    def _is_retired(self, ad_id: str) -> bool:
        return bool(self._r.sismember(self._key("retired"), ad_id))

    def _retired_ads(self) -> set[str]:
        return {m.decode("utf-8") for m in self._r.smembers(self._key("retired"))}

    def _put_live_ad(self, ad_id: str, blob: bytes) -> None:
        self._r.hset(self._key("live_ads"), ad_id, blob)

    def _live_ads(self) -> list[LiveAd]:
        return [_decode_live_ad(a.decode("utf-8"), b) for a, b in self._r.hgetall(self._key("live_ads")).items()]

    def _drop_live_ad(self, ad_id: str) -> bool:
        return bool(self._r.hdel(self._key("live_ads"), ad_id))

    def _append_events(self, rows: list[str]) -> list[int]:
        first = int(self._append(keys=[self._key("events_seq"), self._key("events")], args=rows, client=self._r))
        return list(range(first, first + len(rows)))

    def _pending_events(self, limit: int) -> list[tuple[int, str]]:
        entries = self._r.xrange(self._key("events"), min="-", max="+", count=limit)
        return [(int(eid.split(b"-")[0]), fields[b"r"].decode("utf-8")) for eid, fields in entries]

    def _mark_flushed(self, up_to_seq: int) -> int:
        if up_to_seq < 0:
            return 0
        # exact trim (approximate=False): entries <= up_to_seq must never be handed out again
        return int(self._r.xtrim(self._key("events"), minid=f"{up_to_seq + 1}-0", approximate=False))

    def _hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        ttl_ms = max(1, int(ttl_seconds * 1000))
        return bool(self._lease(keys=[self._key("lease", name)], args=[owner, ttl_ms], client=self._r))

    def _release_lease(self, name: str, owner: str) -> bool:
        return bool(self._release(keys=[self._key("lease", name)], args=[owner], client=self._r))

    def _put_request(self, request_id: str, payload: str, ttl_seconds: float) -> None:
        self._r.set(self._key("request", request_id), payload, px=max(1, int(ttl_seconds * 1000)))

    def _get_request(self, request_id: str) -> str | None:
        payload = self._r.get(self._key("request", request_id))
        return None if payload is None else payload.decode("utf-8")

    def _put_blob(self, name: str, blob: bytes) -> None:
        self._r.set(self._key("blob", name), blob)

    def _get_blob(self, name: str) -> bytes | None:
        return self._r.get(self._key("blob", name))

    def _update_blob(self, name: str, apply: Callable[[bytes | None], bytes]) -> bytes:
        key = self._key("blob", name)

        def compute(pipe: Any) -> tuple[bytes, Callable[[Any], object]]:
            blob = apply(pipe.get(key))
            return blob, lambda p: p.set(key, blob)

        return self._read_modify_write(key, compute, f"update_arrays({name!r})")

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except (self._redis_mod.RedisError, StoreClosedError, OSError):
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore(<url>, namespace={self.namespace!r})"  # the URL may hold a password


# ---------------------------------------------------------------------- in memory
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

    def _retire_ad(self, ad_id: str) -> None:
        state = self._open()
        with state.lock:
            state.retired.setdefault((self.namespace, ad_id), float(self._clock()))

    def _unretire_ad(self, ad_id: str) -> bool:
        state = self._open()
        with state.lock:
            return state.retired.pop((self.namespace, ad_id), None) is not None

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

    def _live_ads(self) -> list[LiveAd]:
        state = self._open()
        with state.lock:
            rows = [(ad, blob) for (namespace, ad), blob in state.live_ads.items() if namespace == self.namespace]
        return [_decode_live_ad(ad, blob) for ad, blob in rows]

    def _drop_live_ad(self, ad_id: str) -> bool:
        state = self._open()
        with state.lock:
            return state.live_ads.pop((self.namespace, ad_id), None) is not None

    def _append_events(self, rows: list[str]) -> list[int]:
        state = self._open()
        with state.lock:
            first = state.last_seq + 1
            state.last_seq += len(rows)
            queue = state.events.setdefault(self.namespace, deque())
            queue.extend(zip(range(first, first + len(rows)), rows))
        return list(range(first, first + len(rows)))

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


def open_store(url_or_path: str | os.PathLike[str] | None, *, namespace: str, **options: Any) -> OnlineStore:
    """``redis://`` / ``rediss://`` URL -> :class:`RedisStore`; a path (or None: the default
    file under ``data/online/``) -> :class:`SQLiteStore`. ``options`` go to the constructor."""
    if isinstance(url_or_path, str) and url_or_path.startswith(REDIS_PREFIXES):
        return RedisStore(url_or_path, namespace=namespace, **options)
    if isinstance(url_or_path, str) and "://" in url_or_path:
        scheme = url_or_path.split("://", 1)[0]
        raise StoreInputError(
            f"online store URL scheme {scheme!r} is not supported: use redis:// or rediss:// or a file path"
        )
    return SQLiteStore(url_or_path if url_or_path not in (None, "") else None, namespace=namespace, **options)
