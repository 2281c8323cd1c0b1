"""Tests for adrec_assets.ml.types artifacts/validators and adrec_assets.privacy."""

import hashlib
import hmac
import warnings

import numpy as np
import pytest

from adrec_assets import privacy as pseudonyms
from adrec_assets.ml.types import (
    AdCatalog,
    ArtifactError,
    ClickGraph,
    ContentEmbeddings,
    GlobalMean,
    ProjectedAds,
    TrainingProvenance,
    UserEmbeddings,
    align_rows,
    check_unit_rows,
    isin_ids,
    str_array,
)
from adrec_assets.privacy import (
    InsecureKeyError,
    InsecureKeyWarning,
    key_fingerprint,
    pseudonymize,
    pseudonymize_many,
    resolve_key,
)


def _dense(graph: ClickGraph) -> np.ndarray:
    m = np.zeros((graph.n_users, graph.n_ads), dtype=np.float64)
    for u in range(graph.n_users):
        for j in range(graph.indptr[u], graph.indptr[u + 1]):
            m[u, graph.indices[j]] += graph.weights[j]
    return m


# ---------------------------------------------------------------- ClickGraph


def test_from_pairs_sums_repeats_and_sorts_ids():
    """Repeated (user, ad) clicks sum into one weighted entry; ids come out sorted."""
    g = ClickGraph.from_pairs(
        np.array(["zed", "amy", "zed", "bob", "zed", "amy"]),
        np.array(["ad9", "ad1", "ad9", "ad1", "ad2", "ad9"]),
        np.array([1.0, 2.0, 3.0, 1.0, 0.5, 1.0]),
    )
    assert g.user_ids.tolist() == ["amy", "bob", "zed"]
    assert g.ad_ids.tolist() == ["ad1", "ad2", "ad9"]
    expected = np.array(
        [
            [2.0, 0.0, 1.0],  # amy
            [1.0, 0.0, 0.0],  # bob
            [0.0, 0.5, 4.0],  # zed: ad9 1 + 3
        ]
    )
    np.testing.assert_array_equal(_dense(g), expected)
    assert g.n_clicks == 5  # stored (user, ad) entries, not raw rows
    assert g.indptr.tolist() == [0, 2, 3, 5]
    # within a user, ad columns ascend
    for u in range(g.n_users):
        cols = g.indices[g.indptr[u] : g.indptr[u + 1]]
        assert np.all(np.diff(cols) > 0)


def test_from_pairs_default_weight_counts_clicks():
    """Without weights each raw click counts 1, so repeats become counts."""
    g = ClickGraph.from_pairs(np.array(["u", "u", "u", "v"]), np.array(["a", "a", "b", "a"]))
    np.testing.assert_array_equal(_dense(g), [[2.0, 1.0], [1.0, 0.0]])
    assert g.weights.dtype == np.float32


def test_csc_is_transpose():
    """csc() lists for each ad exactly the users whose CSR rows contain it."""
    rng = np.random.default_rng(0)
    users = rng.choice([f"u{i}" for i in range(9)], size=60)
    ads = rng.choice([f"a{i}" for i in range(7)], size=60)
    g = ClickGraph.from_pairs(users, ads)
    ad_indptr, ad_users = g.csc()
    dense = _dense(g) > 0
    assert len(ad_indptr) == g.n_ads + 1 and ad_indptr[-1] == g.n_clicks
    for a in range(g.n_ads):
        got = sorted(ad_users[ad_indptr[a] : ad_indptr[a + 1]].tolist())
        assert got == np.flatnonzero(dense[:, a]).tolist()
    np.testing.assert_array_equal(g.ad_degrees(), dense.sum(axis=0))


def test_click_graph_array_round_trip():
    """to_arrays/from_arrays reproduce every field exactly."""
    g = ClickGraph.from_pairs(np.array(["b", "a", "b"]), np.array(["x", "y", "y"]), np.array([1, 2, 3.5]))
    g2 = ClickGraph.from_arrays(g.to_arrays())
    for name in ("user_ids", "ad_ids", "indptr", "indices", "weights"):
        np.testing.assert_array_equal(getattr(g2, name), getattr(g, name))
    assert g2.indices.dtype == np.int32 and g2.indptr.dtype == np.int64


