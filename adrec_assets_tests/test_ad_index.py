"""AdIndex: FAISS search over [p_a, b_a] checked against NumPy brute force."""

from __future__ import annotations

import io
import threading

import faiss
import numpy as np
import pytest

from adrec_assets.online.index import (
    AdIndex,
    DuplicateAdIdError,
    IndexStateError,
    InvalidAdError,
    InvalidQueryError,
    NumpyIndex,
    UnknownAdError,
    exact_top_k,
    recall_at_k,
)
from adrec_assets.online.index import exact as exact_module

D = 16
KINDS = ["flat", "hnsw", "ivf"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_ads(n: int, d: int = D, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"ad-{i}" for i in range(n)], unit(rng.standard_normal((n, d))), rng.normal(0, 0.1, n).astype(np.float32)


def user_queries(n: int, d: int = D, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([unit(rng.standard_normal((n, d))), np.ones((n, 1), np.float32)], axis=1)


def build(kind: str, ids: list[str], vecs: np.ndarray, bias: np.ndarray, **kw: object) -> AdIndex:
    """Force the kind: flat when n <= exact_max_ads, HNSW or IVF (``ann``) otherwise."""
    kw.setdefault("ef_construction", 64)
    if kind != "flat":
        kw.setdefault("ann", kind)
    index = AdIndex.build(ids, vecs, bias, exact_max_ads=len(ids) if kind == "flat" else 0, **kw)
    assert index.kind == kind
    if kind == "ivf" and len(ids):  # as the ad_index asset does: nprobe from measured recall (other queries)
        index.tune_nprobe(user_queries(200, d=vecs.shape[1], seed=99), 10, 0.97)
    return index


def brute_force(
    ids: list[str], vecs: np.ndarray, bias: np.ndarray, queries: np.ndarray, k: int
) -> tuple[list[list[str]], np.ndarray]:
    """The reference: every score, fully sorted (independent of exact_top_k's partitioning)."""
    scores = queries.astype(np.float64) @ np.concatenate([vecs, bias[:, None]], axis=1).astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def result_ids(index: AdIndex, slots: np.ndarray) -> list[list[str]]:
    return [[a for a in row if a is not None] for row in index.ad_ids(slots).tolist()]


# ---------------------------------------------------------------------- search correctness
def test_flat_search_equals_numpy_brute_force_for_user_and_exploration_queries():
    ids, vecs, bias = make_ads(500)
    index = AdIndex.build(ids, vecs, bias)
    rng = np.random.default_rng(5)
    exploration = np.concatenate(
        [user_queries(20)[:, :D] * rng.uniform(0.5, 2, (20, D)), rng.uniform(0, 2, (20, 1))], axis=1
    )
    for queries in (user_queries(30), exploration.astype(np.float32)):
        scores, slots = index.search(queries, 10)
        want_ids, want_scores = brute_force(ids, vecs, bias, queries, 10)
        assert scores.dtype == np.float32 and slots.dtype == np.int64 and slots.shape == (len(queries), 10)
        assert result_ids(index, slots) == want_ids
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_score_bias_is_added_to_the_similarity():
    u = unit(np.eye(D, dtype=np.float32)[0] + 0.0)
    closer = unit(u + 0.1 * np.eye(D, dtype=np.float32)[1])  # cos 0.995
    farther = unit(u + 0.5 * np.eye(D, dtype=np.float32)[1])  # cos 0.894, but popular
    index = AdIndex.build(["closer", "popular"], np.stack([closer, farther]), np.array([0.0, 0.3], np.float32))
    scores, slots = index.search(np.append(u, 1.0)[None, :], 2)
    assert index.ad_ids(slots).tolist() == [["popular", "closer"]]
    np.testing.assert_allclose(scores[0], [farther @ u + 0.3, closer @ u], rtol=1e-6)
    _, slots = index.search(np.append(u, 0.0)[None, :], 2)  # theta_b = 0: bias ignored
    assert index.ad_ids(slots).tolist() == [["closer", "popular"]]


def test_build_is_exact_up_to_exact_max_ads_and_hnsw_above():
    ids, vecs, bias = make_ads(51)
    assert AdIndex.build(ids[:50], vecs[:50], bias[:50], exact_max_ads=50).kind == "flat"
    hnsw = AdIndex.build(ids, vecs, bias, exact_max_ads=50, hnsw_m=8, ef_search=40)
    assert hnsw.kind == "hnsw" and len(hnsw) == 51 and hnsw.dim == D
    assert hnsw.params == {"exact_max_ads": 50, "hnsw_m": 8, "ef_construction": 200, "ef_search": 40, "seed": 0,
                           "ivf_nlist": 0, "ivf_nprobe": 0, "ivf_train_per_list": 0}  # fmt: skip
    assert isinstance(faiss.downcast_index(hnsw._index), faiss.IndexHNSWFlat)
    assert hnsw._index.metric_type == faiss.METRIC_INNER_PRODUCT and hnsw._index.d == D + 1


def test_hnsw_recall_at_10_against_numpy_is_at_least_095_and_recall_at_k_agrees():
    ids, vecs, bias = make_ads(4000, d=32)
    index = build("hnsw", ids, vecs, bias, ef_construction=100)
    queries = user_queries(200, d=32)
    _, slots = index.search(queries, 10)
    want, _ = brute_force(ids, vecs, bias, queries, 10)
    manual = np.mean([len(set(got) & set(w)) / 10 for got, w in zip(result_ids(index, slots), want)])
    assert manual >= 0.95
    assert recall_at_k(index, queries, 10) == pytest.approx(manual, abs=1e-12)


def test_recall_at_k_reports_a_weak_index_exactly():
    ids, vecs, bias = make_ads(3000, d=32, seed=3)
    weak = build("hnsw", ids, vecs, bias, hnsw_m=4, ef_construction=8, ef_search=1)
    queries = user_queries(100, d=32, seed=4)
    _, slots = weak.search(queries, 10)
    want, _ = brute_force(ids, vecs, bias, queries, 10)
    manual = np.mean([len(set(got) & set(w)) / 10 for got, w in zip(result_ids(weak, slots), want)])
    assert manual < 0.9  # the index really is weak, so the comparison below means something
    assert recall_at_k(weak, queries, 10) == pytest.approx(manual, abs=1e-12)
    assert recall_at_k(AdIndex.build(ids, vecs, bias), queries, 10) == 1.0


def test_recall_at_k_counts_tied_duplicates_as_hits():
    ids, vecs, bias = make_ads(50)
    vecs[1], bias[1] = vecs[0], bias[0]  # two ads with identical rows: either may be returned
    index = AdIndex.build(ids, vecs, bias)
    q = np.append(vecs[0], 1.0)[None, :]
    assert recall_at_k(index, q, 1) == 1.0


def test_exact_top_k_matches_a_full_sort_in_blocks_and_pads(monkeypatch):
    ids, vecs, bias = make_ads(300)
    rows = np.concatenate([vecs, bias[:, None]], axis=1)
    queries = user_queries(7)
    monkeypatch.setattr(exact_module, "_EXACT_BLOCK_ELEMENTS", 7 * 13)  # 13-row blocks
    scores, got = exact_top_k(rows, queries, 12)
    want_ids, want_scores = brute_force(ids, vecs, bias, queries, 12)
    assert [[ids[j] for j in r] for r in got] == want_ids
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    scores, got = exact_top_k(rows[:3], queries[:1], 5)
    assert got[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_search_pads_with_minus_one_when_fewer_live_ads_than_k(kind):
    ids, vecs, bias = make_ads(6)
    index = build(kind, ids, vecs, bias)
    scores, slots = index.search(user_queries(3), 10)
    assert (slots[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert all(sorted(row) == sorted(ids) for row in result_ids(index, slots))
    assert (np.diff(scores[:, :6], axis=1) <= 0).all()  # best first


# ---------------------------------------------------------------------- live changes
@pytest.mark.parametrize("kind", KINDS)
def test_an_added_ad_is_recommendable_in_the_next_search(kind):
    ids, vecs, bias = make_ads(300)
    index = build(kind, ids, vecs, bias)
    direction = unit(np.random.default_rng(9).standard_normal(D))
    q = np.append(direction, 1.0)[None, :]
    assert "fresh" not in result_ids(index, index.search(q, 5)[1])[0]
    slot = index.add("fresh", direction, 0.5)
    scores, slots = index.search(q, 5)
    assert slots[0, 0] == slot and index.ad_id(slot) == "fresh" and index.slot_of("fresh") == slot
    assert scores[0, 0] == pytest.approx(1.5, rel=1e-6)
    assert len(index) == 301 and slot not in range(300)
    np.testing.assert_allclose(index.vectors([slot])[0], np.append(direction, 0.5), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_re_adding_an_ad_replaces_its_vector_and_bias(kind):
    ids, vecs, bias = make_ads(200)
    index = build(kind, ids, vecs, bias)
    old_slot = index.slot_of("ad-3")
    new_vec = unit(-vecs[3])
    new_slot = index.add("ad-3", new_vec, -0.2)
    assert new_slot != old_slot and index.slot_of("ad-3") == new_slot and len(index) == 200
    assert index.ad_id(old_slot) == "ad-3"  # still resolvable for results read just before
    scores, slots = index.search(user_queries(20), 200)
    assert all(row.count("ad-3") == 1 for row in result_ids(index, slots))
    assert old_slot not in slots and old_slot not in index.live_slots()
    q = np.append(new_vec, 1.0)[None, :]
    s, sl = index.search(q, 1)
    assert sl[0, 0] == new_slot and s[0, 0] == pytest.approx(0.8, rel=1e-5)
    with pytest.raises(UnknownAdError, match=f"slot {old_slot}"):
        index.vectors([old_slot])


@pytest.mark.parametrize("kind", KINDS)
def test_removed_ads_are_never_returned_and_the_rest_is_still_found(kind):
    ids, vecs, bias = make_ads(1500, d=32)
    index = build(kind, ids, vecs, bias, ef_construction=100)
    rng = np.random.default_rng(11)
    removed = {ids[i] for i in rng.choice(1500, 450, replace=False)}
    index.remove_many(sorted(removed)[:-1])
    index.remove(sorted(removed)[-1])
    assert len(index) == 1050 and index.n_tombstones == (450 if kind == "hnsw" else 0)
    queries = user_queries(100, d=32)
    _, slots = index.search(queries, 1500)  # ask for everything: still no retired ad
    got = result_ids(index, slots)
    assert all(len(row) == len(set(row)) and not removed & set(row) for row in got)
    keep = [i for i, a in enumerate(ids) if a not in removed]
    want, _ = brute_force([ids[i] for i in keep], vecs[keep], bias[keep], queries, 10)
    _, top = index.search(queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(result_ids(index, top), want)])
    assert recall == 1.0 if kind == "flat" else recall >= 0.95
    with pytest.raises(UnknownAdError, match="not in the index"):
        index.slot_of(sorted(removed)[0])
    with pytest.raises(UnknownAdError):
        index.remove(sorted(removed)[0])
    assert set(index.ad_ids(index.live_slots()).tolist()) == set(ids) - removed


@pytest.mark.parametrize("kind", KINDS)
def test_removing_every_ad_leaves_only_padding_and_adding_revives(kind):
    ids, vecs, bias = make_ads(40)
    index = build(kind, ids, vecs, bias)
    index.remove_many(ids)
    scores, slots = index.search(user_queries(2), 3)
    assert (slots == -1).all() and np.isneginf(scores).all() and len(index) == 0
    assert recall_at_k(index, user_queries(2), 3) == 1.0
    slot = index.add("ad-0", vecs[0], bias[0])
    assert index.search(user_queries(2), 3)[1][:, 0].tolist() == [slot, slot]


def test_hnsw_still_returns_full_exact_results_when_tombstones_crowd_the_top():
    """300 replacements of a popular ad leave 300 tombstones above every live ad: HNSW's beam
    fills with them and comes back short; the index must then fall back to an exact scan."""
    ids, vecs, bias = make_ads(300)
    index = build("hnsw", ids, vecs, bias)
    hot = [unit(np.ones(D, np.float32)), unit(np.arange(D, dtype=np.float32) + 1)]
    for i in range(301):
        index.add("hot", hot[i % 2], 5.0)
    raw_scores, raw_slots = index._index.search(user_queries(50), 5, params=index._hnsw_params(5))
    assert ((raw_slots >= 0).sum(axis=1) < 5).any()  # the starvation this test is about
    queries = user_queries(50)
    _, slots = index.search(queries, 5)
    want, _ = brute_force([*ids, "hot"], np.vstack([vecs, hot[0]]), np.r_[bias, 5.0].astype(np.float32), queries, 5)
    assert result_ids(index, slots) == want


def test_remove_many_is_all_or_nothing():
    ids, vecs, bias = make_ads(10)
    index = AdIndex.build(ids, vecs, bias)
    with pytest.raises(UnknownAdError, match="'nope'"):
        index.remove_many(["ad-1", "nope"])
    assert len(index) == 10 and index.slot_of("ad-1") == 1


def test_ad_ids_maps_padding_to_none_and_rejects_unknown_slots():
    ids, vecs, bias = make_ads(3)
    index = AdIndex.build(ids, vecs, bias)
    assert index.ad_ids(np.array([[2, -1], [0, 1]])).tolist() == [["ad-2", None], ["ad-0", "ad-1"]]
    for bad in (3, -2):
        with pytest.raises(UnknownAdError, match=f"slot {bad} was never issued"):
            index.ad_ids([bad])
        with pytest.raises(UnknownAdError):
            index.ad_id(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_vectors_are_the_stored_rows_with_bias(kind):
    ids, vecs, bias = make_ads(30)
    index = build(kind, ids, vecs, bias)
    slots = np.array([5, 0, 29])
    np.testing.assert_array_equal(index.vectors(slots), np.concatenate([vecs, bias[:, None]], axis=1)[slots])
    assert index.vectors([]).shape == (0, D + 1)


@pytest.mark.parametrize("kind", [*KINDS, "numpy"])
def test_concurrent_searches_see_each_replacement_whole(kind):
    """A reader never sees a replaced ad twice or not at all, whatever the interleaving (the
    FAISS kinds and the NumPy brute-force index share the readers-writer lock)."""
    ids, vecs, bias = make_ads(300)
    index = NumpyIndex.build(ids, vecs, bias) if kind == "numpy" else build(kind, ids, vecs, bias)
    if kind == "ivf":  # this test is about the lock: probe every list, since an ad whose bias towers over
        index._params["ivf_nprobe"] = index.params["ivf_nlist"]  # its list's is IVF's blind spot (faiss.py)
    hot = [unit(np.ones(D, np.float32)), unit(np.arange(D, dtype=np.float32) + 1)]
    index.add("hot", hot[0], 5.0)  # so high that it is always in the top 5
    queries = user_queries(50)
    stop = threading.Event()
    failures: list[str] = []
    searches = [0]

    def reader() -> None:
        while not stop.is_set():
            _, slots = index.search(queries, 5)
            for row in result_ids(index, slots):
                if row.count("hot") != 1 or len(set(row)) != len(row):
                    failures.append(repr(row))
            searches[0] += 1

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(300):
            index.add("hot", hot[i % 2], 5.0)
            if i % 50 == 0:
                index.remove("hot")
                index.add("hot", hot[0], 5.0)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not failures, failures[:3]
    assert searches[0] > 0 and len(index) == 301


def test_search_sets_openmp_threads_for_the_call_only():
    """faiss' OpenMP thread count is per calling thread: search sets it for its own call
    (single queries: 1) and leaves the caller's setting as it found it."""
    ids, vecs, bias = make_ads(100)
    index = build("hnsw", ids, vecs, bias)
    seen: list[int] = []
    real_search = index._index.search

    def spy(*args: object, **kw: object) -> object:
        seen.append(faiss.omp_get_max_threads())
        return real_search(*args, **kw)

    index._index.search = spy
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        index.search(user_queries(1), 3)
        index.search(user_queries(4), 3, threads=2)
        assert seen == [1, 2]
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(previous)


# ---------------------------------------------------------------------- persistence
@pytest.mark.parametrize("kind", KINDS)
def test_arrays_round_trip_without_pickle_gives_identical_results(kind):
    ids, vecs, bias = make_ads(800)
    index = build(kind, ids, vecs, bias, ef_search=32, seed=7)
    index.remove_many(["ad-1", "ad-500"])
    index.add("ad-ü-new", vecs[1], 0.3)
    index.add("ad-2", vecs[3], 0.1)  # replacement
    arrays = index.to_arrays()
    assert all(a.dtype != object for a in arrays.values())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        restored = AdIndex.from_arrays(dict(z))
    assert restored.nbytes == index.nbytes == sum(a.nbytes for a in arrays.values())
    assert (restored.kind, len(restored), restored.dim, restored.params, restored.n_tombstones) == (
        index.kind,
        len(index),
        index.dim,
        index.params,
        index.n_tombstones,
    )
    queries = user_queries(100)
    a_scores, a_slots = index.search(queries, 20)
    b_scores, b_slots = restored.search(queries, 20)
    np.testing.assert_array_equal(a_slots, b_slots)
    np.testing.assert_array_equal(a_scores, b_scores)
    np.testing.assert_array_equal(index.live_slots(), restored.live_slots())
    assert restored.ad_id(index.slot_of("ad-ü-new")) == "ad-ü-new" and restored.ad_id(1) == "ad-1"
    # slots keep counting after a reload: a restored index never reissues one
    assert restored.add("later", vecs[4], 0.0) == index.add("later", vecs[4], 0.0) == 802


def test_from_arrays_rejects_missing_foreign_or_inconsistent_arrays():
    ids, vecs, bias = make_ads(20)
    arrays = AdIndex.build(ids, vecs, bias).to_arrays()
    with pytest.raises(IndexStateError, match="live"):
        AdIndex.from_arrays({k: v for k, v in arrays.items() if k != "live"})
    wrong_version = dict(arrays, meta_json=np.frombuffer(b'{"format": "adrec-ad-index", "version": 99}', np.uint8))
    with pytest.raises(IndexStateError, match="v99"):
        AdIndex.from_arrays(wrong_version)
    with pytest.raises(IndexStateError, match="inconsistent"):
        AdIndex.from_arrays(dict(arrays, live=np.r_[np.zeros(1, bool), arrays["live"][1:]]))
    with pytest.raises(IndexStateError, match="offsets"):
        AdIndex.from_arrays(dict(arrays, ad_ids_offsets=arrays["ad_ids_offsets"][:-1]))


def test_hnsw_with_one_openmp_thread_is_reproducible_from_its_seed():
    ids, vecs, bias = make_ads(400)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # per-thread setting; parallel insertion order would vary
    try:
        a, b, c = (build("hnsw", ids, vecs, bias, seed=s).to_arrays()["faiss_index"] for s in (3, 3, 4))
    finally:
        faiss.omp_set_num_threads(previous)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------------- bad inputs
BAD_BUILDS = [
    ("duplicate id", DuplicateAdIdError, lambda ids, v, b: AdIndex.build(ids[:2] + ids[:1], v[:3], b[:3])),
    ("empty id", InvalidAdError, lambda ids, v, b: AdIndex.build(["", *ids[1:]], v, b)),
    ("non-str id", InvalidAdError, lambda ids, v, b: AdIndex.build([1, *ids[1:]], v, b)),
    (
        "NaN vector",
        InvalidAdError,
        lambda ids, v, b: AdIndex.build(ids, np.where(np.eye(len(v), D, dtype=bool), np.nan, v), b),
    ),
    ("inf bias", InvalidAdError, lambda ids, v, b: AdIndex.build(ids, v, np.r_[b[:-1], np.inf])),
    ("bias shape", InvalidAdError, lambda ids, v, b: AdIndex.build(ids, v, b[:, None])),
    ("ids vs rows", InvalidAdError, lambda ids, v, b: AdIndex.build(ids[:-1], v, b)),
    ("1-d vectors", InvalidAdError, lambda ids, v, b: AdIndex.build(ids[:1], v[0], b[:1])),
    ("string vectors", InvalidAdError, lambda ids, v, b: AdIndex.build(ids, v.astype(str), b)),
    ("hnsw_m", InvalidAdError, lambda ids, v, b: AdIndex.build(ids, v, b, hnsw_m=0)),
]


@pytest.mark.parametrize("what,error,call", BAD_BUILDS, ids=[b[0] for b in BAD_BUILDS])
def test_build_rejects_bad_inputs_with_specific_errors(what, error, call):
    ids, vecs, bias = make_ads(5)
    with pytest.raises(error):
        call(ids, vecs, bias)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_add_or_query_raises_and_leaves_the_index_unchanged(kind):
    ids, vecs, bias = make_ads(50)
    index = build(kind, ids, vecs, bias)
    queries = user_queries(5)
    before = index.search(queries, 50)
    bad_adds = [
        ("", vecs[0], 0.0),
        ("x", vecs[0][:-1], 0.0),
        ("x", np.full(D, np.nan), 0.0),
        ("x", vecs[0], float("inf")),
        ("x", vecs[0], np.ones(2)),
        ("ad-3", np.full(D, np.inf), 0.0),
    ]
    for ad_id, vector, b in bad_adds:
        with pytest.raises(InvalidAdError):
            index.add(ad_id, vector, b)
    bad_queries = (
        (queries[:, :D], 5),
        (np.full((1, D + 1), np.nan), 5),
        (queries, 0),
        (queries, 2.5),
        (queries.astype(str), 5),
    )
    for bad_query, k in bad_queries:
        with pytest.raises(InvalidQueryError):
            index.search(bad_query, k)
    after = index.search(queries, 50)
    np.testing.assert_array_equal(before[1], after[1])
    assert len(index) == 50 and index.slot_of("ad-3") == 3


# ---------------------------------------------------------------------- NumpyIndex (brute-force backend)
def numpy_pair(n: int = 400, seed: int = 0) -> tuple[AdIndex, NumpyIndex, list[str], np.ndarray, np.ndarray]:
    ids, vecs, bias = make_ads(n, seed=seed)
    return AdIndex.build(ids, vecs, bias), NumpyIndex.build(ids, vecs, bias), ids, vecs, bias


def assert_same_results(flat: AdIndex, brute: NumpyIndex, k: int = 10) -> None:
    rng = np.random.default_rng(21)
    exploration = np.concatenate(
        [user_queries(10)[:, :D] * rng.uniform(0.5, 2, (10, D)), rng.uniform(0, 2, (10, 1))], axis=1
    )
    for queries in (user_queries(40), exploration.astype(np.float32)):
        want_scores, want_slots = flat.search(queries, k)
        got_scores, got_slots = brute.search(queries, k)
        assert got_scores.dtype == np.float32 and got_slots.dtype == np.int64 and got_slots.shape == (len(queries), k)
        np.testing.assert_array_equal(got_slots, want_slots)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert len(brute) == len(flat)
    np.testing.assert_array_equal(brute.live_slots(), flat.live_slots())
    live = flat.live_slots()
    np.testing.assert_array_equal(brute.vectors(live), flat.vectors(live))


def test_numpy_index_gives_exactly_the_flat_index_results():
    flat, brute, ids, vecs, bias = numpy_pair()
    assert (brute.kind, brute.dim, brute.n_tombstones) == ("numpy", D, 0)
    assert_same_results(flat, brute)
    assert_same_results(flat, NumpyIndex.from_index(flat))
    want, _ = brute_force(ids, vecs, bias, user_queries(30), 10)
    assert result_ids(brute, brute.search(user_queries(30), 10)[1]) == want
    assert recall_at_k(brute, user_queries(30), 10) == 1.0
    assert brute.nbytes >= 400 * (D + 1) * 4


def test_numpy_index_live_changes_behave_like_the_flat_index():
    flat, brute, ids, vecs, bias = numpy_pair()
    direction = unit(np.random.default_rng(9).standard_normal(D))
    steps = [
        lambda ix: ix.add("fresh", direction, 0.5),
        lambda ix: ix.add("ad-3", unit(-vecs[3]), -0.2),  # replacement: the old slot retires
        lambda ix: ix.remove("ad-7"),
        lambda ix: ix.remove_many([f"ad-{i}" for i in range(100, 300)]),
        lambda ix: ix.add("ad-7", vecs[7], bias[7]),  # re-added after retirement: a new slot
    ]
    for step in steps:
        assert step(flat) == step(brute)  # same slot issued
        assert_same_results(flat, brute)
    old_slot = 3
    assert brute.ad_id(old_slot) == flat.ad_id(old_slot) == "ad-3"
    assert brute.slot_of("ad-3") == flat.slot_of("ad-3") != old_slot
    with pytest.raises(UnknownAdError, match=f"slot {old_slot}"):
        brute.vectors([old_slot])
    with pytest.raises(UnknownAdError, match="'nope'"):
        brute.remove_many(["ad-1", "nope"])  # all or nothing
    assert brute.slot_of("ad-1") == 1
    with pytest.raises(UnknownAdError, match="not in the index"):
        brute.remove("ad-150")
    # built from an index with retirements: same slots, retired ones stay retired
    assert_same_results(flat, NumpyIndex.from_index(flat))
    scores, slots = brute.search(user_queries(3), 1000)  # more than live: padded
    assert (slots[:, len(brute) :] == -1).all() and np.isneginf(scores[:, len(brute) :]).all()
    brute.remove_many(brute.ad_ids(brute.live_slots()).tolist())
    scores, slots = brute.search(user_queries(2), 3)
    assert (slots == -1).all() and np.isneginf(scores).all() and len(brute) == 0
    assert recall_at_k(brute, user_queries(2), 3) == 1.0


def test_numpy_index_grows_past_its_spare_rows_and_keeps_every_ad():
    ids, vecs, bias = make_ads(20)
    brute = NumpyIndex.build(ids, vecs, bias)
    more_ids, more_vecs, more_bias = make_ads(1500, seed=4)
    for a, v, b in zip(more_ids, more_vecs, more_bias):
        brute.add(f"x-{a}", v, float(b))
    all_ids = ids + [f"x-{a}" for a in more_ids]
    all_vecs, all_bias = np.vstack([vecs, more_vecs]), np.r_[bias, more_bias].astype(np.float32)
    want, _ = brute_force(all_ids, all_vecs, all_bias, user_queries(20), 10)
    assert len(brute) == 1520 and result_ids(brute, brute.search(user_queries(20), 10)[1]) == want


def test_numpy_index_refuses_bad_inputs_like_the_flat_index():
    ids, vecs, bias = make_ads(50)
    with pytest.raises(DuplicateAdIdError):
        NumpyIndex.build(ids[:2] + ids[:1], vecs[:3], bias[:3])
    with pytest.raises(InvalidAdError):
        NumpyIndex.build(ids, vecs, np.r_[bias[:-1], np.inf])
    brute = NumpyIndex.build(ids, vecs, bias)
    for ad_id, vector, b in (
        ("", vecs[0], 0.0),
        ("x", vecs[0][:-1], 0.0),
        ("x", np.full(D, np.nan), 0.0),
        ("x", vecs[0], np.ones(2)),
    ):
        with pytest.raises(InvalidAdError):
            brute.add(ad_id, vector, b)
    queries = user_queries(5)
    for bad_query, k in ((queries[:, :D], 5), (np.full((1, D + 1), np.nan), 5), (queries, 0), (queries, 2.5)):
        with pytest.raises(InvalidQueryError):
            brute.search(bad_query, k)
    assert len(brute) == 50


def test_serving_config_chooses_the_index_backend_from_the_environment(monkeypatch):
    from adrec_assets.online.config import ServingConfig

    assert ServingConfig.from_env("synthetic").index_backend == "faiss"
    monkeypatch.setenv("ADREC_SERVE_INDEX", "numpy")
    assert ServingConfig.from_env("synthetic").index_backend == "numpy"
    monkeypatch.setenv("ADREC_SERVE_INDEX", "annoy")
    with pytest.raises(ValueError, match=r"ADREC_SERVE_INDEX.*'faiss', 'numpy'.*'annoy'"):
        ServingConfig.from_env("synthetic")


def test_numpy_index_is_exact_on_large_catalogues_with_retired_rows():
    """Above a few thousand ads the top-k selection prunes by block maxima; still exact."""
    ids, vecs, bias = make_ads(12_000, seed=5)
    flat, brute = AdIndex.build(ids, vecs, bias), NumpyIndex.build(ids, vecs, bias)
    retired = [ids[i] for i in np.random.default_rng(6).choice(12_000, 3000, replace=False)]
    flat.remove_many(retired)
    brute.remove_many(retired)
    for k in (1, 10, 40):
        for queries in (user_queries(2), user_queries(12)):  # block-wise scan, one matrix product
            np.testing.assert_array_equal(brute.search(queries, k)[1], flat.search(queries, k)[1])
    np.testing.assert_array_equal(
        brute.search(user_queries(12), 10, threads=2)[1], flat.search(user_queries(12), 10)[1]
    )


# ---------------------------------------------------------------------- the pinned (new-user) query
def any_index(kind: str, ids: list[str], vecs: np.ndarray, bias: np.ndarray, **kw: object) -> AdIndex | NumpyIndex:
    return NumpyIndex.build(ids, vecs, bias) if kind == "numpy" else build(kind, ids, vecs, bias, **kw)


def mean_query(vecs: np.ndarray) -> np.ndarray:
    """What new users are served with: the (short) mean of many users, then 1 for the bias."""
    return np.append(vecs.mean(axis=0) * 0.3, 1.0).astype(np.float32)


def live_brute_force(index: AdIndex | NumpyIndex, query: np.ndarray, k: int) -> list[str]:
    live = index.live_slots()
    rows = index.vectors(live)
    return brute_force(list(index.ad_ids(live)), rows[:, :-1], rows[:, -1], query[None, :], k)[0][0]


def test_a_pinned_query_is_answered_exactly_where_hnsw_alone_is_not():
    ids, vecs, bias = make_ads(3000, d=32)
    index = build("hnsw", ids, vecs, bias, hnsw_m=4, ef_construction=16, ef_search=10)
    query = mean_query(unit(np.random.default_rng(3).standard_normal((500, 32))))
    want = live_brute_force(index, query, 50)
    assert result_ids(index, index.search(query[None, :], 50)[1])[0] != want  # HNSW alone misses some
    others = user_queries(20, d=32)
    before = index.search(others, 10)
    index.pin_query(query, depth=100)
    scores, slots = index.search(query[None, :], 50)
    assert result_ids(index, slots)[0] == want
    assert (np.diff(scores[0]) <= 0).all()
    for got, expected in zip(index.search(others, 10), before):  # other queries: unchanged
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "numpy"])
def test_the_pinned_answer_stays_exact_through_live_adds_and_removals(kind):
    ids, vecs, bias = make_ads(400)
    index = any_index(kind, ids, vecs, bias, ef_search=400)  # a full beam: HNSW's fallback is exact too
    query = mean_query(vecs)
    index.pin_query(query, depth=30)
    rng = np.random.default_rng(5)
    direction = unit(query[:-1])
    for step in range(40):
        if step % 3 == 0:  # a strong new ad, then a weak one: only the first enters the list
            index.add(f"new-{step}", unit(direction + 0.3 * rng.standard_normal(D).astype(np.float32)), 0.5)
            index.add(f"weak-{step}", unit(-direction), -0.5)
        elif step % 3 == 1:  # retire one of today's best
            best = result_ids(index, index.search(query[None, :], 3)[1])[0]
            index.remove(best[int(rng.integers(len(best)))])
        else:  # re-add a live ad with a new vector: its old slot retires
            index.add(ids[int(rng.integers(200, 400))], unit(rng.standard_normal(D)), 0.0)
        for k in (1, 10, 25):
            assert result_ids(index, index.search(query[None, :], k)[1])[0] == live_brute_force(index, query, k), (
                step,
                k,
            )


@pytest.mark.parametrize("kind", ["flat", "numpy"])
def test_a_pinned_list_short_of_k_after_removals_falls_back_to_a_real_search(kind):
    ids, vecs, bias = make_ads(200)
    index = any_index(kind, ids, vecs, bias)
    query = mean_query(vecs)
    index.pin_query(query, depth=12)
    top = result_ids(index, index.search(query[None, :], 12)[1])[0]
    index.remove_many(top[:8])  # 4 left in the list
    assert result_ids(index, index.search(query[None, :], 4)[1])[0] == live_brute_force(index, query, 4)
    assert result_ids(index, index.search(query[None, :], 10)[1])[0] == live_brute_force(index, query, 10)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "numpy"])
def test_a_pinned_list_holding_the_whole_catalogue_takes_every_add_and_pads(kind):
    ids, vecs, bias = make_ads(5)
    index = any_index(kind, ids, vecs, bias)
    query = mean_query(vecs)
    index.pin_query(query, depth=8)
    index.add("low", unit(-query[:-1]), -3.0)  # the worst ad of all still belongs to the list
    scores, slots = index.search(query[None, :], 10)
    assert (
        result_ids(index, slots)[0] == live_brute_force(index, query, 10) and result_ids(index, slots)[0][-1] == "low"
    )
    assert (slots[0, 6:] == -1).all() and np.isneginf(scores[0, 6:]).all()
    for i in range(5):
        index.add(f"more-{i}", unit(np.random.default_rng(i).standard_normal(D)), 0.0)
    assert result_ids(index, index.search(query[None, :], 8)[1])[0] == live_brute_force(index, query, 8)
    assert result_ids(index, index.search(query[None, :], 10)[1])[0] == live_brute_force(index, query, 10)


def test_pin_query_refuses_a_query_of_the_wrong_width():
    ids, vecs, bias = make_ads(20)
    index = build("flat", ids, vecs, bias)
    with pytest.raises(InvalidQueryError):
        index.pin_query(np.ones(D, np.float32), depth=5)
