"""The ANN ad index the online service searches: FAISS over ``[p_a, b_a]`` rows.

Each ad is stored as the (d+1)-vector ``[p_a, b_a]`` (unit projected ad, additive
``score_bias``) and a query is ``[u, 1]``, so the inner product *is* the product's score
``u . p_a + b_a``; exploration policies may send any (d+1) query (``[theta_u * u, theta_b]``).

Kinds:

* ``"flat"`` (n <= ``exact_max_ads``): exact ``IndexFlatIP`` behind ``IndexIDMap2``; a
  retired ad is really removed (``remove_ids``), so exact search never sees it.
* ``"hnsw"``: ``IndexHNSWFlat(d+1, M, METRIC_INNER_PRODUCT)``. HNSW cannot delete, so a
  retired ad stays in the graph as a *tombstone* and searches pass an ``IDSelectorBitmap``
  of live rows in ``SearchParametersHNSW``: faiss still walks through tombstones (the graph
  stays connected, recall holds) but never returns them. Measured: the selector kept
  recall@10 and added no latency across tombstone shares; over-fetching
  ``k + n_tombstones`` and filtering in Python multiplied the latency even with few
  tombstones, and over-fetching a fixed factor matched the selector only while tombstones
  are spread evenly.
  Slots are HNSW row numbers (rows are append-only), so no ``IndexIDMap2`` is needed and the
  selector works on rows directly. Tombstones crowded where queries score highest (e.g. a
  popular ad replaced many times) can fill the search beam so that HNSW returns fewer than k
  live ads; such query rows are re-run as an exact scan of the live rows (correct, ~O(n)).
  Rebuild (the ``ad_index`` asset) to compact tombstones; :attr:`AdIndex.n_tombstones` says
  when.
* ``"numpy"``: :class:`NumpyIndex`, exact brute force in NumPy over the same rows, built from
  a snapshot's index at load time (``ADREC_SERVE_INDEX=numpy``): the baseline FAISS is
  measured against and a way to rule the index out when debugging. Never persisted.

Live changes are cheap: an HNSW add costs little and a remove less, except the first add
after a build or load, which stalls while faiss grows its arrays (searches wait on the lock
meanwhile).

Slots are int64 handles issued sequentially and never reused; a re-added ad gets a new slot.
``ad_id(slot)`` keeps resolving retired slots, so a result read just before a concurrent
``remove`` still maps to an id (the service drops it via its retired-ads set if it must).

Thread safety: a writer-preferring readers-writer lock. ``search`` holds the read side while
faiss runs (faiss releases the GIL, so concurrent searches run in parallel); ``add`` /
``remove`` hold the write side, so a search sees a change completely or not at all. A
copy-on-write swap would copy the whole faiss index per live change (hundreds of MB at 1M
ads), which is why a lock was chosen.

OpenMP: faiss' ``omp_set_num_threads`` is *per calling thread* (libgomp ICVs), so setting it
once in the main thread does not reach the service's worker threads. ``search`` therefore
takes ``threads`` (default :data:`SEARCH_THREADS` = 1), sets it for the call and restores
the caller's value. Measured on 2 cores: a single HNSW query runs on one thread anyway (no
difference), while a flat search was slower with 2 threads than with 1, and 8 concurrent
clients lost most of their throughput (oversubscription). Batch callers (recall checks) pass
more threads.

Persistence never pickles: :meth:`AdIndex.to_arrays` gives plain numeric arrays (the faiss
index as ``uint8`` from ``faiss.serialize_index``, ids as UTF-8 bytes + offsets, a live mask
and the build parameters as JSON bytes) and :meth:`AdIndex.from_arrays` restores them exactly.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

from adrec_assets.ml.types import Fields, artifact_type

FLAT = "flat"
HNSW = "hnsw"
FORMAT_NAME = "adrec-ad-index"
FORMAT_VERSION = 1
#: OpenMP threads per ``search`` call by default: one (see the module docstring).
SEARCH_THREADS = 1
#: Rows per block in exact search: bounds the (queries x block) score matrix in memory.
_EXACT_BLOCK_ELEMENTS = 1 << 24


class AdIndexError(ValueError):
    """Base class of the index's input and state errors."""


class InvalidAdError(AdIndexError):
    """An ad id, vector or score_bias is unusable (empty id, wrong shape, non-finite)."""


class DuplicateAdIdError(AdIndexError):
    """The same ad id appears twice in one build."""


class InvalidQueryError(AdIndexError):
    """Queries have the wrong shape or non-finite values, or k is not a positive int."""


class IndexStateError(AdIndexError):
    """Arrays handed to :meth:`AdIndex.from_arrays` are missing, of another version or inconsistent."""


class UnknownAdError(KeyError):
    """An ad id or slot that the index does not hold (or no longer holds as live)."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0]) if self.args else ""


class _ReadWriteLock:
    """Many readers or one writer; waiting writers block new readers (no writer starvation
    under a steady stream of searches)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_ad_id(ad_id: object) -> str:
    if not isinstance(ad_id, str) or not ad_id:
        raise InvalidAdError(f"ad id must be a non-empty str, got {ad_id!r}")
    return ad_id