@pytest.mark.parametrize(
    "indptr,indices,weights,match",
    [
        ([0, 1], [0], [1.0], "n_users \\+ 1"),  # 2 users need 3 indptr entries
        ([0, 1, 2], [0, 1], [1.0], "do not match"),  # weights shorter than indices
        ([0, 1, 3], [0, 1], [1.0, 1.0], "do not match"),  # indptr[-1] != nnz
        ([0, 1, 2], [0, 2], [1.0, 1.0], "outside"),  # ad index 2 of 2 ads
        ([0, 1, 2], [0, -1], [1.0, 1.0], "outside"),
    ],
)
def test_click_graph_constructor_rejects_inconsistent_arrays(indptr, indices, weights, match):
    """Inconsistent CSR arrays raise ArtifactError."""
    with pytest.raises(ArtifactError, match=match):
        ClickGraph(
            np.array(["u0", "u1"]),
            np.array(["a0", "a1"]),
            np.array(indptr, dtype=np.int64),
            np.array(indices, dtype=np.int32),
            np.array(weights, dtype=np.float32),
        )


# ---------------------------------------------------------------- other artifacts


def test_ad_catalog_rejects_duplicates_and_ragged_columns():
    """AdCatalog refuses duplicate ids and columns of different lengths."""
    with pytest.raises(ArtifactError, match="duplicate"):
        AdCatalog(np.array(["a", "b", "a"]), np.array(["t1", "t2", "t3"]), np.array(["", "", ""]), "")
    with pytest.raises(ArtifactError, match="differ in length"):
        AdCatalog(np.array(["a", "b"]), np.array(["t1"]), np.array(["", ""]), "")
    cat = AdCatalog(np.array(["a", "b"]), np.array(["t1", "t2"]), np.array(["/src/x.png", ""]), "/src")
    back = AdCatalog.from_arrays(cat.to_arrays())
    assert back.ad_ids.tolist() == ["a", "b"] and back.image_paths.tolist() == ["/src/x.png", ""]
    assert back.image_root == "/src"
    with pytest.raises(ArtifactError, match="inside image_root"):
        AdCatalog(np.array(["a"]), np.array(["t"]), np.array(["/elsewhere/x.png"]), "/src")


def test_user_embeddings_round_trip_keeps_flags_and_provenance(tmp_path):
    """UserEmbeddings survive to_arrays -> npz (no pickle) -> from_arrays with typed fields."""
    provenance = TrainingProvenance({"lr": 0.003, "dim": 2}, "fp-1", "warm_start", "users:older")
    e = UserEmbeddings(
        ids=np.array(["x", "y"]),
        vectors=np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32),
        space="users:run-1",
        isolated=np.array([True, False]),
        provenance=provenance,
    )
    np.savez(tmp_path / "e.npz", **e.to_arrays())
    with np.load(tmp_path / "e.npz", allow_pickle=False) as npz:
        back = UserEmbeddings.from_arrays({k: npz[k] for k in npz.files})
    assert back.ids.tolist() == ["x", "y"]
    np.testing.assert_array_equal(back.vectors, e.vectors)
    assert back.space == "users:run-1" and back.provenance == provenance
    np.testing.assert_array_equal(back.isolated, [True, False])
    assert back.dim == 2 and len(back) == 2
    assert back.row_of("y") == 1 and back.row_of("z") is None


def test_provenance_refuses_an_unknown_training_path():
    """trained_by is one of the two paths that train; a typo is an error, not a new path."""
    with pytest.raises(ArtifactError, match="trained_by"):
        TrainingProvenance({}, "fp", "warm-start")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContentEmbeddings(np.array(["a"]), np.zeros((2, 3), np.float32), "enc", np.array([False])),
        lambda: ContentEmbeddings(np.array(["a"]), np.zeros((1, 3), np.float32), "enc", np.array([False, True])),
        lambda: ProjectedAds(np.array(["a"]), np.zeros(3, np.float32), "s", "enc", np.zeros(1)),
        lambda: ProjectedAds(np.array(["a", "b"]), np.zeros((2, 3), np.float32), "s", "enc", np.zeros(3)),
        lambda: UserEmbeddings(
            np.array(["a"]),
            np.zeros((1, 3), np.float32),
            "s",
            np.array([True, False]),
            TrainingProvenance({}, "fp", "full_retrain"),
        ),
    ],
)
def test_vector_artifacts_reject_misaligned_fields(make):
    """Vectors must be (n, d) with one row per id, and per-row fields one entry per row."""
    with pytest.raises(ArtifactError):
        make()


