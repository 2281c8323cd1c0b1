"""The SQLite backend (the default): one embedded file (``data/online/``), WAL mode, nothing
to start; safe for several threads (one connection per thread) and several processes on one
host (SQLite file locks; writes are ``BEGIN IMMEDIATE`` transactions)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np

from adrec_assets.online.store.base import CONTENT_DIM, USER_DIM, OnlineStore
from adrec_assets.online.store.codec import _decode_live_ad, _vector_bytes, _vector_from
from adrec_assets.online.store.records import LiveAd, StoreClosedError, StoreFormatError, StoreInputError, UserState

SQLITE_FILENAME = "adrec-online.sqlite3"
SCHEMA_VERSION = 2  # v2: event claims and the store's epoch (v1 files are upgraded in place)


def default_sqlite_path() -> Path:
    """``$ADREC_DATA_DIR/online/adrec-online.sqlite3`` (default: the checkout's ``data/``)."""
    from adrec_assets.sources.catalog import data_dir  # lazy: pulls pandas

    return data_dir() / "online" / SQLITE_FILENAME


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
-- one row per accepted event key: the claim that makes concurrent identical posts apply once
CREATE TABLE IF NOT EXISTS claims (
    namespace TEXT NOT NULL, key TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (namespace, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_by_expiry ON claims (expires);
-- small named values of the store itself, e.g. its epoch
CREATE TABLE IF NOT EXISTS meta (
    namespace TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (namespace, name)) WITHOUT ROWID;
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
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_ms / 1000
            )
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._all_lock:
                self._all.append(conn)
        return conn

    class _Write:
        """``with store._write() as conn``: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error.

        Threads of one process queue on ``lock`` first: SQLite's own wait for a busy write
        lock sleeps in growing steps (up to 100 ms), which under 8 concurrent requests set the
        p99 latency whatever the catalogue's size; a Python lock wakes the next writer at once.
        Processes still meet at SQLite's file lock."""

        def __init__(
            self,
            conn: sqlite3.Connection,
            lock: threading.Lock,
            timeout_s: float,
            relax: bool = False,
            discard: Callable[[sqlite3.Connection], None] | None = None,
        ) -> None:
            self.conn, self.lock, self.timeout_s, self.relax = conn, lock, timeout_s, relax
            self.discard = discard

        def __enter__(self) -> sqlite3.Connection:
            # bounded like SQLite's own wait: queued threads must not wait the busy timeout in turn
            if not self.lock.acquire(timeout=self.timeout_s):
                raise sqlite3.OperationalError("database is locked (writers of this process queued past the timeout)")
            try:
                if self.relax:  # this commit only: no fsync (the WAL still survives a process crash)
                    self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                try:
                    self._restore()
                finally:
                    self.lock.release()
                raise
            return self.conn

        def _restore(self) -> None:
            """Make the connection's next write (an event, say) durable again; never raises.
            Where that fails (still inside a transaction whose COMMIT and ROLLBACK both failed,
            an I/O error), the connection is discarded, so no write ever runs at NORMAL on it."""
            if not self.relax:
                return
            try:
                if self.conn.in_transaction:
                    raise sqlite3.OperationalError("the transaction is still open")
                self.conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error:
                if self.discard is not None:
                    self.discard(self.conn)

        def __exit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None:
            try:
                if exc_type is None:
                    try:
                        self.conn.execute("COMMIT")
                    except BaseException:  # a failed COMMIT (disk full, I/O) can leave the transaction open
                        if self.conn.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                self.conn.execute("ROLLBACK")
                        raise
                else:
                    self.conn.execute("ROLLBACK")
            finally:
                try:
                    self._restore()
                finally:
                    self.lock.release()

    def _write(self, durable: bool = True) -> SQLiteStore._Write:
        """A write transaction; ``durable=False`` skips this commit's fsync under
        ``synchronous="FULL"`` (for records whose loss in a power cut costs nothing queued)."""
        pid, lock = self._write_lock
        if pid != os.getpid():  # after a fork: the parent's lock may have been held by another thread
            self._write_lock = (os.getpid(), threading.Lock())
            lock = self._write_lock[1]
        relax = not durable and self._synchronous == "FULL"
        return SQLiteStore._Write(self._conn(), lock, self._busy_ms / 1000, relax, self._discard)

    def _discard(self, conn: sqlite3.Connection) -> None:
        """Close ``conn`` and forget it: this thread's next call opens a new connection."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._all_lock:
            if conn in self._all:
                self._all.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

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

    def _is_unavailable(self, exc: BaseException) -> bool:
        # locked past the busy timeout, disk full, I/O error: OperationalError; a schema bug
        # would be one too, but it shows on every call, not in an outage
        return isinstance(exc, sqlite3.OperationalError)

    def _bump(self, c: sqlite3.Connection) -> None:
        """Count a change of the live or retired ads, in the caller's transaction."""
        c.execute(
            "INSERT INTO meta VALUES (?, 'live_version', '1') ON CONFLICT (namespace, name) "
            "DO UPDATE SET value=CAST(CAST(value AS INTEGER) + 1 AS TEXT)",
            (self.namespace,),
        )

    def _live_version(self) -> int:
        row = (
            self._conn()
            .execute("SELECT value FROM meta WHERE namespace=? AND name='live_version'", (self.namespace,))
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    def _retire_ad(self, ad_id: str) -> None:
        with self._write() as c:
            inserted = c.execute(
                "INSERT OR IGNORE INTO retired_ads VALUES (?, ?, ?)", (self.namespace, ad_id, float(self._clock()))
            ).rowcount
            if inserted:
                self._bump(c)

    def _unretire_ad(self, ad_id: str) -> bool:
        with self._write() as c:
            found = (
                c.execute("DELETE FROM retired_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)).rowcount > 0
            )
            if found:
                self._bump(c)
            return found

    def _is_retired(self, ad_id: str) -> bool:
        q = "SELECT 1 FROM retired_ads WHERE namespace=? AND ad_id=?"
        return self._conn().execute(q, (self.namespace, ad_id)).fetchone() is not None

    def _retired_ads(self) -> set[str]:
        return {
            r[0] for r in self._conn().execute("SELECT ad_id FROM retired_ads WHERE namespace=?", (self.namespace,))
        }

    def _put_live_ad(self, ad_id: str, blob: bytes) -> None:
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO live_ads VALUES (?, ?, ?)", (self.namespace, ad_id, blob))
            self._bump(c)

    def _add_live_ad(self, ad_id: str, blob: bytes) -> bool:
        with self._write() as c:
            live = c.execute("SELECT 1 FROM live_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)).fetchone()
            retired = c.execute(
                "SELECT 1 FROM retired_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)
            ).fetchone()
            if live is not None and retired is None:
                return False
            c.execute("INSERT OR REPLACE INTO live_ads VALUES (?, ?, ?)", (self.namespace, ad_id, blob))
            c.execute("DELETE FROM retired_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id))
            self._bump(c)
            return True

    def _live_ads(self) -> list[LiveAd]:
        rows = self._conn().execute("SELECT ad_id, blob FROM live_ads WHERE namespace=?", (self.namespace,))
        return [_decode_live_ad(a, b) for a, b in rows]

    def _drop_live_ad(self, ad_id: str) -> bool:
        with self._write() as c:
            found = (
                c.execute("DELETE FROM live_ads WHERE namespace=? AND ad_id=?", (self.namespace, ad_id)).rowcount > 0
            )
            if found:
                self._bump(c)
            return found

    def _append_events(self, rows: list[str]) -> list[int]:
        with self._write() as c:
            insert = "INSERT INTO events (namespace, row) VALUES (?, ?)"
            return [c.execute(insert, (self.namespace, r)).lastrowid for r in rows]

    def _append_events_once(self, keyed_rows: list[tuple[str, str]], ttl_seconds: float) -> list[int | None]:
        now = float(self._clock())
        # A key is free when absent or its claim expired; the upsert's WHERE makes it one
        # statement, and claim + queued row commit together (or neither does).
        claim = (
            "INSERT INTO claims VALUES (?, ?, ?) ON CONFLICT (namespace, key) "
            "DO UPDATE SET expires=excluded.expires WHERE claims.expires < ?"
        )
        insert = "INSERT INTO events (namespace, row) VALUES (?, ?)"
        seqs: list[int | None] = []
        with self._write() as c:
            for key, row in keyed_rows:
                if c.execute(claim, (self.namespace, key, now + ttl_seconds, now)).rowcount == 1:
                    seqs.append(c.execute(insert, (self.namespace, row)).lastrowid)
                else:
                    seqs.append(None)
            if hash(keyed_rows[0][0]) % 64 == 0:  # now and then, forget expired claims
                c.execute("DELETE FROM claims WHERE expires < ?", (now,))
        return seqs

    def _recorded_events(self, keys: list[str]) -> list[bool]:
        now, found = float(self._clock()), set()
        conn = self._conn()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT key FROM claims WHERE namespace=? AND expires >= ? AND key IN ({marks})"
            found.update(k for (k,) in conn.execute(q, (self.namespace, now, *chunk)))
        return [k in found for k in keys]

    def _epoch(self, candidate: str) -> str:
        q = "SELECT value FROM meta WHERE namespace=? AND name='epoch'"
        row = self._conn().execute(q, (self.namespace,)).fetchone()
        if row is None:
            with self._write() as c:
                c.execute("INSERT OR IGNORE INTO meta VALUES (?, 'epoch', ?)", (self.namespace, candidate))
                row = c.execute(q, (self.namespace,)).fetchone()
        return str(row[0])

    def _pending_events(self, limit: int) -> list[tuple[int, str]]:
        q = "SELECT seq, row FROM events WHERE namespace=? ORDER BY seq LIMIT ?"
        return [(int(s), r) for s, r in self._conn().execute(q, (self.namespace, limit))]

    def _mark_flushed(self, up_to_seq: int) -> int:
        with self._write() as c:
            return c.execute("DELETE FROM events WHERE namespace=? AND seq<=?", (self.namespace, up_to_seq)).rowcount

    def _hold_lease(self, name: str, owner: str, ttl_seconds: float) -> bool:
        now = float(self._clock())
        with self._write() as c:
            row = c.execute(
                "SELECT owner, expires FROM leases WHERE namespace=? AND name=?", (self.namespace, name)
            ).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            c.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)", (self.namespace, name, owner, now + ttl_seconds)
            )
            return True

    def _release_lease(self, name: str, owner: str) -> bool:
        with self._write() as c:
            q = "DELETE FROM leases WHERE namespace=? AND name=? AND owner=?"
            return c.execute(q, (self.namespace, name, owner)).rowcount > 0

    def _put_request(self, request_id: str, payload: str, ttl_seconds: float) -> None:
        # A served slate's record is not an event: lost in a power cut, its events are refused
        # as unknown, as when it could not be stored. Its fsync was most of a read's store cost.
        now = float(self._clock())
        with self._write(durable=False) as c:
            c.execute(
                "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)",
                (self.namespace, request_id, payload, now + ttl_seconds),
            )
            if hash(request_id) % 64 == 0:  # now and then, forget expired records
                c.execute("DELETE FROM requests WHERE expires < ?", (now,))

    def _get_request(self, request_id: str) -> str | None:
        q = "SELECT payload FROM requests WHERE namespace=? AND id=? AND expires >= ?"
        row = self._conn().execute(q, (self.namespace, request_id, float(self._clock()))).fetchone()
        return None if row is None else str(row[0])

    def _put_blob(self, name: str, blob: bytes) -> None:
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (self.namespace, name, blob, float(self._clock()))
            )

    def _get_blob(self, name: str) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT blob FROM blobs WHERE namespace=? AND name=?", (self.namespace, name))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def _update_blob(self, name: str, apply: Callable[[bytes | None], bytes]) -> bytes:
        with self._write() as c:  # one write transaction: no other writer between the read and the write
            row = c.execute("SELECT blob FROM blobs WHERE namespace=? AND name=?", (self.namespace, name)).fetchone()
            blob = apply(None if row is None else bytes(row[0]))
            c.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (self.namespace, name, blob, float(self._clock()))
            )
        return blob

    def ping(self) -> bool:
        try:
            # a real table: "SELECT 1" never touches the file, so an unreadable one would pass
            self._conn().execute("SELECT count(*) FROM meta WHERE namespace=?", (self.namespace,)).fetchone()
            return True
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
