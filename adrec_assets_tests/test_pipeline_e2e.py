"""End to end: the whole pipeline materializes and publishes for the synthetic source with the defaults."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from adrec_assets.privacy import pseudonymize
from adrec_assets.snapshots import SnapshotStore
from adrec_assets.sources.catalog import load_builtin_catalog
from adrec_assets_tests.pipeline_fixtures import (
    ASSET_FILES,
    TEST_ID_KEY,
    failure_message,
    load_artifact,
    materialize_pipeline,
    published_files,
)

load = load_artifact


@pytest.fixture(scope="module")
def pipeline(default_pipeline):
    return default_pipeline


def test_all_assets_and_checks_succeed(pipeline):
    base, result, _ = pipeline
    assert result.success
    materialized = {e.materialization.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {*ASSET_FILES, "snapshot"}
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 12 and all(e.passed for e in evaluations)
    files = published_files(base)
    assert set(files) == set(ASSET_FILES)  # one snapshot holds every artifact of the run
    for asset, ext in ASSET_FILES.items():
        assert files[asset].is_file() and files[asset].suffix == f".{ext}", asset


def test_cli_summary_describes_every_published_artifact(pipeline, tmp_path, monkeypatch, capsys):
    """``make run`` ends with ``cli summary``: one line per artifact of the published
    snapshot, described by its type (an index by its kind and recall, not a crash)."""
    from adrec_assets import cli

    base, _, _ = pipeline
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # an empty instance: no timings, same lines
    monkeypatch.setenv("ADREC_ARTIFACTS_DIR", str(base))
    assert cli.main(["summary", "synthetic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    described = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()[0] in ASSET_FILES}
    assert set(described) == set(ASSET_FILES)
    assert "flat index of 220 ads, dim 128+1, recall@10 1.0000" in described["ad_index"]
    assert "theta [1.000" in described["position_bias"]
    assert "Thompson posterior from" in described["policy_posterior"]
    assert "vectors (220, 128)" in described["ad_projected"]


def test_artifact_shapes_norms_and_alignment(pipeline):
    base, _, _ = pipeline
    ads = load(base, "raw_ads")
    graph = load(base, "click_graph")
    raw = load(base, "ad_embeddings_raw")
    users = load(base, "user_embeddings")
    prior = load(base, "global_mean")
    projected = load(base, "ad_projected")
    assert raw.vectors.shape == (len(ads), 768) and raw.vectors.dtype == np.float32
    assert users.vectors.shape == (graph.n_users, 128)
    assert prior.vector.shape == (128,)
    assert projected.vectors.shape == (len(ads), 128)
    for vectors in (raw.vectors, users.vectors, projected.vectors, prior.vector[None]):
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # Every ad gets a projection, including the ones nobody clicked.
    assert (projected.ids == ads.ad_ids).all() and (raw.ids == ads.ad_ids).all()
    assert graph.n_ads < len(ads)
    assert (users.ids == graph.user_ids).all()
    assert raw.encoder_id == projected.encoder_id != ""
    assert projected.space == users.space


def test_served_users_and_ads_are_the_served_model_fitted_to_the_clicks_and_the_prior_averages_them(pipeline):
    base, result, _ = pipeline
    from adrec_assets.ml.params import AdRefitParams, UserRefitParams
    from adrec_assets.ml.served_model import fit_served_model
    from adrec_assets.ml.training import normalized_mean
    from adrec_assets.recommender import Recommender

    graph, users, projected = load(base, "click_graph"), load(base, "user_embeddings"), load(base, "ad_projected")
    served, served_ads = load(base, "served_users"), load(base, "served_ads")
    assert (
        (served.ids == users.ids).all()
        and served.space == users.space
        and served.provenance.params == {"alpha": 5.0, "regularization": 10.0, "mix": 1.0}
    )
    assert json.loads(served_ads.refit_params) == asdict(AdRefitParams())
    rows = [list(projected.ids).index(ad) for ad in graph.ad_ids]
    expected = fit_served_model(graph, users.vectors, projected.vectors[rows], projected.score_bias[rows],
                                UserRefitParams(), AdRefitParams())  # fmt: skip
    np.testing.assert_allclose(served.vectors, expected.users, atol=1e-6)
    np.testing.assert_allclose(served_ads.vectors[rows], expected.ads.vectors, atol=1e-5)
    cold = np.setdiff1d(np.arange(len(projected)), rows)  # ads nobody clicked: served exactly as projected
    assert len(cold) and (served_ads.vectors[cold] == projected.vectors[cold]).all()
    assert (served_ads.score_bias[cold] == projected.score_bias[cold]).all()
    moved = np.einsum("ij,ij->i", served.vectors, users.vectors)
    metadata = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                    if e.materialization.asset_key.to_user_string() == "served_users")  # fmt: skip
    assert moved.max() < 0.9999 and metadata["n_users_refitted"].value == graph.n_users
    np.testing.assert_allclose(load(base, "global_mean").vector, normalized_mean(served.vectors)[0], atol=1e-6)
    recommender = Recommender.load(base, "synthetic")  # what `cli recommend` (and the service) rank with
    np.testing.assert_array_equal(recommender.user_vector(served.ids[3])[0], served.vectors[3])
    np.testing.assert_allclose(recommender.scores(served.ids[3]), served_ads.vectors @ served.vectors[3] + served_ads.score_bias,
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_projector_checkpoint_loads_weights_only_and_reproduces_ad_projected(pipeline):
    base, _, _ = pipeline
    checkpoint = torch.load(published_files(base)["projector"], weights_only=True)
    from adrec_assets.ml.models import TrainedProjector
    from adrec_assets.ml.training import project

    trained = TrainedProjector.from_checkpoint(checkpoint)
    raw = load(base, "ad_embeddings_raw")
    np.testing.assert_allclose(project(trained.model, raw.vectors), load(base, "ad_projected").vectors, atol=1e-6)


def test_ui_metadata_is_recorded(pipeline):
    _, result, _ = pipeline
    meta = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert meta["ad_embeddings_raw"]["encoder_id"].value.startswith("offline:")
    assert meta["ad_embeddings_raw"]["n_ads"].value == 220
    assert meta["ad_embeddings_raw"]["n_ads_with_image"].value == 60
    for trained in ("user_embeddings", "projector"):
        assert "| epoch | mean loss |" in meta[trained]["loss_curve"].value
        assert meta[trained]["optimizer_steps"].value > 0
        assert meta[trained]["train_seconds"].value > 0
    assert 0.0 <= meta["user_embeddings"]["share_isolated_users"].value < 0.2
    assert meta["click_graph"]["n_users"].value == 1000


def test_privacy_no_raw_user_ids_and_no_ad_text_outside_raw_ads(pipeline):
    base, _, _ = pipeline
    catalog = load_builtin_catalog().catalog
    raw_user_prefix = "user-000"  # every synthetic raw id starts like this
    texts = [t[:40] for t in catalog.texts]
    files = published_files(base)
    everything = [p for p in base.rglob("*") if p.is_file()]  # manifests and pointers too
    assert set(files.values()) <= set(everything)
    for path in everything:
        blob = path.read_bytes()
        for encoding in ("utf-8", "utf-32-le"):  # artifacts store UTF-8 (older ones: numpy's UTF-32)
            assert raw_user_prefix.encode(encoding) not in blob, path
            if path != files["raw_ads"]:
                assert not any(t.encode(encoding) in blob for t in texts), path
    # Sanity check of the scan itself: raw_ads does hold the ad text.
    assert texts[0].encode("utf-8") in files["raw_ads"].read_bytes()
    graph = load(base, "click_graph")
    # The operator who holds the key finds a user's row by recomputing the pseudonym.
    assert pseudonymize("user-0000001", TEST_ID_KEY.encode()) in set(graph.user_ids)


#: Determinism does not depend on the step count: two short runs check it at a fraction of
#: the cost of repeating the default materialization.
SHORT_TRAINING = {"ops": {op: {"config": {"min_steps": 200}} for op in ("user_embeddings", "projector")}}


def test_same_inputs_and_config_give_identical_artifacts(tmp_path):
    base = tmp_path / "first"
    for target in (base, tmp_path):
        with dg.instance_for_test() as instance:  # fresh instances: no previous run to reuse
            assert materialize_pipeline(instance, target, run_config=SHORT_TRAINING).success
    for asset in ("click_graph", "ad_embeddings_raw", "user_embeddings", "projector", "ad_projected"):
        if asset == "projector":
            a = torch.load(published_files(base)[asset], weights_only=True)["state_dict"]
            b = torch.load(published_files(tmp_path)[asset], weights_only=True)["state_dict"]
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            first, second = load(base, asset), load(tmp_path, asset)
            for key, array in first.to_arrays().items():
                np.testing.assert_array_equal(array, second.to_arrays()[key], err_msg=f"{asset}.{key}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_training_keeps_previous_artifact_byte_for_byte(pipeline, tmp_path):
    """A diverging run (absurd learning rate -> NaN) fails and publishes nothing."""
    base, _, instance = pipeline
    store = SnapshotStore(base, "synthetic")
    published = store.current_id()
    target = published_files(base)["user_embeddings"]
    before = _digest(target)
    result = materialize_pipeline(
        instance,
        base,
        selection=["user_embeddings"],
        run_config={"ops": {"user_embeddings": {"config": {"lr": 1e30, "epochs": 3, "min_steps": 0}}}},
        raise_on_error=False,
    )
    assert not result.success
    message = failure_message(result)
    assert "user_embeddings[synthetic]" in message
    assert "NaN" in message or "not unit length" in message
    assert store.current_id() == published and _digest(target) == before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no torn temp files


def test_ad_projected_refuses_vectors_from_another_encoder(pipeline, tmp_path):
    """Re-encoding ads with a different encoder must not silently feed an old projector."""
    import shutil

    from adrec_assets.ml.types import ContentEmbeddings

    base, _, instance = pipeline
    work = tmp_path / "artifacts"
    shutil.copytree(base, work)
    raw = load(work, "ad_embeddings_raw")
    swapped = ContentEmbeddings(raw.ids, raw.vectors, encoder_id="other-encoder:v9", has_image=raw.has_image)
    store = SnapshotStore(work, "synthetic")
    store.stage("manual-copy", "ad_embeddings_raw", swapped)  # e.g. an operator's hand edit, published unchecked
    store.publish("manual-copy")
    before = _digest(published_files(work)["ad_projected"])
    result = materialize_pipeline(instance, work, selection=["ad_projected"], raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "other-encoder:v9" in message and "re-materialize projector" in message
    assert _digest(published_files(work)["ad_projected"]) == before
