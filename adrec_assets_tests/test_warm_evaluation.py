"""The warm protocol: the split, the tuned baselines, the report's warm table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adrec_assets.ml.evaluation import EvaluationReport, MethodResult, combine_seeds
from adrec_assets.ml.types import ClickGraph
from adrec_assets.ml.warm_evaluation import (
    WARM_PIPELINE,
    WarmParams,
    ease_scorer,
    evaluate_warm,
    holdout_split,
)


def block_graph(n_users: int = 120, n_ads: int = 60, groups: int = 4, p: float = 0.35, seed: int = 0) -> ClickGraph:
    """Users and ads in ``groups`` blocks; a user clicks ads of their own block only."""
    rng = np.random.default_rng(seed)
    user_group, ad_group = np.arange(n_users) % groups, np.arange(n_ads) % groups
    clicks = (user_group[:, None] == ad_group[None, :]) & (rng.random((n_users, n_ads)) < p)
    clicks[np.arange(n_users), np.arange(n_users) % groups] = True  # everyone clicks at least one ad
    users, ads = np.nonzero(clicks)
    return ClickGraph.from_codes(np.array([f"u{i:04d}" for i in range(n_users)]), users,
                                 np.array([f"a{i:04d}" for i in range(n_ads)]), ads)  # fmt: skip


def test_holdout_keeps_every_ad_and_user_in_training_and_holds_out_about_the_share():
    graph = block_graph()
    split = holdout_split(graph, 0.3, np.random.default_rng(1))
    assert (split.train.ad_degrees() > 0).all()  # every held-out click is on an ad that keeps others
    assert (np.diff(split.train.indptr) > 0).all()  # no user loses every click
    assert split.train.n_clicks + len(split.test_users) == graph.n_clicks
    assert 0.22 < len(split.test_users) / graph.n_clicks < 0.35  # 0.3 drawn (sd 0.017), a few released
    pairs = set(zip(split.test_users.tolist(), split.test_ads.tolist()))
    train_pairs = set(zip(split.train.click_users().tolist(), split.train.indices.tolist()))
    assert not pairs & train_pairs and len(pairs) == len(split.test_users)
    with pytest.raises(ValueError, match="holdout share"):
        holdout_split(graph, 1.0, np.random.default_rng(0))


def test_ease_scorer_is_the_closed_form():
    graph = block_graph(n_users=30, n_ads=12, seed=2)
    x = np.zeros((graph.n_users, graph.n_ads))
    x[graph.click_users(), graph.indices] = 1.0
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(graph.n_ads))
    b = np.eye(graph.n_ads) - p / np.diag(p)[None, :]
    scores = ease_scorer(graph, 5.0, graph.n_ads + 3)(np.arange(4))
    np.testing.assert_allclose(scores[:, : graph.n_ads], x[:4] @ b, atol=1e-9)
    assert np.isneginf(scores[:, graph.n_ads :]).all()  # catalogue ads without clicks: no EASE score


def test_warm_protocol_ranks_a_perfect_scorer_first_and_random_last():
    graph = block_graph()
    group = np.arange(graph.n_users) % 4
    user_group = np.array([int(u[1:]) % 4 for u in graph.user_ids])
    ad_group = np.array([int(a[1:]) % 4 for a in graph.ad_ids])
    assert (group == user_group).all()

    def pipeline(train: ClickGraph) -> dict:
        same_block = lambda rows: (user_group[rows][:, None] == ad_group[None, :]).astype(float)  # noqa: E731
        return {WARM_PIPELINE: same_block, "pipeline_projection_only": same_block}

    params = WarmParams(seed=3, k=10, als_factors=(4,), als_regularization=(0.1,), als_alpha=(1.0,), ease_l2=(10.0,))
    report = evaluate_warm(graph, graph.n_ads, pipeline, params)
    recall = {name: r[0] for name, r in report.results.items()}
    assert recall[WARM_PIPELINE] > recall["popularity"] and recall[WARM_PIPELINE] > 2 * recall["random"]
    assert recall["ease"] > recall["random"] and recall["als"] > recall["random"]
    assert report.tuned["ease"] == "10.0" and report.grid["als"]
    assert report.best_baseline()[0] in ("popularity", "ease", "als")
    assert report.headline() == pytest.approx(recall[WARM_PIPELINE] / report.best_baseline()[1])


def test_the_evaluation_report_stores_and_combines_the_warm_table():
    def one(seed: int, pipeline: float) -> EvaluationReport:
        report = EvaluationReport(k=20, results={"pipeline": MethodResult(0.2, 0.3, 0.8, 10, 5)}, seeds=[seed],
                                  per_seed={"pipeline": np.array([[0.2, 0.3, 0.8]])})  # fmt: skip
        report.warm_per_seed = {
            "ease": np.array([[0.25, 0.3]]),
            "als": np.array([[0.24, 0.3]]),
            "popularity": np.array([[0.1, 0.1]]),
            WARM_PIPELINE: np.array([[pipeline, 0.35]]),
        }
        report.warm_settings = json.dumps([{"seed": seed}])
        return report

    combined = combine_seeds([one(0, 0.26), one(1, 0.24)])
    back = EvaluationReport.from_arrays(combined.to_arrays())
    np.testing.assert_allclose(back.warm_per_seed[WARM_PIPELINE], [[0.26, 0.35], [0.24, 0.35]])
    ratio, per_seed, best = back.warm_headline()
    assert best == "ease" and ratio == pytest.approx(0.25 / 0.25)
    np.testing.assert_allclose(per_seed, [0.26 / 0.25, 0.24 / 0.25])
    assert json.loads(back.warm_settings) == [{"seed": 0}, {"seed": 1}]
    assert "| **pipeline** (served users x served ads) | 0.2500 ± 0.0100" in back.warm_markdown()
    empty = EvaluationReport.from_arrays(EvaluationReport(k=5, seeds=[0]).to_arrays())
    assert empty.warm_per_seed == {}
