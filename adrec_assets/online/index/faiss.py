"""The FAISS backend: :class:`AdIndex`, exact (``"flat"``) or approximate (``"hnsw"``, ``"ivf"``).

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
* ``"ivf"``: ``IndexIVFFlat(IndexFlatIP(d+1), d+1, nlist, METRIC_INNER_PRODUCT)``, the
  coarse quantizer a k-means (spherical, as faiss does for inner product) trained on a
  seeded sample of the rows, flat (uncompressed) lists, ids = slots, and a hash-table direct
  map so rows can be reconstructed and really removed (``remove_ids``: no tombstones). A
  search scans the ``nprobe`` lists whose centroids score highest; :meth:`AdIndex.tune_nprobe`
  sets ``nprobe`` to the smallest value whose measured recall@k on real queries reaches a
  target (the ``ad_index`` asset calls it at build, on a sample apart from the one its
  blocking recall check measures). Its build is a k-means on a sample plus one assignment
  pass, so it takes seconds where HNSW takes minutes at 1M ads (benchmarks/README.md). A
  query row that finds fewer than k ads in its probed lists is re-run exactly
  (``nprobe = nlist``, every list scanned). Its blind spot: lists are ranked by their
  centroid's score, so an ad scoring far above the rest of its list (e.g. a ``score_bias``
  towering over its neighbours') is missed by queries that do not probe that list; the
  recall measured on real users is what says whether the catalogue has such ads.

Live changes are cheap: an HNSW add costs little and a remove less, except the first add
after a build or load, which stalls while faiss grows its arrays (searches wait on the lock
meanwhile).

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import faiss
import numpy as np

from adrec_assets.online.index.common import (
    SEARCH_THREADS,
    IndexStateError,
    InvalidAdError,
    InvalidQueryError,
    UnknownAdError,
    _check_k,
    _check_queries,
    _checked_ads,
    _exact_thresholds,
    _hit_share,
    _no_results,
    _ReadWriteLock,
    _SlotTable,
)

FLAT = "flat"
HNSW = "hnsw"
IVF = "ivf"
#: Approximate kinds :meth:`AdIndex.build` can make above ``exact_max_ads``.
ANN_KINDS = (HNSW, IVF)
FORMAT_NAME = "adrec-ad-index"
#: 2 added the ``"ivf"`` kind and its parameters; version 1 arrays (flat / HNSW) still load.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: Build parameters (all ints) and their values for arrays written before they existed.
_PARAM_DEFAULTS = {
    "exact_max_ads": 100_000, "hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "seed": 0,
    "ivf_nlist": 0, "ivf_nprobe": 0, "ivf_train_per_list": 0,
}  # fmt: skip
#: k-means iterations of the IVF coarse quantizer (faiss' default is 25; 10 was within
#: noise of it in recall at the benchmark's 1M ads, at 40% of the time).
IVF_KMEANS_ITERATIONS = 10


def ivf_nlist_for(n: int) -> int:
    """The default number of IVF lists for ``n`` ads: ~sqrt(n) (1,000 at 1M), at least 1 and
    never more than n / 39 (faiss' minimum of training points per centroid). The k-means
    costs ~nlist^2: at 1M ads 2,000 lists built in 64 s against 18 s for 1,000 (2 busy
    cores), for the same search time (benchmarks/README.md)."""
    return int(max(1, min(n // 39, round(np.sqrt(max(n, 1))))))


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
        self._ivf: faiss.IndexIVFFlat | None = faiss.downcast_index(index) if kind == IVF else None
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
        ann: str = HNSW,
        ivf_nlist: int = 0,
        ivf_nprobe: int = 16,
        ivf_train_per_list: int = 64,
    ) -> AdIndex:
        """Index ``n`` ads: exact (``"flat"``) when ``n <= exact_max_ads``, else ``ann``
        (``"hnsw"`` or ``"ivf"``).

        ``vectors`` is (n, d) (unit projected ads), ``score_bias`` (n,); both must be finite.
        ``seed`` fixes HNSW's level draws and IVF's training sample and k-means; the HNSW graph
        is only bit-reproducible with one OpenMP thread (parallel insertion order varies),
        ``from_arrays`` always is exact. IVF: ``ivf_nlist`` lists (0: :func:`ivf_nlist_for`),
        k-means on ``ivf_train_per_list`` sampled rows per list, ``ivf_nprobe`` lists probed
        per query until :meth:`tune_nprobe` measures a better value.
        """
        ids, vecs, bias = _checked_ads(ad_ids, vectors, score_bias)
        if ann not in ANN_KINDS:
            raise InvalidAdError(f"ann must be one of {ANN_KINDS}, got {ann!r}")
        limits = (
            ("exact_max_ads", exact_max_ads, 0),
            ("hnsw_m", hnsw_m, 2),
            ("ef_construction", ef_construction, 1),
            ("ef_search", ef_search, 1),
            ("ivf_nlist", ivf_nlist, 0),
            ("ivf_nprobe", ivf_nprobe, 1),
            ("ivf_train_per_list", ivf_train_per_list, 39),
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
            "ivf_nlist": 0,
            "ivf_nprobe": 0,
            "ivf_train_per_list": 0,
        }
        d = int(vecs.shape[1])
        rows = np.ascontiguousarray(np.concatenate([vecs, bias[:, None]], axis=1))
        slots = np.arange(len(ids), dtype=np.int64)
        if len(ids) <= exact_max_ads:
            kind, index = FLAT, faiss.IndexIDMap2(faiss.IndexFlatIP(d + 1))
            if len(ids):
                index.add_with_ids(rows, slots)
        elif ann == IVF:
            kind = IVF
            nlist = min(int(ivf_nlist) or ivf_nlist_for(len(ids)), len(ids))
            params.update(
                ivf_nlist=nlist, ivf_nprobe=min(int(ivf_nprobe), nlist), ivf_train_per_list=int(ivf_train_per_list)
            )
            index = _train_ivf(rows, nlist, int(ivf_train_per_list), int(seed))
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
        """``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate)."""
        return self._kind

    @property
    def dim(self) -> int:
        """d, the user-space dimension (queries and stored rows have d+1 columns)."""
        return self._dim

    @property
    def params(self) -> dict[str, int]:
        """The build parameters (exact_max_ads, hnsw_m, ef_construction, ef_search, seed,
        ivf_nlist, ivf_nprobe, ivf_train_per_list; the IVF ones 0 for other kinds)."""
        return dict(self._params)

    @property
    def n_tombstones(self) -> int:
        """Retired ads still in the HNSW graph (always 0 for flat and IVF); rebuild when this grows."""
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
            if self._kind == FLAT:
                return self._exact_top(q, k)
            if self._kind == IVF:
                scores, slots = self._ivf_search(q, k, self._params["ivf_nprobe"])
            else:
                scores, slots = self._index.search(q, k, params=self._hnsw_params(k))
            short = np.flatnonzero((slots >= 0).sum(axis=1) < min(k, len(self._slot_of)))
            if len(short):  # HNSW beam starved by tombstones, IVF lists too short: exact instead
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
        elif self._kind == IVF:  # every list probed: exact
            scores, slots = self._ivf_search(q, k, self._params["ivf_nlist"])
        else:
            scores, slots = self._index.search(q, k)
        scores[slots < 0] = -np.inf
        return scores, slots

    def _ivf_search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        params = self._search_params.get(-nprobe)  # IVF entries keyed by -nprobe (HNSW: ef > 0)
        if params is None:
            params = self._search_params[-nprobe] = faiss.SearchParametersIVF(nprobe=int(nprobe))
        return self._index.search(q, k, params=params)

    def tune_nprobe(self, queries: np.ndarray, k: int, target: float, *, threads: int = 2) -> tuple[int, float]:
        """IVF only: set ``nprobe`` to the smallest value whose recall@k on ``queries`` (real
        users' ``[u, 1]`` rows) reaches ``target``, and return ``(nprobe, that recall)``.

        Recall is :func:`~adrec_assets.online.index.exact.recall_at_k`'s (tie-aware, against an
        exact scan done once). Probing more lists only adds candidates, so recall never falls
        as ``nprobe`` grows: doubling from 1 finds a bracket, a binary search inside it the
        smallest value (at ``nlist`` every list is scanned: exact, recall 1.0). Judge the
        result on other queries than these (the ``ad_index`` asset does)."""
        if self._kind != IVF:
            raise IndexStateError(f"tune_nprobe needs an IVF index, this one is {self._kind!r}")
        q = _check_queries(queries, self._dim + 1)
        k = _check_k(k)
        if not 0.0 < float(target) <= 1.0:
            raise InvalidQueryError(f"target recall must be in (0, 1], got {target!r}")
        nlist = self._params["ivf_nlist"]
        if len(q) == 0 or not self._slot_of:
            return self._params["ivf_nprobe"], 1.0
        thresholds, k_eff = _exact_thresholds(self, q, k)
        measured: dict[int, float] = {}
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, int(threads)))

        def recall(nprobe: int) -> float:
            if nprobe not in measured:
                with self._lock.read():
                    _, slots = self._ivf_search(q, k, nprobe)
                measured[nprobe] = _hit_share(self, q, slots, thresholds, k_eff)
            return measured[nprobe]

        try:
            low, high = 0, 1  # recall(low) < target (0: nothing probed), recall(high) is the candidate
            while high < nlist and recall(high) < target:
                low, high = high, min(nlist, 2 * high)
            while high - low > 1:  # the smallest value in (low, high] reaching the target
                middle = (low + high) // 2
                low, high = (low, middle) if recall(middle) >= target else (middle, high)
            best = recall(high)
        finally:
            faiss.omp_set_num_threads(previous)
        with self._lock.write():
            self._params["ivf_nprobe"] = int(high)
        return int(high), float(best)

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
            with _omp_threads(1):  # one row: an OpenMP team only costs (IVF: 20 ms vs 0.03 ms, 2 busy cores)
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
            with _omp_threads(1):
                self._index.remove_ids(slots)
        self._pinned_remove(slots)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (no pickle; ``np.savez`` / Arrow friendly) that
        :meth:`from_arrays` turns back into an identical index."""
        # IVF: the hash-table direct map is left out (its serialized order is not stable, and the
        # bytes must be: the artifact is content-addressed) and rebuilt, here and by from_arrays;
        # that changes the index, hence the write lock
        with self._lock.write() if self._kind == IVF else self._lock.read():
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
                "faiss_index": self._serialized_index(),
                "ad_ids_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
                "ad_ids_offsets": offsets,
                "live": self._live[: len(self._slot_ids)].copy(),
            }

    def _serialized_index(self) -> np.ndarray:
        """Under the lock: the faiss index as uint8, the IVF one without its direct map."""
        if self._kind != IVF:
            return faiss.serialize_index(self._index)
        self._index.set_direct_map_type(faiss.DirectMap.NoMap)
        try:
            return faiss.serialize_index(self._index)
        finally:
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)

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
        if meta.get("format") != FORMAT_NAME or meta.get("version") not in _READABLE_VERSIONS:
            raise IndexStateError(
                f"ad index arrays are {meta.get('format')!r} v{meta.get('version')}, this code reads "
                f"{FORMAT_NAME!r} v{'/'.join(map(str, _READABLE_VERSIONS))}; re-materialize the ad_index asset"
            )
        blob = np.asarray(arrays["ad_ids_utf8"], dtype=np.uint8).tobytes()
        offsets = np.asarray(arrays["ad_ids_offsets"], dtype=np.int64)
        live = np.asarray(arrays["live"], dtype=bool)
        if len(offsets) != len(live) + 1 or offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
            raise IndexStateError("ad index arrays: ad_ids_offsets do not match ad_ids_utf8 / live")
        slot_ids = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        index = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"], dtype=np.uint8))
        kind, dim = meta["kind"], int(meta["dim"])
        if kind not in (FLAT, *ANN_KINDS):
            raise IndexStateError(f"ad index arrays hold an unknown kind {kind!r}; re-materialize the ad_index asset")
        live_ids = [slot_ids[s] for s in np.flatnonzero(live)]
        expected_rows = len(slot_ids) if kind == HNSW else len(live_ids)
        if index.d != dim + 1 or index.ntotal != expected_rows or len(set(live_ids)) != len(live_ids):
            raise IndexStateError(
                f"ad index arrays are inconsistent: faiss index d={index.d} ntotal={index.ntotal}, "
                f"meta dim={dim}, {len(slot_ids)} slots ({len(live_ids)} live, kind {kind!r})"
            )
        params = {key: int(meta.get(key, default)) for key, default in _PARAM_DEFAULTS.items()}
        if kind == IVF and not (
            1 <= params["ivf_nprobe"] <= params["ivf_nlist"] == faiss.extract_index_ivf(index).nlist
        ):
            raise IndexStateError(f"ad index arrays: IVF parameters {params} do not fit the faiss index")
        if kind == IVF:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index, kind, dim, params, slot_ids, live)


@contextmanager
def _omp_threads(threads: int) -> Iterator[None]:
    """faiss' OpenMP threads of the calling thread for the block, restored after (per thread)."""
    previous = faiss.omp_get_max_threads()
    if previous != threads:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        if previous != threads:
            faiss.omp_set_num_threads(previous)


def _train_ivf(rows: np.ndarray, nlist: int, per_list: int, seed: int) -> faiss.IndexIVFFlat:
    """An empty, trained ``IndexIVFFlat`` over ``rows``' space: k-means (``nlist`` centroids,
    :data:`IVF_KMEANS_ITERATIONS` iterations) on ``nlist * per_list`` rows drawn with ``seed``,
    with a hash-table direct map (reconstruct and remove by id)."""
    dim = rows.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_KMEANS_ITERATIONS
    index.cp.seed = seed
    index.cp.max_points_per_centroid = per_list  # faiss would subsample anyway; this is the sample
    n_train = min(len(rows), nlist * per_list)
    pick = np.sort(np.random.default_rng([seed, 7]).choice(len(rows), size=n_train, replace=False))
    index.train(np.ascontiguousarray(rows[pick]))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index
