"""The IVF kind of AdIndex: nprobe tuned to a measured recall, answers judged against a full
sort, exact when every list is probed, byte-stable persistence and live changes."""

from __future__ import annotations

import io
import json

import faiss
import numpy as np
import pytest

from adrec_assets.online.index import IVF, AdIndex, IndexStateError, InvalidQueryError, ivf_nlist_for, recall_at_k
from adrec_assets.online.index.exact import _exact_thresholds

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n_ads: int, n_users: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Ads and users around the same 40 centres (the structure real embeddings have)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((40, D)))
    ads = unit(centres[rng.integers(40, size=n_ads)] + 0.35 * rng.standard_normal((n_ads, D)))
    users = unit(centres[rng.integers(40, size=n_users)] + 0.3 * rng.standard_normal((n_users, D)))
    queries = np.concatenate([users, np.ones((n_users, 1), np.float32)], axis=1)
    return [f"ad-{i}" for i in range(n_ads)], ads, rng.normal(0, 0.05, n_ads).astype(np.float32), queries


def full_sort_top(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: every score in float64, fully sorted (rows, scores)."""
    scores = queries.astype(np.float64) @ rows.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def reference_recall(index: AdIndex, rows: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index.search`` against :func:`full_sort_top` (slots == rows: no live changes)."""
    _, kth = full_sort_top(rows, queries, k)
    _, slots = index.search(queries, k)
    true = np.einsum("qkd,qd->qk", rows[slots].astype(np.float64), queries.astype(np.float64))
    return float(np.mean((true >= kth[:, -1:] - 1e-6).sum(axis=1) / k))


@pytest.fixture(scope="module")
def catalogue():
    ids, vecs, bias, queries = clustered(6000, 600)
    rows = np.concatenate([vecs, bias[:, None]], axis=1)
    return ids, vecs, bias, rows, queries[:300], queries[300:]


def build_ivf(ids, vecs, bias, **kw) -> AdIndex:
    index = AdIndex.build(ids, vecs, bias, exact_max_ads=0, ann="ivf", **kw)
    assert index.kind == IVF
    return index


def test_tuned_nprobe_is_the_smallest_reaching_the_target_and_holds_on_other_users(catalogue):
    ids, vecs, bias, rows, tune, check = catalogue
    index = build_ivf(ids, vecs, bias, ivf_nlist=60)
    assert index.params["ivf_nlist"] == 60 and isinstance(faiss.downcast_index(index._index), faiss.IndexIVFFlat)
    nprobe, tuned = index.tune_nprobe(tune, 10, 0.95)
    assert index.params["ivf_nprobe"] == nprobe and 1 < nprobe < 60
    assert tuned >= 0.95 and tuned == pytest.approx(reference_recall(index, rows, tune, 10), abs=1e-9)
    # minimal: one probe fewer misses the target on the tuning users
    index._params["ivf_nprobe"] = nprobe - 1
    assert reference_recall(index, rows, tune, 10) < 0.95
    index._params["ivf_nprobe"] = nprobe
    # judged on users the tuning never saw, by an independent full sort
    held_out = reference_recall(index, rows, check, 10)
    assert held_out >= 0.93
    assert recall_at_k(index, check, 10) == pytest.approx(held_out, abs=1e-9)


def test_every_list_probed_is_exact_and_few_probes_are_not(catalogue):
    ids, vecs, bias, rows, tune, _ = catalogue
    index = build_ivf(ids, vecs, bias, ivf_nlist=60, ivf_nprobe=60)
    want, want_scores = full_sort_top(rows, tune, 10)
    scores, slots = index.search(tune, 10)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (slots == want).mean() > 0.999  # float32 ties aside, the same ads in the same order
    assert reference_recall(build_ivf(ids, vecs, bias, ivf_nlist=60, ivf_nprobe=1), rows, tune, 10) < 0.9


def test_exact_thresholds_equal_a_float64_full_sort(catalogue):
    ids, vecs, bias, rows, tune, _ = catalogue
    index = build_ivf(ids, vecs, bias, ivf_nlist=60)
    for k in (1, 10, 37):
        thresholds, k_eff = _exact_thresholds(index, tune, k)
        _, kth = full_sort_top(rows, tune, k)
        assert k_eff == k
        np.testing.assert_allclose(thresholds, kth[:, -1], rtol=0, atol=1e-12)
    small = build_ivf(ids[:30], vecs[:30], bias[:30])
    thresholds, k_eff = _exact_thresholds(small, tune[:5], 50)  # fewer ads than k: the last one counts
    assert k_eff == 30
    np.testing.assert_allclose(thresholds, full_sort_top(rows[:30], tune[:5], 30)[1][:, -1], atol=1e-12)


def test_arrays_round_trip_byte_for_byte_with_the_tuned_nprobe_and_live_changes(catalogue):
    ids, vecs, bias, rows, tune, check = catalogue
    index = build_ivf(ids, vecs, bias, ivf_nlist=60, seed=3)
    index.tune_nprobe(tune, 10, 0.95)
    index.remove_many(["ad-1", "ad-500"])
    index.add("ad-ü-new", vecs[1], 0.3)
    index.add("ad-2", vecs[3], 0.1)  # a replacement: the old slot is really removed (no tombstones)
    assert index.n_tombstones == 0 and len(index) == 5999
    arrays = index.to_arrays()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as stored:
        restored = AdIndex.from_arrays(dict(stored))
    again = restored.to_arrays()
    assert all(np.array_equal(arrays[key], again[key]) for key in arrays)  # content-addressable: stable bytes
    assert restored.params == index.params and restored.kind == IVF
    for a, b in zip(index.search(check, 20), restored.search(check, 20)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored.vectors([restored.slot_of("ad-2")])[0], np.append(vecs[3], np.float32(0.1)))
    assert restored.add("later", vecs[4], 0.0) == index.add("later", vecs[4], 0.0) == 6002
    # a restored index can still remove (its direct map is rebuilt on load)
    restored.remove("ad-7")
    assert "ad-7" not in set(restored.ad_ids(restored.search(np.append(vecs[7], 1.0)[None, :], 5)[1])[0])


def test_the_build_is_reproducible_from_its_seed(catalogue):
    ids, vecs, bias, *_ = catalogue
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        a, b, c = (build_ivf(ids, vecs, bias, ivf_nlist=40, seed=s).to_arrays()["faiss_index"] for s in (1, 1, 2))
    finally:
        faiss.omp_set_num_threads(previous)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_tuning_and_inconsistent_arrays_are_refused(catalogue):
    ids, vecs, bias, _, tune, _ = catalogue
    flat = AdIndex.build(ids[:50], vecs[:50], bias[:50])
    with pytest.raises(IndexStateError, match="IVF"):
        flat.tune_nprobe(tune, 10, 0.95)
    index = build_ivf(ids[:2000], vecs[:2000], bias[:2000], ivf_nlist=20)
    with pytest.raises(InvalidQueryError):
        index.tune_nprobe(tune, 10, 1.5)
    arrays = index.to_arrays()
    meta = json.loads(arrays["meta_json"].tobytes())
    for broken in ({**meta, "ivf_nprobe": 21}, {**meta, "ivf_nlist": 19}, {**meta, "kind": "annoy"}):
        with pytest.raises(IndexStateError):
            AdIndex.from_arrays({**arrays, "meta_json": np.frombuffer(json.dumps(broken).encode(), np.uint8)})


def test_version_1_arrays_still_load():
    ids, vecs, bias, queries = clustered(300, 10)
    index = AdIndex.build(ids, vecs, bias, exact_max_ads=100, hnsw_m=8)
    arrays = index.to_arrays()
    meta = json.loads(arrays["meta_json"].tobytes())
    old = {k: v for k, v in meta.items() if not k.startswith("ivf_")} | {"version": 1}
    restored = AdIndex.from_arrays({**arrays, "meta_json": np.frombuffer(json.dumps(old).encode(), np.uint8)})
    assert restored.kind == "hnsw" and restored.params["ivf_nlist"] == 0
    np.testing.assert_array_equal(restored.search(queries, 5)[1], index.search(queries, 5)[1])


def test_default_list_count_follows_sqrt_n_within_faiss_training_limits():
    assert ivf_nlist_for(1_000_000) == 1000 and ivf_nlist_for(10_000) == 100
    assert ivf_nlist_for(100) == 2 and ivf_nlist_for(10) == 1 and ivf_nlist_for(0) == 1


def test_live_changes_leave_the_callers_openmp_setting_as_it_was(catalogue):
    ids, vecs, bias, *_ = catalogue
    index = build_ivf(ids[:2000], vecs[:2000], bias[:2000], ivf_nlist=20)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        index.add("x", vecs[0], 0.0)  # runs on one OpenMP thread, then restores the caller's 3
        assert faiss.omp_get_max_threads() == 3
        index.remove("x")
        assert faiss.omp_get_max_threads() == 3 and "x" not in set(index.ad_ids(index.live_slots()).tolist())
    finally:
        faiss.omp_set_num_threads(previous)


def test_the_artifact_keeps_its_fingerprints_and_older_artifacts_load_without_them():
    from adrec_assets.online.index import IndexedAds

    ids, vecs, bias, _ = clustered(300, 10)
    artifact = IndexedAds(build_ivf(ids, vecs, bias), "users:s", "enc", 0.99, "inputs-hash", "recall-hash")
    arrays = artifact.to_arrays()
    back = IndexedAds.from_arrays(arrays)
    assert (back.inputs_fingerprint, back.recall_fingerprint, back.recall_at_10) == ("inputs-hash", "recall-hash", 0.99)
    older = IndexedAds.from_arrays({k: v for k, v in arrays.items() if not k.endswith("_fingerprint")})
    assert (older.inputs_fingerprint, older.recall_fingerprint) == ("", "")  # never matches: rebuilt, not reused
