"""The `evaluation` asset on the synthetic partition, and the popularity bias in serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adrec_assets.ml.evaluation import METHOD_ORDER, PIPELINE, EvaluationReport
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.training import score_bias
from adrec_assets.recommender import Recommender
from adrec_assets_tests.pipeline_fixtures import load_artifact, materialize_pipeline, published_files

# The synthetic catalog holds 200 clicked ads, so 40 are cold: at the default k=20 a random
# ranking already recalls half of them. k=5 leaves room to tell a model from chance.
K = 5
# The warm reference retrains a second time; the protocol's unit tests (test_evaluation.py)
# cover it, so the asset runs without it here and the suite saves a full retrain.
CONFIG = {"k": K, "warm_reference": False}


@pytest.fixture(scope="module")
def evaluation_run(default_pipeline):
    """Materialize only `evaluation` on top of the session's default pipeline artifacts."""
    base, _, instance = default_pipeline
    result = materialize_pipeline(
        instance, base, selection=["evaluation"], run_config={"ops": {"evaluation": {"config": CONFIG}}}
    )
    return base, result


def test_evaluation_materializes_with_the_full_table(evaluation_run):
    base, result = evaluation_run
    assert result.success
    (event,) = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    table = meta["results"].value
    for label in (
        "random",
        "content-kNN",
        "ridge content -> user space",
        "ALS item factors",
        "global-mean",
        "**pipeline**",
    ):
        assert label in table, label
    assert "warm reference" not in table  # switched off by the config
    assert table.count("\n") == 1 + len(METHOD_ORDER) - 2  # header rule; no warm reference, no ad fields declared
    assert meta["plot"].value.startswith("![cold-start evaluation](data:image/png;base64,")
    for method in (m for m in METHOD_ORDER if m not in ("warm_reference", "ridge_als_fields")):  # the UI plots these
        assert 0.0 <= meta[f"{method}_recall_at_{K}"].value <= 1.0
        assert 0.0 <= meta[f"{method}_ndcg_at_{K}"].value <= 1.0
        assert 0.0 <= meta[f"{method}_auc"].value <= 1.0
    ratio = meta[f"{PIPELINE}_recall_at_{K}"].value / meta[f"ridge_als_recall_at_{K}"].value
    assert meta["pipeline_vs_ridge_als"].value == pytest.approx(ratio, rel=1e-3)  # the headline
    assert meta["pipeline_vs_ridge_als_min_seed"].value == pytest.approx(ratio, rel=1e-3)  # one seed
    assert meta["ridge_als_baseline"].value == "ridge_als"
    assert meta["headline"].value.startswith(f"pipeline / ridge_als Recall@{K} = {ratio:.3f} over seeds [0]")
    settings = meta["settings"].value
    assert settings["evaluation"]["cold_share"] == 0.2
    assert settings["evaluation"]["k"] == K and settings["evaluation"]["warm_reference"] is False
    report = load_artifact(base, "evaluation")
    assert isinstance(report, EvaluationReport)
    assert report.results[PIPELINE].recall == pytest.approx(meta[f"{PIPELINE}_recall_at_{K}"].value, abs=1e-5)


def test_evaluation_uses_the_partitions_training_settings(evaluation_run):
    """The retraining inside the evaluation uses what user_embeddings/projector/served_users were run with."""
    base, result = evaluation_run
    settings = json.loads(load_artifact(base, "evaluation").settings)
    stored_users = load_artifact(base, "user_embeddings").provenance.params
    stored_projector = load_artifact(base, "projector").provenance.params
    assert settings["user"] == stored_users
    assert settings["projector"] == stored_projector
    assert settings["refit"] == load_artifact(base, "served_users").provenance.params


def test_pipeline_beats_the_baselines_on_synthetic(evaluation_run):
    """Synthetic archetypes are content categories: the pipeline must beat random and the
    non-personalized baseline by a wide margin (a broken projector would not)."""
    base, _ = evaluation_run
    report = load_artifact(base, "evaluation")
    r = report.results
    assert report.k == K and r["random"].n_cold_ads > 4 * K  # recall is not saturated by construction
    assert r[PIPELINE].recall > 2 * r["random"].recall
    assert r[PIPELINE].recall > r["global_mean"].recall + 0.1
    assert r[PIPELINE].auc > 0.75


def test_ad_projected_carries_the_projectors_popularity_bias(default_pipeline):
    base, _, _ = default_pipeline
    projected = load_artifact(base, "ad_projected")
    served = load_artifact(base, "served_ads")
    raw = load_artifact(base, "ad_embeddings_raw")
    trained = TrainedProjector.from_checkpoint(torch.load(published_files(base)["projector"], weights_only=True))
    np.testing.assert_allclose(projected.score_bias, score_bias(trained.model, raw.vectors), atol=1e-6)
    # serving adds the served ads' score term: a zero user vector ranks purely by it
    user = np.zeros(projected.dim, dtype=np.float32)
    top = Recommender.load(base, "synthetic").recommend(user, k=3)
    assert [r.ad_id for r in top] == list(served.ids[np.argsort(-served.score_bias, kind="stable")[:3]])


def test_evaluation_runs_the_warm_protocol_with_its_headline_per_seed(evaluation_run):
    """Beside the cold table: the warm table (popularity, tuned EASE and ALS, the pipeline with
    and without the ad refit), its headline against the best tuned baseline, and the grid."""
    base, result = evaluation_run
    meta = next(e.materialization.metadata for e in result.get_asset_materialization_events())
    report = load_artifact(base, "evaluation")
    warm = {name: values[0, 0] for name, values in report.warm_per_seed.items()}
    assert set(warm) == {"random", "popularity", "ease", "als", "pipeline_projection_only", PIPELINE}
    best = max(warm["popularity"], warm["ease"], warm["als"])
    assert meta["pipeline_vs_best_warm_baseline"].value == pytest.approx(warm[PIPELINE] / best, rel=1e-3)
    assert meta["best_warm_baseline"].value in ("popularity", "ease", "als")
    assert meta[f"warm_{PIPELINE}_recall_at_{K}"].value == pytest.approx(warm[PIPELINE], abs=1e-5)
    assert warm[PIPELINE] > 2 * warm["random"]  # archetypes are learnable from clicks
    assert "**pipeline** (served users x served ads)" in meta["warm_results"].value
    settings = meta["warm_settings"].value
    assert settings[0]["seed"] == 0 and len(settings[0]["grid"]["als"]) == 27 and settings[0]["tuned"]["ease"]
    assert json.loads(report.settings)["ad_refit"] == json.loads(load_artifact(base, "served_ads").refit_params)
