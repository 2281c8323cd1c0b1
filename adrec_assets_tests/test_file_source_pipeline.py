"""File sources through whole pipeline runs: materialized assets and checks, blocking checks
that stop a bad run, and failed runs that lose nothing. The readers themselves are tested
in ``test_file_sources.py``; this file reuses its source writers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from adrec_assets.ml.fields import CATEGORICAL, NUMERIC, FieldSpec
from adrec_assets.ml.training import project
from adrec_assets.ml.types import ContentEmbeddings
from adrec_assets.online.api import create_app
from adrec_assets.online.config import ServingConfig
from adrec_assets.online.service import RecommendationService
from adrec_assets.online.store import SQLiteStore
from adrec_assets.snapshots import SnapshotStore
from adrec_assets.sources.files import write_field_specs
from adrec_assets_tests.pipeline_fixtures import (
    ASSET_FILES,
    PIPELINE_CHECKS,
    failure_message,
    id_key,
    load_artifact,
    materialize_pipeline,
    published_files,
)
from adrec_assets_tests.test_file_sources import (
    AD_IDS,
    GOOD_ADS_CSV,
    N_USERS,
    _source_with_bad_images,
    write_clicks,
    write_valid_source,
)

# ---------------------------------------------------------------- pipeline runs on file sources

SHOP_FIELDS = {"category": ["running", "running", "finance", "finance", "food", "food"],
               "price": ["120", "95", "", "0", "12.5", "20"]}  # fmt: skip


def declare_shop_fields(folder: Path) -> None:
    """Give a source written by ``write_valid_source`` two declared ad fields."""
    ads = pd.read_csv(folder / "ads.csv", dtype=str, keep_default_na=False)
    pd.DataFrame({**ads, **SHOP_FIELDS}).to_csv(folder / "ads.csv", index=False)
    write_field_specs(folder, (FieldSpec("category", CATEGORICAL), FieldSpec("price", NUMERIC)))


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory, encoder):
    """Two file sources materialized end to end into one artifacts folder: "other" (with a good,
    a corrupt and a missing image) first, then "shop" (no images, two declared ad fields)."""
    root = tmp_path_factory.mktemp("sources")
    base = tmp_path_factory.mktemp("artifacts")
    _source_with_bad_images(root, "other")
    declare_shop_fields(write_valid_source(root, "shop"))
    with dg.instance_for_test() as instance:
        results = {}
        for partition in ("other", "shop"):
            results[partition] = materialize_pipeline(instance, base, partition=partition, root=str(root))
            assert results[partition].success
        yield {"root": root, "base": base, "instance": instance, "results": results}


def _copy(good_runs, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "sources"
    base = tmp_path / "artifacts"
    shutil.copytree(good_runs["root"], root, symlinks=True)
    shutil.copytree(good_runs["base"], base)
    return root, base


def _digests(base: Path) -> dict[str, str]:
    """Every file under the artifacts root (objects, manifests, pointers), by relative path."""
    return {
        str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _published(base: Path) -> dict[str, str]:
    """partition/asset -> digest of the object its published snapshot names."""
    return {
        f"{partition}/{asset}": hashlib.sha256(path.read_bytes()).hexdigest()
        for partition in ("other", "shop")
        for asset, path in published_files(base, partition).items()
    }


def test_good_file_sources_materialize_all_assets_and_checks(good_runs):
    base = good_runs["base"]
    for partition, result in good_runs["results"].items():
        events = result.get_asset_materialization_events()
        assert {e.materialization.asset_key.to_user_string() for e in events} == {*ASSET_FILES, "snapshot"}
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == len(PIPELINE_CHECKS) and all(e.passed for e in evaluations)
        meta = {
            e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        assert meta["click_graph"]["n_click_rows_read"].value == 40
        assert meta["click_graph"]["n_click_files"].value == 1
        assert meta["click_graph"]["n_clicks_dropped_unknown_ad"].value == 0
        assert meta["click_graph"]["n_users"].value == N_USERS
        assert meta["ad_embeddings_raw"]["n_ads"].value == 6
        graph = load_artifact(base, "click_graph", partition)
        assert graph.n_users == N_USERS and graph.n_clicks == 40 and graph.ad_ids.tolist() == AD_IDS
        assert not any(u.startswith("user-") for u in graph.user_ids)  # pseudonyms only
        assert load_artifact(base, "ad_projected", partition).ids.tolist() == AD_IDS
    # The corrupt and the missing image of "other" fell back to text and were counted.
    other = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in good_runs["results"]["other"].get_asset_materialization_events()
    }
    assert other["raw_ads"]["n_ads_with_image"].value == 3
    assert other["ad_embeddings_raw"]["n_ads_with_image"].value == 1
    assert other["ad_embeddings_raw"]["n_image_failures"].value == 2
    raw = load_artifact(base, "ad_embeddings_raw", "other")
    assert raw.has_image.tolist() == [True] + [False] * 5


def test_declared_ad_fields_reach_the_projector_and_every_projected_ad(good_runs):
    base = good_runs["base"]
    meta = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in good_runs["results"]["shop"].get_asset_materialization_events()}  # fmt: skip
    assert meta["projector"]["ad_fields"].value == "category (categorical, 3 columns), price (numeric, 11 columns)"
    projector = load_artifact(base, "projector", "shop")
    assert projector.model.fields.names == ("category", "price")
    catalog = load_artifact(base, "raw_ads", "shop")
    assert {name: cells.tolist() for name, cells in catalog.fields.cells.items()} == SHOP_FIELDS
    content = load_artifact(base, "ad_embeddings_raw", "shop").vectors
    projected = load_artifact(base, "ad_projected", "shop").vectors
    np.testing.assert_allclose(projected, project(projector.model, content, catalog.fields.cells), atol=1e-6)
    assert not np.allclose(projected, project(projector.model, content), atol=1e-3)  # the fields count
    assert load_artifact(base, "projector", "other").model.fields.width == 0  # declares none


def test_the_service_projects_a_new_ads_fields_and_refuses_undeclared_or_malformed_ones(good_runs, tmp_path, encoder):
    config = ServingConfig(source="shop", artifacts_root=good_runs["base"], sources_root=good_runs["root"], seed=7,
                           load_encoder=False)  # fmt: skip
    store_path = tmp_path / "online.sqlite"
    with id_key():
        service = RecommendationService(config, SQLiteStore(store_path, namespace="shop"))
        with TestClient(create_app(service)) as client:
            for fields, field in (({"colour": "red"}, "fields.colour"), ({"price": "cheap"}, "fields.price"),
                                  ({"category": True}, "fields.category")):  # fmt: skip
                response = client.post("/v1/ads", json={"ad_id": "ad-new", "text": "Racing flats", "fields": fields})
                assert response.status_code == 422 and response.json()["field"] == field, response.text
            assert service.online.live_ads() == []
            content = encoder.encode(["Carbon racing flats"], [None]).vectors[0]
            service.add_ad(
                "ad-new", "Carbon racing flats", None, content=content, fields={"category": "running", "price": 150}
            )
            info = client.get("/v1/ads/ad-new").json()
            assert info["fields"] == {"category": "running", "price": "150"} and info["live"]
            assert client.get("/v1/ads/ad-3").json()["fields"] == {"category": "finance", "price": "0"}
            state = service.state
            added = state.index.vectors(np.asarray([state.index.slot_of("ad-new")]))[0]
            model = state.projector.model
            cells = {"category": ["running"], "price": ["150"]}
            np.testing.assert_allclose(added[:-1], project(model, content[None], cells)[0], atol=1e-6)
            assert not np.allclose(added[:-1], project(model, content[None])[0], atol=1e-3)
        restarted = RecommendationService(config, SQLiteStore(store_path, namespace="shop"))
        with TestClient(create_app(restarted)):  # loads the snapshot and re-projects the live ads
            index = restarted.state.index
            np.testing.assert_allclose(index.vectors(np.asarray([index.slot_of("ad-new")]))[0], added, atol=1e-6)


def _nan_ad_embeddings(base: Path, partition: str) -> None:
    """Publish, unchecked, a snapshot whose ad_embeddings_raw has a NaN row (e.g. a hand edit)."""
    raw = load_artifact(base, "ad_embeddings_raw", partition)
    vectors = raw.vectors.copy()
    vectors[2, 5] = np.nan
    store = SnapshotStore(base, partition)
    store.stage("manual-copy", "ad_embeddings_raw", ContentEmbeddings(raw.ids, vectors, raw.encoder_id, raw.has_image))
    store.publish("manual-copy")


def test_nan_ad_embeddings_artifact_fails_the_blocking_check_and_stops_projector(good_runs, tmp_path):
    """A NaN row in a stored ad_embeddings_raw (e.g. a manual copy) fails the blocking check,
    so the projector downstream in the same run is not trained and its file stays as it was."""
    root, base = _copy(good_runs, tmp_path)
    _nan_ad_embeddings(base, "shop")
    before = _published(base)
    check_key = dg.AssetCheckKey(dg.AssetKey("ad_embeddings_raw"), "ad_embeddings_are_unit_768")
    result = materialize_pipeline(
        good_runs["instance"],
        base,
        partition="shop",
        selection=dg.AssetSelection.assets("projector") | dg.AssetSelection.checks(check_key),
        raise_on_error=False,
        root=str(root),
    )
    assert not result.success
    evaluations = result.get_asset_check_evaluations()
    assert [(e.check_name, e.passed) for e in evaluations] == [("ad_embeddings_are_unit_768", False)]
    assert evaluations[0].metadata["n_rows_with_nan_or_inf"].value == 1
    assert "ad_embeddings_are_unit_768" in failure_message(result)
    assert not result.get_asset_materialization_events()  # projector never ran
    assert _published(base) == before


def test_projector_alone_refuses_nan_ad_embeddings_and_keeps_previous_checkpoint(good_runs, tmp_path):
    root, base = _copy(good_runs, tmp_path)
    _nan_ad_embeddings(base, "shop")
    before = _published(base)
    result = materialize_pipeline(
        good_runs["instance"], base, partition="shop", selection=["projector"], raise_on_error=False, root=str(root)
    )
    assert _published(base) == before
    assert not result.success and "NaN" in failure_message(result)


def test_pipeline_run_on_a_source_without_usable_clicks_fails_naming_it(good_runs, tmp_path):
    root, base = _copy(good_runs, tmp_path)
    write_clicks(root / "shop", "user_id,ad_id\nu1,old-1\nu2,old-2\n")
    before = _published(base)
    result = materialize_pipeline(
        good_runs["instance"], base, partition="shop", selection=["click_graph"], raise_on_error=False, root=str(root)
    )
    assert not result.success
    assert "source 'shop': none of the 2 click rows" in failure_message(result)
    assert _published(base) == before


# ---------------------------------------------------------------- 14. a failed run loses nothing


def _break_with_duplicate_ad(root: Path) -> tuple[str, ...]:
    (root / "shop" / "ads.csv").write_text(GOOD_ADS_CSV + "ad-2,A second ad-2\n")
    (root / "shop" / "ad_fields.json").unlink()  # the new ads file has no field columns
    return ("source 'shop'", "ads.csv", "ad_id 'ad-2' appears on lines 4 and 8")


def _break_with_bad_weight_file(root: Path) -> tuple[str, ...]:
    (root / "shop" / "clicks" / "part-001.csv").write_text(
        "user_id,ad_id,timestamp,weight\nuser-00,ad-5,1700000100,1\nuser-01,ad-0,1700000101,abc\n"
    )
    return ("source 'shop'", "part-001.csv", "line 3 has weight='abc'")


@pytest.mark.parametrize("breakage", [_break_with_duplicate_ad, _break_with_bad_weight_file], ids=["ads", "clicks"])
def test_failed_run_leaves_every_artifact_byte_for_byte(good_runs, tmp_path, breakage):
    """A drop that changes the ads and also carries a bad file: the run fails, and readers see
    exactly the previous snapshot (before, the ads side was already replaced at this point)."""
    root, base = _copy(good_runs, tmp_path)
    before, files_before = _published(base), _digests(base)
    assert len(before) == 2 * len(ASSET_FILES)  # shop and other, every artifact of each
    snapshot_before = SnapshotStore(base, "shop").current_id()
    expected = breakage(root)
    result = materialize_pipeline(good_runs["instance"], base, partition="shop", raise_on_error=False, root=str(root))
    assert not result.success
    message = failure_message(result)
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert SnapshotStore(base, "shop").current_id() == snapshot_before
    assert _published(base) == before  # both partitions, byte for byte
    materialized = {e.materialization.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    if breakage is _break_with_duplicate_ad:
        # raw_ads fails, so nothing downstream of it runs; position_bias reads only the served
        # event log, so it is staged, yet never published.
        assert materialized == {"position_bias"}
    else:
        assert "snapshot" not in materialized and "click_graph" not in materialized
    # What the failed run staged is garbage once no run is going: gc leaves exactly the old files.
    SnapshotStore(base, "shop").gc(grace_seconds=0)
    assert _digests(base) == files_before
    assert not [p for p in base.rglob("*") if ".tmp" in p.name]