def _as_float32(values: object, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise InvalidAdError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32, order="C")  # keeps 0-d scalars 0-d
    if not np.isfinite(arr).all():
        raise InvalidAdError(f"{what}: contains NaN or inf (float32); fix the upstream artifact")
    return arr


def _check_queries(queries: object, width: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != width or q.dtype.kind not in "fiu":
        raise InvalidQueryError(
            f"queries: expected a real (n, {width}) array ([u, 1] per row, d+1 = {width}), "
            f"got {q.dtype} {np.shape(queries)}"
        )
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise InvalidQueryError("queries: contain NaN or inf")
    return q


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidQueryError(f"k must be a positive int, got {k!r}")
    return int(k)


class _TopK:
    """Streaming exact top-k over blocks of rows (best first; ties -> lower row first)."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_queries, 0), -np.inf, dtype=np.float64)
        self.rows = np.zeros((n_queries, 0), dtype=np.int64)

    def push(self, block_scores: np.ndarray, first_row: int) -> None:
        rows = np.broadcast_to(
            np.arange(first_row, first_row + block_scores.shape[1], dtype=np.int64), block_scores.shape
        )
        scores = np.concatenate([self.scores, block_scores], axis=1)
        rows = np.concatenate([self.rows, rows], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            rows = np.take_along_axis(rows, keep, axis=1)
        self.scores, self.rows = scores, rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        n, have = self.scores.shape
        order = np.lexsort((self.rows, -self.scores), axis=1) if have else np.zeros((n, 0), dtype=np.int64)
        scores, rows = _no_results(n, self.k)
        scores[:, :have] = np.take_along_axis(self.scores, order, axis=1)
        rows[:, :have] = np.take_along_axis(self.rows, order, axis=1)
        return scores, rows


def exact_top_k(vectors_with_bias: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k in NumPy (float64 scores): the reference that ANN
    results are judged against. Returns ``(scores (n, k) float32, rows (n, k) int64)`` with
    rows into ``vectors_with_bias``, best first, ``-1`` / ``-inf`` padding when k > rows."""
    base = np.asarray(vectors_with_bias)
    if base.ndim != 2 or base.dtype.kind not in "fiu":
        raise InvalidQueryError(f"vectors_with_bias: expected (n, d+1), got shape {base.shape}")
    q = _check_queries(queries, base.shape[1]).astype(np.float64)
    k = _check_k(k)
    top = _TopK(len(q), k)
    block = max(1, _EXACT_BLOCK_ELEMENTS // max(1, len(q)))
    for start in range(0, len(base), block):
        top.push(q @ base[start : start + block].astype(np.float64).T, start)
    return top.result()


def _checked_ads(
    ad_ids: Sequence[str], vectors: np.ndarray, score_bias: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The inputs of a build, validated: unique ids, (n, d) finite float32 vectors, (n,) biases."""
    ids = [_check_ad_id(a) for a in ad_ids]
    vecs = _as_float32(vectors, "vectors")
    if vecs.ndim != 2 or vecs.shape[1] < 1:
        raise InvalidAdError(f"vectors: expected (n, d) with d >= 1, got shape {vecs.shape}")
    bias = _as_float32(score_bias, "score_bias")
    if bias.shape != (len(vecs),) or len(ids) != len(vecs):
        raise InvalidAdError(
            f"ad_ids ({len(ids)}), vectors {vecs.shape} and score_bias {bias.shape} must describe the same n ads"
        )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(a for a in ids if a in seen or seen.add(a))  # type: ignore[func-returns-value]
        raise DuplicateAdIdError(f"ad id {dup!r} appears more than once; ad ids must be unique")
    return ids, vecs, bias


def _no_results(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``search``'s padding for ``n_queries`` rows: scores -inf (float32), slots -1 (int64)."""
    return np.full((n_queries, k), -np.inf, dtype=np.float32), np.full((n_queries, k), -1, dtype=np.int64)


@dataclass
class _PinnedQuery:
    """The exact answer to one pinned query: ``slots`` / ``scores`` are the exact top
    ``len(slots)`` live ads, best first (``complete``: they are every live ad)."""

    query: np.ndarray  # (d+1,) float32
    depth: int
    slots: np.ndarray  # int64
    scores: np.ndarray  # float32
    complete: bool


class _SlotTable(ABC):
    """Slot bookkeeping shared by :class:`AdIndex` and :class:`NumpyIndex`: slots are issued
    sequentially and never reused; ``_slot_ids[slot]`` is the ad a slot was issued for,
    ``_slot_of`` maps live ads to their slot and ``_live`` masks the live slots.

    It also keeps the exact answer to one *pinned* query (:meth:`pin_query`)."""

    _slot_ids: list[str]
    _slot_of: dict[str, int]
    _live: np.ndarray
    _lock: _ReadWriteLock
    _dim: int
    _pinned: _PinnedQuery | None = None

    @abstractmethod
    def _exact_top(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Under a lock the caller holds: the exact top-k live ads of the query rows ``q``
        (scores float32, slots int64, padded with -inf / -1)."""

    def pin_query(self, query: np.ndarray, depth: int) -> None:
        """Answer ``query`` (d+1,) exactly, from a cached top-``depth``, from now on.

        Why: every new user is served from the same prior query ``[global_mean, 1]``; an HNSW
        search for it costs as much as any other and, the mean being unlike any one user,
        finds only part of its true top-k. One exact scan when the snapshot loads answers all
        of them exactly; live adds and removals keep the cached list exact (an add that beats
        the list's last score enters it; a removal leaves the exact top of the rest). A search
        for exactly this query with ``k`` up to the list's length is answered from it; a
        longer one (after many removals) searches the index as usual. One query at a time:
        pinning another replaces it.
        """
        q = _check_queries(np.asarray(query, dtype=np.float32).reshape(1, -1), self._dim + 1)
        depth = _check_k(depth)
        with self._lock.write():
            scores, slots = self._exact_top(q, depth)
            keep = slots[0] >= 0
            self._pinned = _PinnedQuery(
                q[0].copy(),
                depth,
                slots[0][keep].astype(np.int64),
                scores[0][keep].astype(np.float32),
                complete=int(keep.sum()) == len(self._slot_of),
            )

    def _pinned_answer(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Under the read lock: the cached exact answer to ``q``, or None if it cannot give one."""
        pinned = self._pinned
        if pinned is None or len(q) != 1 or (k > len(pinned.slots) and not pinned.complete):
            return None
        if not np.array_equal(q[0], pinned.query):
            return None
        take = min(k, len(pinned.slots))
        scores, slots = _no_results(1, k)
        scores[0, :take], slots[0, :take] = pinned.scores[:take], pinned.slots[:take]
        return scores, slots

    def _pinned_add(self, slot: int, row: np.ndarray) -> None:
        """Under the write lock, after ``slot`` went live with stored ``row`` (d+1,)."""
        pinned = self._pinned
        if pinned is None:
            return
        score = np.float32(np.dot(row.astype(np.float32), pinned.query))
        if not pinned.complete and (len(pinned.slots) == 0 or not score > pinned.scores[-1]):
            return  # an ad outside the list may score higher: the list stays the exact top it is
        at = int(np.searchsorted(-pinned.scores, -score, side="right"))
        slots = np.insert(pinned.slots, at, slot)
        scores = np.insert(pinned.scores, at, score)
        complete = pinned.complete and len(slots) <= pinned.depth
        self._pinned = _PinnedQuery(pinned.query, pinned.depth, slots[: pinned.depth], scores[: pinned.depth], complete)

    def _pinned_remove(self, slots: np.ndarray) -> None:
        """Under the write lock, after ``slots`` were retired."""
        pinned = self._pinned
        if pinned is None:
            return
        keep = ~np.isin(pinned.slots, slots)
        self._pinned = _PinnedQuery(
            pinned.query, pinned.depth, pinned.slots[keep], pinned.scores[keep], pinned.complete
        )

    @abstractmethod
    def remove_many(self, ad_ids: Iterable[str]) -> None:
        """Retire several ads in one change, all or nothing."""

    def remove(self, ad_id: str) -> None:
        """Retire ``ad_id``: no later search returns it. :class:`UnknownAdError` if not live."""
        self.remove_many([ad_id])

    def _checked_ad(self, ad_id: str, vector: np.ndarray, score_bias: float) -> tuple[str, np.ndarray, np.ndarray]:
        """A live add's inputs, validated: the id, a (d,) finite float32 vector, a scalar bias."""
        ad_id = _check_ad_id(ad_id)
        vec = _as_float32(vector, f"vector of ad {ad_id!r}")
        if vec.shape != (self._dim,):
            raise InvalidAdError(f"vector of ad {ad_id!r}: expected shape ({self._dim},), got {vec.shape}")
        bias = _as_float32(score_bias, f"score_bias of ad {ad_id!r}")
        if bias.shape != ():
            raise InvalidAdError(f"score_bias of ad {ad_id!r}: expected a scalar, got shape {bias.shape}")
        return ad_id, vec, bias

    def slot_of(self, ad_id: str) -> int:
        """The live slot of ``ad_id``; :class:`UnknownAdError` if it is not live."""
        try:
            return self._slot_of[ad_id]
        except KeyError:
            raise UnknownAdError(f"ad {ad_id!r} is not in the index (never added or retired)") from None

    def ad_id(self, slot: int) -> str:
        """The ad id a slot was issued for (also for retired slots; see the module docstring)."""
        slot = int(slot)
        if not 0 <= slot < len(self._slot_ids):
            raise UnknownAdError(f"slot {slot} was never issued by this index (0 <= slot < {len(self._slot_ids)})")
        return self._slot_ids[slot]

    def ad_ids(self, slots: np.ndarray | Sequence[int]) -> np.ndarray:
        """Vectorized :meth:`ad_id` keeping the shape (e.g. of search results); ``-1`` padding
        maps to ``None``. Returns an object array of str / None."""
        arr = np.asarray(slots, dtype=np.int64)
        n_slots = len(self._slot_ids)
        bad = (arr < -1) | (arr >= n_slots)
        if bad.any():
            raise UnknownAdError(f"slot {int(arr[bad].flat[0])} was never issued by this index (0 <= slot < {n_slots})")
        ids = self._slot_ids
        out = np.empty(arr.shape, dtype=object)
        flat = out.reshape(-1)
        for i, s in enumerate(arr.reshape(-1).tolist()):
            flat[i] = ids[s] if s >= 0 else None
        return out

    def live_slots(self) -> np.ndarray:
        """Slots of all live ads, ascending (int64)."""
        with self._lock.read():
            return np.flatnonzero(self._live[: len(self._slot_ids)]).astype(np.int64)


class AdIndex(_SlotTable):
    """FAISS index of ads as ``[p_a, b_a]`` rows; see the module docstring for the design."""

    def __init__(
        self, index: faiss.Index, kind: str, dim: int, params: dict[str, int], slot_ids: list[str], live: np.ndarray
    ) -> None:
        """Internal: use :meth:`build` or :meth:`from_arrays`."""
        self._index = index
        self._kind = kind
        self._dim = dim
        self._params = dict(params)
        self._slot_ids = slot_ids
        self._live = np.zeros(max(16, len(slot_ids)), dtype=bool)  # capacity grows by doubling
        self._live[: len(slot_ids)] = live
        self._slot_of = {slot_ids[s]: int(s) for s in np.flatnonzero(live)}
        self._n_tombstones = int(len(slot_ids) - len(self._slot_of)) if kind == HNSW else 0
        self._lock = _ReadWriteLock()
        self._selector: faiss.IDSelector | None = None
        self._search_params: dict[int, faiss.SearchParameters] = {}
        if kind == HNSW:
            hnsw = faiss.downcast_index(index)
            # levels of later adds stay reproducible too (faiss' default rng seed is a constant)
            hnsw.hnsw.rng = faiss.RandomGenerator(int(params["seed"]) + len(slot_ids))
        self._refresh_selector()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        ad_ids: Sequence[str],
        vectors: np.ndarray,
        score_bias: np.ndarray,
        *,
        exact_max_ads: int = 100_000,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        seed: int = 0,
    ) -> AdIndex:
        """Index ``n`` ads: exact (``"flat"``) when ``n <= exact_max_ads``, else HNSW.

        ``vectors`` is (n, d) (unit projected ads), ``score_bias`` (n,); both must be finite.
        ``seed`` fixes HNSW's level draws; the graph itself is only bit-reproducible with one
        OpenMP thread (parallel insertion order varies), ``from_arrays`` always is exact.
        """
        ids, vecs, bias = _checked_ads(ad_ids, vectors, score_bias)
        limits = (
            ("exact_max_ads", exact_max_ads, 0),
            ("hnsw_m", hnsw_m, 2),
            ("ef_construction", ef_construction, 1),
            ("ef_search", ef_search, 1),
        )
        for name, value, low in limits:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InvalidAdError(f"{name} must be an int >= {low}, got {value!r}")
        params = {
            "exact_max_ads": int(exact_max_ads),
            "hnsw_m": int(hnsw_m),
            "ef_construction": int(ef_construction),
            "ef_search": int(ef_search),
            "seed": int(seed),
        }
        d = int(vecs.shape[1])
        rows = np.ascontiguousarray(np.concatenate([vecs, bias[:, None]], axis=1))
        slots = np.arange(len(ids), dtype=np.int64)
        if len(ids) <= exact_max_ads:
            kind, index = FLAT, faiss.IndexIDMap2(faiss.IndexFlatIP(d + 1))
            if len(ids):
                index.add_with_ids(rows, slots)
        else:
            kind, index = HNSW, faiss.IndexHNSWFlat(d + 1, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
            index.hnsw.efSearch = int(ef_search)
            index.hnsw.rng = faiss.RandomGenerator(int(seed))
            index.add(rows)  # row r == slot r
        return cls(index, kind, d, params, ids, np.ones(len(ids), dtype=bool))

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate)."""
        return self._kind

    @property
    def dim(self) -> int:
        """d, the user-space dimension (queries and stored rows have d+1 columns)."""
        return self._dim

    @property
    def params(self) -> dict[str, int]:
        """The build parameters (exact_max_ads, hnsw_m, ef_construction, ef_search, seed)."""
        return dict(self._params)

    @property
    def n_tombstones(self) -> int:
        """Retired ads still in the HNSW graph (always 0 for flat); rebuild when this grows."""
        return self._n_tombstones

    def __len__(self) -> int:
        """Live (recommendable) ads."""
        return len(self._slot_of)

    @property
    def nbytes(self) -> int:
        """Serialized size in bytes (what :meth:`to_arrays` produces; costs one serialization)."""
        return int(sum(a.nbytes for a in self.to_arrays().values()))

    # ------------------------------------------------------------------ slots
    def vectors(self, slots: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored ``[p_a, b_a]`` rows of live slots, (len, d+1) float32."""
        arr = np.ascontiguousarray(np.asarray(slots, dtype=np.int64).reshape(-1))
        with self._lock.read():
            n_slots = len(self._slot_ids)
            ok = (arr >= 0) & (arr < n_slots)
            ok[ok] = self._live[arr[ok]]
            if not ok.all():
                raise UnknownAdError(f"slot {int(arr[~ok][0])} is not a live ad of this index")
            if len(arr) == 0:
                return np.zeros((0, self._dim + 1), dtype=np.float32)
            if self._kind == HNSW:
                return faiss.downcast_index(self._index.storage).reconstruct_batch(arr)
            return self._index.reconstruct_batch(arr)  # IndexIDMap2 maps ids itself

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, *, threads: int = SEARCH_THREADS) -> tuple[np.ndarray, np.ndarray]:
        """Top-k live ads per query row of ``queries`` (n, d+1) — ``[u, 1]`` scores
        ``u . p_a + b_a``. Returns ``(scores (n, k) float32, slots (n, k) int64)``, best first,
        padded with slot -1 / score -inf when fewer than k ads are live.

        ``threads``: OpenMP threads for this call (faiss' setting is per calling thread; it is
        restored afterwards). 1 is best for single queries; more only helps large batches.
        """
        q = _check_queries(queries, self._dim + 1)
        k = _check_k(k)
        previous, threads = faiss.omp_get_max_threads(), max(1, int(threads))
        if threads != previous:
            faiss.omp_set_num_threads(threads)
        try:
            return self._search(q, k)
        finally:
            if threads != previous:  # leave the caller's thread as it was (e.g. for builds)
                faiss.omp_set_num_threads(previous)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock.read():
            if not self._slot_of:
                return _no_results(len(q), k)
            cached = self._pinned_answer(q, k)
            if cached is not None:
                return cached
            if self._kind != HNSW:
                return self._exact_top(q, k)
            scores, slots = self._index.search(q, k, params=self._hnsw_params(k))
            short = np.flatnonzero((slots >= 0).sum(axis=1) < min(k, len(self._slot_of)))
            if len(short):  # beam starved by tombstones: exact scan of live rows instead
                scores[short], slots[short] = self._exact_top(q[short], k)
        scores[slots < 0] = -np.inf
        return scores, slots

    def _exact_top(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._slot_of:
            return _no_results(len(q), k)
        if self._kind == HNSW:  # an exact scan of the stored rows, tombstones masked
            storage = faiss.downcast_index(self._index.storage)
            params = faiss.SearchParameters(sel=self._selector) if self._selector is not None else None
            scores, slots = storage.search(q, k, params=params)
        else:
            scores, slots = self._index.search(q, k)
        scores[slots < 0] = -np.inf
        return scores, slots

    def _hnsw_params(self, k: int) -> faiss.SearchParametersHNSW:
        """Cached per ef (read-only for faiss, so shared by concurrent searches)."""
        ef = max(self._params["ef_search"], k)
        params = self._search_params.get(ef)
        if params is None:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if self._selector is not None:
                params.sel = self._selector
            self._search_params[ef] = params
        return params

    def _refresh_selector(self) -> None:
        """Under the write lock: selector of live rows (HNSW with tombstones only)."""
        self._search_params = {}
        if self._kind != HNSW or self._n_tombstones == 0:
            self._selector = None
            return
        bitmap = np.packbits(self._live[: len(self._slot_ids)], bitorder="little")
        self._selector = faiss.IDSelectorBitmap(bitmap)  # faiss' wrapper keeps `bitmap` alive

    # ------------------------------------------------------------------ live changes
    def add(self, ad_id: str, vector: np.ndarray, score_bias: float) -> int:
        """Make ``ad_id`` recommendable from the next search on; re-adding a live id replaces
        it (its old slot is retired). Returns the new slot."""
        ad_id, vec, bias = self._checked_ad(ad_id, vector, score_bias)
        row = np.ascontiguousarray(np.append(vec, bias)[None, :], dtype=np.float32)
        with self._lock.write():
            old = self._slot_of.get(ad_id)
            if old is not None:
                self._retire(np.array([old], dtype=np.int64))
            slot = len(self._slot_ids)
            if self._kind == HNSW:
                assert self._index.ntotal == slot, "HNSW rows and slots out of step"
                self._index.add(row)
            else:
                self._index.add_with_ids(row, np.array([slot], dtype=np.int64))
            self._slot_ids.append(ad_id)
            if slot >= len(self._live):
                self._live = np.concatenate([self._live, np.zeros(len(self._live), dtype=bool)])
            self._live[slot] = True
            self._slot_of[ad_id] = slot
            self._refresh_selector()
            self._pinned_add(slot, row[0])
        return slot

    def remove_many(self, ad_ids: Iterable[str]) -> None:
        """Retire several ads in one change (one O(n) pass, e.g. the retired set loaded from
        the store at start-up). All or nothing: an id that is not live raises
        :class:`UnknownAdError` before anything is retired."""
        wanted = list(dict.fromkeys(ad_ids))
        with self._lock.write():
            slots = [self.slot_of(a) for a in wanted]
            if slots:
                self._retire(np.asarray(slots, dtype=np.int64))
                self._refresh_selector()

    def _retire(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            del self._slot_of[self._slot_ids[slot]]
        self._live[slots] = False
        if self._kind == HNSW:
            self._n_tombstones += len(slots)
        else:
            self._index.remove_ids(slots)
        self._pinned_remove(slots)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (no pickle; ``np.savez`` / Arrow friendly) that
        :meth:`from_arrays` turns back into an identical index."""
        with self._lock.read():
            encoded = [s.encode("utf-8") for s in self._slot_ids]
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            meta = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "kind": self._kind,
                "dim": self._dim,
                **self._params,
            }
            return {
                "meta_json": np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8).copy(),
                "faiss_index": faiss.serialize_index(self._index),
                "ad_ids_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
                "ad_ids_offsets": offsets,
                "live": self._live[: len(self._slot_ids)].copy(),
            }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> AdIndex:
        """Rebuild an index saved by :meth:`to_arrays` (same slots, same search results)."""
        missing = {"meta_json", "faiss_index", "ad_ids_utf8", "ad_ids_offsets", "live"} - set(arrays)
        if missing:
            raise IndexStateError(f"ad index arrays lack {sorted(missing)}; re-materialize the ad_index asset")
        try:
            meta = json.loads(np.asarray(arrays["meta_json"], dtype=np.uint8).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexStateError(f"ad index meta_json is not JSON: {exc}") from None
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise IndexStateError(
                f"ad index arrays are {meta.get('format')!r} v{meta.get('version')}, this code reads "
                f"{FORMAT_NAME!r} v{FORMAT_VERSION}; re-materialize the ad_index asset"
            )
        blob = np.asarray(arrays["ad_ids_utf8"], dtype=np.uint8).tobytes()
        offsets = np.asarray(arrays["ad_ids_offsets"], dtype=np.int64)
        live = np.asarray(arrays["live"], dtype=bool)
        if len(offsets) != len(live) + 1 or offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
            raise IndexStateError("ad index arrays: ad_ids_offsets do not match ad_ids_utf8 / live")
        slot_ids = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        index = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"], dtype=np.uint8))
        kind, dim = meta["kind"], int(meta["dim"])
        live_ids = [slot_ids[s] for s in np.flatnonzero(live)]
        expected_rows = len(slot_ids) if kind == HNSW else len(live_ids)
        if index.d != dim + 1 or index.ntotal != expected_rows or len(set(live_ids)) != len(live_ids):
            raise IndexStateError(
                f"ad index arrays are inconsistent: faiss index d={index.d} ntotal={index.ntotal}, "
                f"meta dim={dim}, {len(slot_ids)} slots ({len(live_ids)} live, kind {kind!r})"
            )
        params = {key: int(meta[key]) for key in ("exact_max_ads", "hnsw_m", "ef_construction", "ef_search", "seed")}
        return cls(index, kind, dim, params, slot_ids, live)


NUMPY = "numpy"
#: Spare rows a NumpyIndex allocates beyond its ads (and grows by): live adds rarely copy.
_NUMPY_HEADROOM = 1 / 16
#: Up to this many queries a NumpyIndex scans the rows block by block, one matrix-vector product
#: per query while the block is in cache (the rows are read from memory once); more queries
#: go through one matrix product, which BLAS runs efficiently only for larger batches.
_NUMPY_GEMV_MAX_QUERIES = 8
_NUMPY_BLOCK_ROWS = 4096
#: Top-k selection over many rows first drops every score below the k-th best block maximum
#: (blocks of this many scores): one cheap pass instead of an ``argpartition`` of the whole row.
_TOPK_BLOCK = 256


def _top_unordered(scores: np.ndarray, top: int) -> np.ndarray:
    """(rows, top) column indices of the ``top`` largest scores of each row, in no order.

    Exact: ``top`` blocks have a maximum >= t (the ``top``-th largest block maximum), so at
    least ``top`` scores are >= t and the ``top`` best all are; only those are partitioned."""
    n_rows, n = scores.shape
    blocks = n // _TOPK_BLOCK
    if blocks < 4 * top:
        return np.argpartition(scores, n - top, axis=1)[:, n - top :]
    maxima = scores[:, : blocks * _TOPK_BLOCK].reshape(n_rows, blocks, _TOPK_BLOCK).max(axis=2)
    threshold = np.partition(maxima, blocks - top, axis=1)[:, blocks - top]
    out = np.empty((n_rows, top), dtype=np.int64)
    for i in range(n_rows):
        candidates = np.flatnonzero(scores[i] >= threshold[i])
        picked = np.argpartition(scores[i, candidates], len(candidates) - top)[len(candidates) - top :]
        out[i] = candidates[picked]
    return out


_blas_controller: ThreadpoolController | None = None


@contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """BLAS threads for one NumPy product, through one cached controller (``threadpool_limits()``
    inspects every loaded library on each call, too slow per request). The BLAS setting is
    process-wide, so concurrent callers asking for different counts may see each other's."""
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=max(1, int(threads)), user_api="blas"):
        yield


class NumpyIndex(_SlotTable):
    """Exact brute-force search in NumPy over ``[p_a, b_a]`` rows, with :class:`AdIndex`'s
    surface (what the service and the policies use) and its readers-writer lock.

    A search scores every stored row in float32 (a few queries: block by block, so the rows
    are read from memory once whatever the number of queries; a batch: one matrix product),
    sets retired rows to -inf, selects the k best (:func:`_top_unordered`) and sorts those by
    score (ties: lower slot first). Cost is linear in the catalogue (at 1M x 129 float32 a
    516 MB scan per search), which is the point: it is the baseline FAISS is measured
    against, and serving with it (``ADREC_SERVE_INDEX=numpy``) rules the ANN index out when
    results look wrong.

    Built from an :class:`AdIndex` (:meth:`from_index`, keeping its slot numbers, so results
    name the same slots) or from arrays (:meth:`build`). Slots are issued sequentially and
    never reused, as in :class:`AdIndex`; a retired row stays allocated (``n_tombstones`` is
    0 because retired rows cost no search quality, only their share of the scan). Rows are
    stored with spare capacity (a 16th, at least 1,024) so live adds seldom copy the matrix.
    Not persisted: it exists only in a serving process.
    """

    def __init__(self, dim: int, slot_ids: list[str], rows: np.ndarray, live: np.ndarray) -> None:
        """Internal: use :meth:`build` or :meth:`from_index`. ``rows`` (capacity, dim+1) float32
        and ``live`` (capacity,) from :meth:`_allocate`; rows past ``len(slot_ids)`` are spare."""
        n = len(slot_ids)
        self._dim = int(dim)
        self._slot_ids = slot_ids
        self._rows, self._live = rows, live
        self._slot_of = {slot_ids[s]: int(s) for s in np.flatnonzero(live[:n])}
        self._dead = np.flatnonzero(~live[:n]).astype(np.int64)
        self._lock = _ReadWriteLock()

    @staticmethod
    def _allocate(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed rows and live mask for ``n`` slots plus spare capacity."""
        capacity = n + max(1024, int(n * _NUMPY_HEADROOM))
        return np.zeros((capacity, dim + 1), dtype=np.float32), np.zeros(capacity, dtype=bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, ad_ids: Sequence[str], vectors: np.ndarray, score_bias: np.ndarray) -> NumpyIndex:
        """Index ``n`` ads, ``vectors`` (n, d) and ``score_bias`` (n,) finite: slots 0..n-1."""
        ids, vecs, bias = _checked_ads(ad_ids, vectors, score_bias)
        d = int(vecs.shape[1])
        rows, live = cls._allocate(len(ids), d)
        rows[: len(ids), :d], rows[: len(ids), d], live[: len(ids)] = vecs, bias, True
        return cls(d, ids, rows, live)

    @classmethod
    def from_index(cls, index: AdIndex, *, batch: int = 65_536) -> NumpyIndex:
        """The live ads of ``index`` under the same slots (retired slots stay retired). Call it
        on an index no one is changing (the service does, while loading a snapshot)."""
        with index._lock.read():
            slot_ids = list(index._slot_ids)
            rows, live = cls._allocate(len(slot_ids), index.dim)
            live[: len(slot_ids)] = index._live[: len(slot_ids)]
        live_slots = np.flatnonzero(live).astype(np.int64)
        for start in range(0, len(live_slots), batch):
            part = live_slots[start : start + batch]
            rows[part] = index.vectors(part)
        return cls(index.dim, slot_ids, rows, live)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        """``"numpy"`` (exact)."""
        return NUMPY

    @property
    def dim(self) -> int:
        """d, the user-space dimension (queries and stored rows have d+1 columns)."""
        return self._dim

    @property
    def n_tombstones(self) -> int:
        """Always 0: retired rows are masked, never searched through."""
        return 0

    def __len__(self) -> int:
        """Live (recommendable) ads."""
        return len(self._slot_of)

    @property
    def nbytes(self) -> int:
        """Bytes held: the row matrix (with its spare capacity), the live mask and the ids' UTF-8."""
        with self._lock.read():
            ids = sum(len(s.encode("utf-8")) for s in self._slot_ids)
            return int(self._rows.nbytes + self._live.nbytes + ids)

    # ------------------------------------------------------------------ slots
    def vectors(self, slots: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored ``[p_a, b_a]`` rows of live slots, (len, d+1) float32."""
        arr = np.asarray(slots, dtype=np.int64).reshape(-1)
        with self._lock.read():
            ok = (arr >= 0) & (arr < len(self._slot_ids))
            ok[ok] = self._live[arr[ok]]
            if not ok.all():
                raise UnknownAdError(f"slot {int(arr[~ok][0])} is not a live ad of this index")
            return self._rows[arr]

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, *, threads: int = SEARCH_THREADS) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k live ads per query row (n, d+1): ``(scores (n, k) float32, slots (n, k)
        int64)``, best first, padded with -1 / -inf. ``threads``: BLAS threads for the product."""
        q = _check_queries(queries, self._dim + 1)
        k = _check_k(k)
        with self._lock.read():
            cached = self._pinned_answer(q, k)
            if cached is not None:
                return cached
            with _blas_threads(threads):
                return self._exact_top(q, k)

    def _exact_top(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_scores, out_slots = _no_results(len(q), k)
        n, n_live = len(self._slot_ids), len(self._slot_of)
        if n_live == 0 or len(q) == 0:
            return out_scores, out_slots
        scores = self._scores(q, n)
        if len(self._dead):
            scores[:, self._dead] = -np.inf
        top = min(k, n_live)  # retired rows score -inf, so the top `top` are all live
        if top < n:
            slots = _top_unordered(scores, top)
        else:
            slots = np.broadcast_to(np.arange(n, dtype=np.int64), scores.shape)
        picked = np.take_along_axis(scores, slots, axis=1)
        order = np.lexsort((slots, -picked), axis=1)
        out_slots[:, :top] = np.take_along_axis(slots, order, axis=1)
        out_scores[:, :top] = np.take_along_axis(picked, order, axis=1)
        return out_scores, out_slots

    def _scores(self, q: np.ndarray, n: int) -> np.ndarray:
        """Under the read lock: (queries, n) float32 scores of the first ``n`` rows."""
        rows = self._rows[:n]
        if len(q) > _NUMPY_GEMV_MAX_QUERIES:
            return q @ rows.T
        scores = np.empty((len(q), n), dtype=np.float32)
        for start in range(0, n, _NUMPY_BLOCK_ROWS):
            block = rows[start : start + _NUMPY_BLOCK_ROWS]
            for i in range(len(q)):
                np.matmul(block, q[i], out=scores[i, start : start + len(block)])
        return scores

    # ------------------------------------------------------------------ live changes
    def add(self, ad_id: str, vector: np.ndarray, score_bias: float) -> int:
        """Make ``ad_id`` recommendable from the next search on; re-adding a live id replaces
        it (its old slot is retired). Returns the new slot."""
        ad_id, vec, bias = self._checked_ad(ad_id, vector, score_bias)
        with self._lock.write():
            old = self._slot_of.get(ad_id)
            if old is not None:
                self._retire(np.array([old], dtype=np.int64))
            slot = len(self._slot_ids)
            if slot >= len(self._rows):
                self._grow(slot + 1)
            self._rows[slot, : self._dim] = vec
            self._rows[slot, self._dim] = bias
            self._live[slot] = True
            self._slot_ids.append(ad_id)
            self._slot_of[ad_id] = slot
            self._pinned_add(slot, self._rows[slot])
        return slot

    def remove_many(self, ad_ids: Iterable[str]) -> None:
        """Retire several ads in one change; all or nothing, as :meth:`AdIndex.remove_many`."""
        wanted = list(dict.fromkeys(ad_ids))
        with self._lock.write():
            slots = [self.slot_of(a) for a in wanted]
            if slots:
                self._retire(np.asarray(slots, dtype=np.int64))

    def _retire(self, slots: np.ndarray) -> None:
        """Under the write lock."""
        for slot in slots.tolist():
            del self._slot_of[self._slot_ids[slot]]
        self._live[slots] = False
        self._rows[slots] = 0.0
        self._dead = np.union1d(self._dead, slots).astype(np.int64)
        self._pinned_remove(slots)

    def _grow(self, needed: int) -> None:
        """Under the write lock: room for ``needed`` slots and spare rows again."""
        rows, live = self._allocate(needed, self._dim)
        rows[: len(self._rows)] = self._rows
        live[: len(self._live)] = self._live
        self._rows, self._live = rows, live


def recall_at_k(index: AdIndex | NumpyIndex, queries: np.ndarray, k: int, *, threads: int = 2) -> float:
    """Mean recall@k of ``index.search`` against exact NumPy search over the index's live ads.

    Tie-aware: a returned ad counts as a hit when its true score reaches the k-th best exact
    score (duplicate ads with equal scores are interchangeable), recomputed here from the
    stored rows rather than trusted from faiss. Call it on an index no one is changing.
    An index with no live ads has nothing to miss: 1.0.
    """
    q = _check_queries(queries, index.dim + 1)
    k = _check_k(k)
    live = index.live_slots()
    if len(live) == 0 or len(q) == 0:
        return 1.0
    k_eff = min(k, len(live))
    top = _TopK(len(q), k_eff)
    q64 = q.astype(np.float64)
    block = max(1, min(65_536, _EXACT_BLOCK_ELEMENTS // len(q)))
    for start in range(0, len(live), block):
        top.push(q64 @ index.vectors(live[start : start + block]).astype(np.float64).T, start)
    exact_scores, _ = top.result()
    threshold = exact_scores[:, k_eff - 1].astype(np.float64)
    _, slots = index.search(q, k, threads=threads)
    hits = np.zeros(len(q), dtype=np.int64)
    for i, row in enumerate(slots):
        found = row[row >= 0]
        if len(found):
            true = index.vectors(found).astype(np.float64) @ q64[i]
            tol = 1e-5 * max(1.0, abs(threshold[i]))
            hits[i] = min(k_eff, int((true >= threshold[i] - tol).sum()))
    return float(np.mean(hits / k_eff))


@artifact_type("ad_index")
@dataclass(eq=False)
class IndexedAds:
    """The ``ad_index`` artifact: the searchable index of a snapshot's projected ads, with the
    user space and encoder it was built for (never searched with vectors of another space)
    and the recall@10 it measured against exact search on real users when it was built."""

    index: AdIndex
    space: str
    encoder_id: str
    recall_at_10: float

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"index__{key}": value for key, value in self.index.to_arrays().items()},
            "space": np.asarray(self.space),
            "encoder_id": np.asarray(self.encoder_id),
            "recall_at_10": np.asarray(self.recall_at_10),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> IndexedAds:
        fields = Fields(arrays, cls.type_tag)
        index = AdIndex.from_arrays({k[len("index__") :]: v for k, v in arrays.items() if k.startswith("index__")})
        return cls(index, fields.text("space"), fields.text("encoder_id"), float(fields.array("recall_at_10")))
