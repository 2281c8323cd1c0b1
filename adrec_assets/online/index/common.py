"""What both index backends share: errors, input checks, the readers-writer lock, slot
bookkeeping (:class:`_SlotTable`) and the pinned query.

Slots are int64 handles issued sequentially and never reused; a re-added ad gets a new slot.
``ad_id(slot)`` keeps resolving retired slots, so a result read just before a concurrent
``remove`` still maps to an id (the service drops it via its retired-ads set if it must).

Thread safety: a writer-preferring readers-writer lock. ``search`` holds the read side while
faiss runs (faiss releases the GIL, so concurrent searches run in parallel); ``add`` /
``remove`` hold the write side, so a search sees a change completely or not at all. A
copy-on-write swap would copy the whole faiss index per live change (hundreds of MB at 1M
ads), which is why a lock was chosen.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

#: OpenMP threads per ``search`` call by default: one (see :mod:`adrec_assets.online.index.faiss`).
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


# recall against exact search (exact.recall_at_k, AdIndex.tune_nprobe)
def _exact_thresholds(index: _SlotTable, q: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """(the k-th best exact score per query row (float64), k capped at the live ads) over the
    index's live ads: what a returned ad must reach to count as a hit.

    Two passes: a float32 matrix product per block of live rows keeps each query row's best
    ``2k`` candidates (the block-maximum filter of the NumPy backend), which are then scored
    again in float64 (float32 rounding, ~1e-7 relative, cannot move an ad across a 2k-deep
    margin). At 1M ads and 500 queries this takes seconds where a float64 scan with a
    running ``argpartition`` over every score took about a minute on 2 cores."""
    live = index.live_slots()
    k_eff = min(k, len(live))
    depth = min(len(live), 2 * k_eff)
    cand_scores = np.full((len(q), 0), -np.inf, dtype=np.float32)
    cand_slots = np.zeros((len(q), 0), dtype=np.int64)
    block = max(depth, _EXACT_BLOCK_ELEMENTS // max(1, len(q)))
    for start in range(0, len(live), block):
        slots = live[start : start + block]
        scores = q @ index.vectors(slots).T
        top = _top_unordered(scores, min(depth, len(slots)))
        cand_scores = np.concatenate([cand_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        cand_slots = np.concatenate([cand_slots, slots[top]], axis=1)
        if cand_scores.shape[1] > depth:
            keep = np.argpartition(-cand_scores, depth - 1, axis=1)[:, :depth]
            cand_scores = np.take_along_axis(cand_scores, keep, axis=1)
            cand_slots = np.take_along_axis(cand_slots, keep, axis=1)
    rows64 = index.vectors(cand_slots.reshape(-1)).astype(np.float64).reshape(len(q), depth, -1)
    exact = np.einsum("nkd,nd->nk", rows64, q.astype(np.float64))
    return -np.partition(-exact, k_eff - 1, axis=1)[:, k_eff - 1], k_eff


def _hit_share(index: _SlotTable, q: np.ndarray, slots: np.ndarray, thresholds: np.ndarray, k_eff: int) -> float:
    """Mean share of the k_eff best (tie-aware) among each row's returned ``slots``, their true
    scores recomputed from the stored rows."""
    q64 = q.astype(np.float64)
    hits = np.zeros(len(q), dtype=np.int64)
    for i, row in enumerate(slots):
        found = row[row >= 0]
        if len(found):
            true = index.vectors(found).astype(np.float64) @ q64[i]
            tol = 1e-5 * max(1.0, abs(thresholds[i]))
            hits[i] = min(k_eff, int((true >= thresholds[i] - tol).sum()))
    return float(np.mean(hits / k_eff))
