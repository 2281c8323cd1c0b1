"""The online store: state the service shares between restarts and between replicas.

Implementations of one contract (:class:`OnlineStore`, in ``base.py``), one per module:

* :class:`SQLiteStore` (default, ``sqlite.py``) — one embedded file (``data/online/``), WAL
  mode, nothing to start; safe for several threads (one connection per thread) and several
  processes on one host (SQLite file locks; writes are ``BEGIN IMMEDIATE`` transactions).
* :class:`RedisStore` (``redis.py``) — several service replicas share one Redis.
* :class:`MemoryStore` (``memory.py``) — process memory, for tests and simulations (no
  durability).

:func:`open_store` picks by URL: ``redis://`` / ``rediss://`` -> Redis, anything else is a
SQLite path. What is stored is described in ``base.py``, how it is encoded in ``codec.py``.
"""

from __future__ import annotations

import os
from typing import Any

from adrec_assets.online.store.base import CONTENT_DIM, USER_DIM, OnlineStore
from adrec_assets.online.store.memory import MemoryState, MemoryStore
from adrec_assets.online.store.records import (
    ConcurrentUpdateError,
    InvalidArraysError,
    InvalidEventError,
    InvalidKeyError,
    InvalidMetaError,
    InvalidVectorError,
    LiveAd,
    StoreClosedError,
    StoreFormatError,
    StoreInputError,
    StoreUnavailableError,
    UserState,
)
from adrec_assets.online.store.redis import REDIS_PREFIXES, RedisStore
from adrec_assets.online.store.sqlite import SCHEMA_VERSION, SQLITE_FILENAME, SQLiteStore, default_sqlite_path


def open_store(
    url_or_path: str | os.PathLike[str] | None, *, namespace: str, timeout_s: float | None = None, **options: Any
) -> OnlineStore:
    """``redis://`` / ``rediss://`` URL -> :class:`RedisStore`; a path (or None: the default
    file under ``data/online/``) -> :class:`SQLiteStore`. ``timeout_s``: the longest one call
    waits (Redis' socket timeout, SQLite's busy timeout) before it raises
    :class:`StoreUnavailableError`; other ``options`` go to the constructor."""
    if isinstance(url_or_path, str) and url_or_path.startswith(REDIS_PREFIXES):
        if timeout_s is not None:
            options.setdefault("socket_timeout_s", timeout_s)
        return RedisStore(url_or_path, namespace=namespace, **options)
    if isinstance(url_or_path, str) and "://" in url_or_path:
        scheme = url_or_path.split("://", 1)[0]
        raise StoreInputError(
            f"online store URL scheme {scheme!r} is not supported: use redis:// or rediss:// or a file path"
        )
    if timeout_s is not None:
        options.setdefault("busy_timeout_s", timeout_s)
    return SQLiteStore(url_or_path if url_or_path not in (None, "") else None, namespace=namespace, **options)


__all__ = [
    "CONTENT_DIM",
    "REDIS_PREFIXES",
    "SCHEMA_VERSION",
    "SQLITE_FILENAME",
    "USER_DIM",
    "ConcurrentUpdateError",
    "InvalidArraysError",
    "InvalidEventError",
    "InvalidKeyError",
    "InvalidMetaError",
    "InvalidVectorError",
    "LiveAd",
    "MemoryState",
    "MemoryStore",
    "OnlineStore",
    "RedisStore",
    "SQLiteStore",
    "StoreClosedError",
    "StoreFormatError",
    "StoreInputError",
    "StoreUnavailableError",
    "UserState",
    "default_sqlite_path",
    "open_store",
]
