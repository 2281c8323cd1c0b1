"""The Redis backend: several service replicas share one Redis (``redis://`` / ``rediss://``).

``redis`` (redis-py) is an optional dependency, imported only when a :class:`RedisStore` is
opened.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from adrec_assets.online.store.base import CONTENT_DIM, USER_DIM, OnlineStore
from adrec_assets.online.store.codec import _decode_live_ad, _vector_bytes, _vector_from
from adrec_assets.online.store.records import ConcurrentUpdateError, LiveAd, StoreClosedError, UserState
from adrec_assets.privacy import PSEUDONYM_HEX_CHARS

REDIS_PREFIXES = ("redis://", "rediss://")

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

# Append once: per row, claim its key (SET NX PX) and only if that succeeds reserve a sequence
# number and XADD the row, all in one script, so concurrent identical posts (threads, processes,
# replicas) queue one row, and no claim exists without its row. KEYS: counter, stream, then one
# claim key per row; ARGV: ttl in ms, then the rows. Returns the seqs, 0 for a duplicate.
_APPEND_ONCE_LUA = """
local out = {}
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    local seq = redis.call('INCR', KEYS[1])
    redis.call('XADD', KEYS[2], string.format('%d-0', seq), 'r', ARGV[i - 1])
    out[#out + 1] = seq
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Epoch: the stored one, or the candidate stored as the epoch (a Redis emptied or restarted
# without persistence has none, so it gets a new one).
_EPOCH_LUA = """
local epoch = redis.call('GET', KEYS[1])
if epoch then
  return epoch
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# Live ads and retirements: each change counts in KEYS[3] (``live_version``), in the same
# script, so replicas poll one integer instead of reading every live ad.
_RETIRE_LUA = """
local n = redis.call('SADD', KEYS[1], ARGV[1])
if n == 1 then redis.call('INCR', KEYS[3]) end
return n
"""
_UNRETIRE_LUA = """
local n = redis.call('SREM', KEYS[1], ARGV[1])
if n == 1 then redis.call('INCR', KEYS[3]) end
return n
"""
_PUT_LIVE_LUA = """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return 1
"""
_DROP_LIVE_LUA = """
local n = redis.call('HDEL', KEYS[2], ARGV[1])
if n == 1 then redis.call('INCR', KEYS[3]) end
return n
"""
# Add a live ad unless one of that id is live (stored and not retired): concurrent adds of one
# id get exactly one 1. Re-adding a retired ad replaces it and un-retires it in one step.
_ADD_LIVE_LUA = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[3])
return 1
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
    INCRBY counter (Lua, atomic), trimmed exactly with ``XTRIM MINID`` (Redis >= 6.2); an
    event appended once claims ``claim:<key>`` (``SET NX PX``) in the same script.
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
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._prefix = f"adrec:{{{self.namespace}}}:"
        self._max_retries = int(max_update_retries)
        self._append = self._client.register_script(_APPEND_LUA)
        self._lease = self._client.register_script(_LEASE_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)
        self._append_once = self._client.register_script(_APPEND_ONCE_LUA)
        self._epoch_script = self._client.register_script(_EPOCH_LUA)
        self._live_scripts = {name: self._client.register_script(lua) for name, lua in (
            ("retire", _RETIRE_LUA), ("unretire", _UNRETIRE_LUA), ("put", _PUT_LIVE_LUA), ("drop", _DROP_LIVE_LUA),
            ("add", _ADD_LIVE_LUA))}  # fmt: skip
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

    def _read_modify_write(
        self, key: str, compute: Callable[[Any], tuple[Any, Callable[[Any], object]]], what: str
    ) -> Any:
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
        raise ConcurrentUpdateError(
            f"{what} lost {self._max_retries} races in a row; raise max_update_retries or write it less often"
        )

    def _update_user(self, space: str, pseudonym: str, apply: Callable[[np.ndarray | None], np.ndarray]) -> np.ndarray:
        key = self._key("user", space, pseudonym)

        def compute(pipe: Any) -> tuple[np.ndarray, Callable[[Any], object]]:
            state = self._state(pipe.hgetall(key))
            new = apply(None if state is None else state.vector)
            n = 1 if state is None else state.n_updates + 1
            return new, lambda p: p.hset(
                key, mapping={"v": _vector_bytes(new), "n": n, "t": repr(float(self._clock()))}
            )

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

    def _is_unavailable(self, exc: BaseException) -> bool:
        errors = self._redis_mod.exceptions
        if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, OSError)):
            return True  # down, restarting (LOADING is a ConnectionError), stalled past the socket timeout
        # out of memory, a read-only replica, or refusing writes because its persistence failed
        # (a full disk); redis-py strips the OOM and READONLY codes from the message
        if isinstance(exc, (errors.OutOfMemoryError, errors.ReadOnlyError)):
            return True
        return isinstance(exc, errors.ResponseError) and str(exc).startswith(("MISCONF", "OOM", "READONLY"))

    def _live(self, script: str, *args: Any) -> int:
        keys = [self._key("retired"), self._key("live_ads"), self._key("live_version")]
        return int(self._live_scripts[script](keys=keys, args=list(args), client=self._r))

    def _live_version(self) -> int:
        return int(self._r.get(self._key("live_version")) or 0)

    def _retire_ad(self, ad_id: str) -> None:
        self._live("retire", ad_id)

    def _unretire_ad(self, ad_id: str) -> bool:
        return bool(self._live("unretire", ad_id))

    def _is_retired(self, ad_id: str) -> bool:
        return bool(self._r.sismember(self._key("retired"), ad_id))

    def _retired_ads(self) -> set[str]:
        return {m.decode("utf-8") for m in self._r.smembers(self._key("retired"))}

    def _put_live_ad(self, ad_id: str, blob: bytes) -> None:
        self._live("put", ad_id, blob)

    def _add_live_ad(self, ad_id: str, blob: bytes) -> bool:
        return bool(self._live("add", ad_id, blob))

    def _live_ads(self) -> list[LiveAd]:
        return [_decode_live_ad(a.decode("utf-8"), b) for a, b in self._r.hgetall(self._key("live_ads")).items()]

    def _drop_live_ad(self, ad_id: str) -> bool:
        return bool(self._live("drop", ad_id))

    def _append_events(self, rows: list[str]) -> list[int]:
        first = int(self._append(keys=[self._key("events_seq"), self._key("events")], args=rows, client=self._r))
        return list(range(first, first + len(rows)))

    def _append_events_once(self, keyed_rows: list[tuple[str, str]], ttl_seconds: float) -> list[int | None]:
        keys = [self._key("events_seq"), self._key("events"), *(self._key("claim", k) for k, _ in keyed_rows)]
        ttl_ms = max(1, int(ttl_seconds * 1000))
        seqs = self._append_once(keys=keys, args=[ttl_ms, *(row for _, row in keyed_rows)], client=self._r)
        return [int(seq) or None for seq in seqs]

    def _recorded_events(self, keys: list[str]) -> list[bool]:
        return [value is not None for value in self._r.mget([self._key("claim", k) for k in keys])]

    def _epoch(self, candidate: str) -> str:
        return bytes(self._epoch_script(keys=[self._key("epoch")], args=[candidate], client=self._r)).decode("ascii")

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