def test_global_mean_round_trip():
    """GlobalMean survives to_arrays/from_arrays."""
    gm = GlobalMean(np.array([0.6, 0.8], dtype=np.float32), 12, 0.25, "users:abc")
    back = GlobalMean.from_arrays(gm.to_arrays())
    np.testing.assert_array_equal(back.vector, gm.vector)
    assert back.n_users == 12 and back.mean_norm == pytest.approx(0.25) and back.space == "users:abc"


# ---------------------------------------------------------------- validators


def _unit(n=4, d=3, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_check_unit_rows_accepts_unit_rows():
    """Proper unit rows of the right width pass silently."""
    check_unit_rows(_unit(), "ok", dim=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_unit_rows_rejects_non_finite_naming_row(bad):
    """NaN/inf rows raise, naming the first bad row."""
    v = _unit()
    v[2, 1] = bad
    with pytest.raises(ArtifactError, match=r"first row 2"):
        check_unit_rows(v, "user vectors")


def test_check_unit_rows_rejects_wrong_dim_and_non_unit():
    """A wrong width and a non-unit row raise; the message names what and which row."""
    with pytest.raises(ArtifactError, match="expected 5 columns"):
        check_unit_rows(_unit(), "vecs", dim=5)
    with pytest.raises(ArtifactError, match="2-d"):
        check_unit_rows(np.ones(3, dtype=np.float32), "vecs")
    v = _unit()
    v[3] *= 1.01
    with pytest.raises(ArtifactError, match=r"projected ads: 1 rows .*row 3 has norm 1\.01"):
        check_unit_rows(v, "projected ads")
    z = _unit()
    z[0] = 0.0
    with pytest.raises(ArtifactError, match=r"row 0 has norm 0\.000000"):
        check_unit_rows(z, "vecs")


def test_align_rows_maps_and_names_missing():
    """align_rows returns source rows for targets; missing ids are named in the error."""
    src = np.array(["a", "b", "c"])
    np.testing.assert_array_equal(align_rows(src, np.array(["c", "a", "c"]), "w"), [2, 0, 2])
    with pytest.raises(ArtifactError, match=r"catalog: 2 ids have no row \(e\.g\. zz, yy\)"):
        align_rows(src, np.array(["a", "zz", "yy"]), "catalog")


# ---------------------------------------------------------------- pseudonyms


def test_pseudonymize_is_truncated_hmac_sha256():
    """pseudonymize == hmac(key, id, sha256).hexdigest()[:32]."""
    key = b"secret-key"
    for raw in ["user-1", "ünïcødé", ""]:
        expected = hmac.new(key, raw.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
        assert pseudonymize(raw, key) == expected
        assert len(pseudonymize(raw, key)) == 32


def test_different_keys_give_different_pseudonyms():
    """The same id under two keys maps to unrelated pseudonyms; distinct ids differ too."""
    assert pseudonymize("user-1", b"k1") != pseudonymize("user-1", b"k2")
    assert pseudonymize("user-1", b"k1") != pseudonymize("user-2", b"k1")


@pytest.mark.parametrize("value", [None, "", "CHANGE-ME", "changeme", "short-key", pseudonyms.DEV_KEY])
def test_resolve_key_refuses_missing_placeholder_and_short_keys(monkeypatch, value):
    """Pseudonyms made with a guessable key are as linkable as raw ids: refuse, saying how to fix."""
    monkeypatch.delenv("ADREC_ALLOW_DEV_KEY", raising=False)
    if value is None:
        monkeypatch.delenv("ADREC_ID_KEY", raising=False)
    else:
        monkeypatch.setenv("ADREC_ID_KEY", value)
    with pytest.raises(InsecureKeyError, match=r"ADREC_ID_KEY.*openssl rand.*ADREC_ALLOW_DEV_KEY=1"):
        resolve_key()


def test_the_dev_flag_allows_the_public_dev_key_with_a_loud_warning(monkeypatch):
    monkeypatch.delenv("ADREC_ID_KEY", raising=False)
    monkeypatch.setenv("ADREC_ALLOW_DEV_KEY", "1")
    with pytest.warns(InsecureKeyWarning, match="ADREC_ID_KEY"):
        key = resolve_key()
    assert key == pseudonyms.DEV_KEY.encode()
    monkeypatch.setenv("ADREC_ID_KEY", "CHANGE-ME")
    with pytest.warns(InsecureKeyWarning, match="placeholder"):
        assert resolve_key() == pseudonyms.DEV_KEY.encode()  # never the placeholder itself


def test_resolve_key_from_env_or_argument_does_not_warn(monkeypatch):
    """A key in the environment (or passed explicitly) is used, without any warning."""
    monkeypatch.setenv("ADREC_ID_KEY", "from-env-0123456789")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_key() == b"from-env-0123456789"
        assert resolve_key("explicit-0123456789") == b"explicit-0123456789"


def test_key_fingerprints_tell_keys_apart_without_revealing_them():
    a, b = key_fingerprint(b"secret-a-0123456789"), key_fingerprint(b"secret-b-0123456789")
    assert a != b and a == key_fingerprint(b"secret-a-0123456789") and len(a) == 16
    assert "secret" not in a


def test_pseudonymize_many_consistent():
    """Repeated ids map to the same pseudonym, equal to pseudonymize() one by one."""
    key = b"k"
    raw = ["b", "a", "b", "c", "a", "b"]
    out = pseudonymize_many(raw, key)
    assert out.tolist() == [pseudonymize(r, key) for r in raw]
    assert out[0] == out[2] == out[5] and out[1] == out[4] and len(set(out.tolist())) == 3
    np.testing.assert_array_equal(pseudonymize_many(np.array(raw), key), out)
    assert pseudonymize_many([], key).shape == (0,)


def test_click_graph_rejects_malformed_csr():
    """Hand-built or tampered graphs: a bad indptr or a repeated (user, ad) pair is refused
    (a repeated pair would let the co-click sampler pair a user with itself)."""
    from adrec_assets.ml.types import ArtifactError, ClickGraph

    ids2 = np.array(["v", "u"])
    with pytest.raises(ArtifactError, match="indptr"):
        ClickGraph(ids2, np.array(["a"]), np.array([1, 1, 2]), np.array([0], np.int32), np.ones(1, np.float32))
    with pytest.raises(ArtifactError, match="each ad once"):
        ClickGraph(ids2, np.array(["a"]), np.array([0, 1, 3]), np.array([0, 0, 0], np.int32), np.ones(3, np.float32))
    # Same ad in two different users' rows is of course fine.
    ClickGraph(ids2, np.array(["a"]), np.array([0, 1, 2]), np.array([0, 0], np.int32), np.ones(2, np.float32))


def test_pseudonymize_many_keeps_ids_exactly():
    from adrec_assets.privacy import pseudonymize, pseudonymize_many

    key = b"k"
    out = pseudonymize_many(["a\x00", "a", "a\x00"], key)
    assert list(out) == [pseudonymize("a\x00", key), pseudonymize("a", key), pseudonymize("a\x00", key)]
    assert out[0] != out[1]


def test_isin_ids_matches_numpy_isin_on_id_columns():
    """The linear-time membership test used on ad ids (numpy's isin compares every pair of an
    object array: 101 s for 100k x 100k ids in the served_ads check) answers as np.isin does."""
    rng = np.random.default_rng(0)
    values = str_array([f"ad-{i}" for i in rng.integers(0, 500, 2_000)])
    members = str_array([f"ad-{i}" for i in rng.integers(0, 500, 300)])
    np.testing.assert_array_equal(isin_ids(values, members), np.isin(values, members))
    assert isin_ids(str_array([]), members).shape == (0,)
    assert not isin_ids(values, str_array([])).any()
    assert isin_ids(["a", "b"], ("b",)).tolist() == [False, True]
    assert isin_ids(np.arange(5), np.array([1, 3])).tolist() == [False, True, False, True, False]
