"""Reuse when nothing changed: the served model and the ad index of the previous snapshot are
taken as they are when the content hash of their inputs and settings is unchanged, and
rebuilt when one input changes (issue 30). Fingerprints unit-tested; the paths end to end on
a toy file source through real materializations, with the IVF index."""

from __future__ import annotations

from dataclasses import replace

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from adrec_assets.assets.ad_index import AdIndexConfig, index_inputs_fingerprint
from adrec_assets.assets.served_model import served_inputs_fingerprint
from adrec_assets.ml.params import AdRefitParams, UserRefitParams
from adrec_assets.ml.refresh import REUSED
from adrec_assets.ml.types import FULL_RETRAIN, ClickGraph, ProjectedAds, TrainingProvenance, UserEmbeddings
from adrec_assets.snapshots import SnapshotStore
from adrec_assets_tests.pipeline_fixtures import materialize_pipeline
from adrec_assets_tests.test_file_sources import write_valid_source


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def projected_ads(n: int = 50, seed: int = 0) -> ProjectedAds:
    rng = np.random.default_rng(seed)
    return ProjectedAds(
        np.asarray([f"ad-{i}" for i in range(n)]), unit(rng.standard_normal((n, 8))), "users:abc", "enc-1",
        rng.normal(0, 0.1, n).astype(np.float32),
    )  # fmt: skip


def test_the_index_fingerprint_sees_every_input_and_setting_but_not_the_user_samples():
    ads, config = projected_ads(), AdIndexConfig()
    same = index_inputs_fingerprint(projected_ads(), AdIndexConfig(recall_users=7, reuse=False))
    assert index_inputs_fingerprint(ads, config) == same  # equal content, another object: equal hash
    vectors = ads.vectors.copy()
    vectors[17, 3] = np.nextafter(vectors[17, 3], np.float32(2))  # one float32 step in one ad
    bias = ads.score_bias.copy()
    bias[0] += np.float32(1e-3)
    ids = ads.ids.copy()
    ids[5] = "ad-other"
    changed = [
        replace(ads, vectors=vectors),
        replace(ads, score_bias=bias),
        replace(ads, ids=ids),
        replace(ads, space="users:def"),
        replace(ads, encoder_id="enc-2"),
    ]
    hashes = {index_inputs_fingerprint(a, config) for a in changed}
    settings = [AdIndexConfig(ann="hnsw"), AdIndexConfig(ivf_nlist=8), AdIndexConfig(seed=1),
                AdIndexConfig(exact_max_ads=10), AdIndexConfig(ef_search=64)]  # fmt: skip
    hashes |= {index_inputs_fingerprint(ads, c) for c in settings}
    assert len(hashes) == len(changed) + len(settings) and index_inputs_fingerprint(ads, config) not in hashes


