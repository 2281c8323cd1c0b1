"""The exact NumPy backend: :class:`NumpyIndex` (kind ``"numpy"``), brute force over the
same ``[p_a, b_a]`` rows as :class:`~adrec_assets.online.index.faiss.AdIndex`, built from a
snapshot's index at load time (``ADREC_SERVE_INDEX=numpy``): the baseline FAISS is measured
against and a way to rule the index out when debugging. Never persisted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import ThreadpoolController

from adrec_assets.online.index.common import (
    SEARCH_THREADS,
    UnknownAdError,
    _check_k,
    _check_queries,
    _checked_ads,
    _no_results,
    _ReadWriteLock,
    _SlotTable,
    _top_unordered,
)

if TYPE_CHECKING:
    from adrec_assets.online.index.faiss import AdIndex

NUMPY = "numpy"
#: Spare rows a NumpyIndex allocates beyond its ads (and grows by): live adds rarely copy.
_NUMPY_HEADROOM = 1 / 16
#: Up to this many queries a NumpyIndex scans the rows block by block, one matrix-vector product
#: per query while the block is in cache (the rows are read from memory once); more queries
#: go through one matrix product, which BLAS runs efficiently only for larger batches.
_NUMPY_GEMV_MAX_QUERIES = 8
_NUMPY_BLOCK_ROWS = 4096
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