def test_the_served_model_fingerprint_sees_clicks_users_ads_and_settings():
    graph = ClickGraph(np.asarray(["u1", "u2"]), np.asarray(["ad-0", "ad-1"]), np.asarray([0, 2, 3]),
                       np.asarray([0, 1, 1], np.int32), np.asarray([1, 1, 2], np.float32))  # fmt: skip
    rng = np.random.default_rng(1)
    users = UserEmbeddings(np.asarray(["u1", "u2"]), unit(rng.standard_normal((2, 8))), "users:abc",
                           np.zeros(2, bool), TrainingProvenance({}, "x", FULL_RETRAIN))  # fmt: skip
    ads = projected_ads(2)
    user_params, ad_params = UserRefitParams(), AdRefitParams()
    base = served_inputs_fingerprint(graph, users, ads, user_params, ad_params)
    assert served_inputs_fingerprint(graph, replace(users), replace(ads), user_params, ad_params) == base
    more_clicks = replace(graph, weights=np.asarray([1, 1, 3], np.float32))
    moved = users.vectors.copy()
    moved[1, 0] = np.nextafter(moved[1, 0], np.float32(2))
    ad_moved = ads.vectors.copy()
    ad_moved[0, 7] = np.nextafter(ad_moved[0, 7], np.float32(2))
    variants = [
        served_inputs_fingerprint(more_clicks, users, ads, user_params, ad_params),
        served_inputs_fingerprint(graph, replace(users, vectors=moved), ads, user_params, ad_params),
        served_inputs_fingerprint(
            graph, replace(users, isolated=np.asarray([True, False])), ads, user_params, ad_params
        ),  # fmt: skip
        served_inputs_fingerprint(graph, users, replace(ads, vectors=ad_moved), user_params, ad_params),
        served_inputs_fingerprint(graph, users, replace(ads, score_bias=ads.score_bias + 1), user_params, ad_params),
        served_inputs_fingerprint(
            graph, users, ads, replace(user_params, regularization=user_params.regularization * 2), ad_params
        ),
        served_inputs_fingerprint(
            graph, users, ads, user_params, replace(ad_params, regularization=ad_params.regularization * 2)
        ),
    ]
    assert len(set(variants)) == len(variants) and base not in variants


# ---------------------------------------------------------------------- end to end
CONFIG = {
    "ops": {
        "user_embeddings": {"config": {"min_steps": 0}},
        "projector": {"config": {"min_steps": 0}},
        "ad_index": {"config": {"exact_max_ads": 0}},  # the IVF kind even for 6 ads
    }
}


def meta(result: dg.ExecuteInJobResult, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture
def shop(tmp_path):
    root, base = tmp_path / "sources", tmp_path / "artifacts"
    write_valid_source(root, "shop")
    with dg.instance_for_test() as instance:

        def run() -> dg.ExecuteInJobResult:
            return materialize_pipeline(instance, base, partition="shop", run_config=CONFIG, root=str(root))

        yield root, base, run


def test_an_unchanged_refresh_reuses_the_served_model_and_the_index_and_a_changed_ad_rebuilds_them(shop, monkeypatch):
    root, base, run = shop
    first = run()
    assert meta(first, "served_users")["fit_path"] == "fitted" and meta(first, "served_ads")["fit_path"] == "fitted"
    assert meta(first, "ad_index")["index_path"] == "built" and meta(first, "ad_index")["kind"] == "ivf"
    store = SnapshotStore(base, "shop")
    before = store.current()

    # nothing changed: neither the fit nor the build may run (they would raise)
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr("adrec_assets.assets.served_model.fit_served_model", forbidden)
        patch.setattr("adrec_assets.online.index.faiss.AdIndex.build", forbidden)
        second = run()
    for asset in ("served_users", "served_ads"):
        assert meta(second, asset)["fit_path"] == REUSED
    assert meta(second, "ad_index")["index_path"] == "reused"
    after = store.current()
    assert {a: after.artifacts[a] for a in ("served_users", "served_ads", "ad_index")} == {
        a: before.artifacts[a] for a in ("served_users", "served_ads", "ad_index")
    }  # the same content-addressed objects
    assert after.id == before.id  # and so the same snapshot: nothing to reload

    # one ad's text changes: its projection (and so the served ads) change; everything is rebuilt
    ads_csv = root / "shop" / "ads.csv"
    ads = pd.read_csv(ads_csv)
    ads.loc[2, "text"] = "Open a stocks and shares ISA and invest from 1 pound, with no fees for a year."
    ads.to_csv(ads_csv, index=False)
    third = run()
    assert meta(third, "served_users")["fit_path"] == "fitted" and meta(third, "served_ads")["fit_path"] == "fitted"
    assert meta(third, "ad_index")["index_path"] == "built"
    assert meta(third, "ad_index")["index_path_reason"] == "the ads or the build settings changed"
    changed = store.current()
    assert changed.id != before.id and changed.artifacts["ad_index"] != before.artifacts["ad_index"]
