"""Tests for the cold-start protocol (adrec_assets.ml.evaluation): the split and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adrec_assets.ml.als import AlsParams, fit_als
from adrec_assets.ml.evaluation import (
    METHOD_ORDER,
    PIPELINE,
    EvaluationError,
    EvaluationParams,
    EvaluationReport,
    MethodResult,
    cold_split,
    combine_seeds,
    compare_refresh,
    content_knn_scores,
    evaluate_cold_start,
    ridge_als_scores,
    warm_split,
)
from adrec_assets.ml.linear import ridge_fit
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.ml.types import ClickGraph

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def power_law_graph(n_users: int = 300, n_ads: int = 200, clicks: int = 3000, seed: int = 0) -> ClickGraph:
    """Random clicks with Zipf-like ad popularity (so strata really differ)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_ads + 1) ** 0.9
    ads = rng.choice(n_ads, size=clicks, p=popularity / popularity.sum())
    users = rng.integers(0, n_users, size=clicks)
    return ClickGraph.from_pairs(np.array([f"u{u:04d}" for u in users]), np.array([f"ad{a:04d}" for a in ads]))


def community_graph(cluster: np.ndarray, n_users: int, per_user: int, rng: np.random.Generator) -> ClickGraph:
    """User u clicks ``per_user`` random ads of content cluster ``u % 2`` (ids u000 / ad000)."""
    users, ads = [], []
    for u in range(n_users):
        for a in rng.choice(np.flatnonzero(cluster == u % 2), size=per_user, replace=False):
            users.append(f"u{u:03d}")
            ads.append(f"ad{a:03d}")
    return ClickGraph.from_pairs(np.array(users), np.array(ads))


def click_set(graph: ClickGraph) -> set[tuple[str, str]]:
    return set(zip(graph.user_ids[graph.click_users()], graph.ad_ids[graph.indices]))


def test_cold_split_removes_every_cold_click_and_keeps_all_others():
    graph = power_law_graph()
    split = cold_split(graph, EvaluationParams(seed=0))
    assert (split.train.user_ids == graph.user_ids).all() and (split.train.ad_ids == graph.ad_ids).all()
    # no leak: not one training click lands on a cold ad
    assert split.train.ad_degrees()[split.cold_ads].sum() == 0
    # every click is either in training or a held-out target, never both, never lost
    held_out = {
        (graph.user_ids[split.eval_users[r]], graph.ad_ids[split.cold_ads[c]])
        for r, c in zip(*np.nonzero(split.relevant))
    }
    train = click_set(split.train)
    assert not (train & held_out)
    assert train | held_out == click_set(graph)
    assert not split.seen.any()
    # each evaluated user has at least one target
    assert split.relevant.any(axis=1).all()


def test_cold_split_is_stratified_seeded_and_sized():
    """~20% of clicked ads, drawn from every popularity decile (not just the tail)."""
    graph = power_law_graph()
    clicked = np.flatnonzero(graph.ad_degrees() > 0)
    split = cold_split(graph, EvaluationParams(seed=0))
    assert len(split.cold_ads) == pytest.approx(0.2 * len(clicked), abs=len(clicked) * 0.03)
    degree = graph.ad_degrees()
    # the most popular decile contributes its share
    top_decile = clicked[np.argsort(degree[clicked])][-len(clicked) // 10 :]
    assert np.isin(split.cold_ads, top_decile).sum() >= 0.15 * len(top_decile)
    assert np.median(degree[split.cold_ads]) == pytest.approx(np.median(degree[clicked]), rel=0.5)
    # seeded: same seed same split, another seed another split
    assert (cold_split(graph, EvaluationParams(seed=0)).cold_ads == split.cold_ads).all()
    assert not np.array_equal(cold_split(graph, EvaluationParams(seed=1)).cold_ads, split.cold_ads)


def test_warm_split_shows_half_of_each_cold_ads_clicks():
    graph = power_law_graph()
    split = cold_split(graph, EvaluationParams(seed=0))
    warm = warm_split(graph, split.cold_ads, seed=0)
    assert (warm.cold_ads == split.cold_ads).all()
    full_degree = graph.ad_degrees()[split.cold_ads]
    assert (warm.train.ad_degrees()[split.cold_ads] == full_degree // 2).all()
    held_out = {
        (graph.user_ids[warm.eval_users[r]], graph.ad_ids[warm.cold_ads[c]]) for r, c in zip(*np.nonzero(warm.relevant))
    }
    assert not (click_set(warm.train) & held_out)
    assert click_set(warm.train) | held_out == click_set(graph)
    assert not (warm.seen & warm.relevant).any()  # a target is never a visible click


def test_split_refuses_tiny_graphs():
    graph = ClickGraph.from_pairs(np.array(["u1", "u2", "u3"]), np.array(["a", "b", "c"]))
    with pytest.raises(EvaluationError, match="at least 10"):
        cold_split(graph, EvaluationParams())
    with pytest.raises(EvaluationError, match="cold_share"):
        cold_split(power_law_graph(), EvaluationParams(cold_share=1.5))


def test_content_knn_scores_follow_the_users_training_clicks():
    """A user who clicked ads of content direction e0 ranks the cold e0 ad first."""
    graph = ClickGraph.from_pairs(
        np.array(["u1", "u1", "u2", "u2"] + [f"x{i}" for i in range(10)]),
        np.array(["a0", "a1", "a2", "a3"] + [f"f{i}" for i in range(10)]),
    )
    content = np.zeros((graph.n_ads, 4))
    ads = list(graph.ad_ids)
    for name, axis in {"a0": 0, "a1": 0, "a2": 1, "a3": 1}.items():
        content[ads.index(name), axis] = 1.0
    for i in range(10):
        content[ads.index(f"f{i}"), 2 + i % 2] = 1.0
    split = cold_split(graph, EvaluationParams(seed=0, cold_share=0.3))
    assert len(split.eval_users) > 0
    scores = content_knn_scores(split, content)
    assert scores.shape == split.relevant.shape
    # hand check: each score = cos(mean of the user's training content, cold content)
    train = split.train
    for r, u in enumerate(split.eval_users):
        own = content[train.indices[train.indptr[u] : train.indptr[u + 1]]]
        mean = own.sum(axis=0) / max(len(own), 1)  # no training click: zero profile, all ties
        norm = np.linalg.norm(mean)
        expected = content[split.cold_ads] @ (mean / norm if norm > 0 else mean)
        np.testing.assert_allclose(scores[r], expected, atol=1e-9)


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    true = rng.normal(size=(6, 3))
    w = ridge_fit(x, x @ true + 0.5, rng)
    np.testing.assert_allclose(w[:6], true, atol=0.05)
    np.testing.assert_allclose(w[6], 0.5, atol=0.05)


def test_fit_als_is_seeded_and_independent_of_the_thread_count():
    graph = power_law_graph()
    one = fit_als(graph, AlsParams(factors=8, iterations=5, seed=3, threads=1))
    two = fit_als(graph, AlsParams(factors=8, iterations=5, seed=3, threads=2))
    assert one.users.shape == (graph.n_users, 8) and one.ads.shape == (graph.n_ads, 8)
    np.testing.assert_array_equal(one.users, two.users)
    np.testing.assert_array_equal(one.ads, two.ads)
    other = fit_als(graph, AlsParams(factors=8, iterations=5, seed=4, threads=1))
    assert not np.allclose(one.users, other.users)


def test_ridge_als_scores_put_the_users_community_first():
    """Two communities, two content clusters; a user's cold ads of its own cluster must
    outscore the other cluster's: ALS factors + ridge from content recover the block."""
    rng = np.random.default_rng(2)
    n_ads = 80
    cluster = np.arange(n_ads) % 2
    content = np.eye(2)[cluster] + 0.2 * rng.normal(size=(n_ads, 2))
    graph = community_graph(cluster, 60, 10, rng)
    content = content[[int(a[2:]) for a in graph.ad_ids]]
    split = cold_split(graph, EvaluationParams(seed=0))
    scores = ridge_als_scores(split, content, AlsParams(factors=4, iterations=10, threads=1))
    user_cluster = np.array([int(graph.user_ids[u][1:]) % 2 for u in split.eval_users])
    ad_cluster = np.array([int(graph.ad_ids[a][2:]) % 2 for a in split.cold_ads])
    own = user_cluster[:, None] == ad_cluster[None, :]
    # every user's weakest own-cluster cold ad beats its strongest other-cluster one
    assert (np.where(own, scores, np.inf).min(axis=1) > np.where(own, -np.inf, scores).max(axis=1)).all()


def test_evaluate_cold_start_reports_every_method_and_learns_content():
    """Two user communities clicking two content clusters: the pipeline must beat random by far."""
    rng = np.random.default_rng(0)
    n_ads, dim = 120, 16
    cluster = np.arange(n_ads) % 2
    centers = rng.normal(size=(2, dim))
    content = centers[cluster] + 0.3 * rng.normal(size=(n_ads, dim))
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    graph = community_graph(cluster, 200, 8, rng)
    content = content[[int(a[2:]) for a in graph.ad_ids]].astype(np.float32)
    report = evaluate_cold_start(
        graph,
        content,
        UserTrainingParams(dim=8, epochs=15, batch_size=64, lr=1e-2, min_steps=0),
        ProjectorParams(hidden_dim=32, epochs=15, batch_size=64, lr=3e-3, min_steps=0),
        EvaluationParams(seed=0, k=10),
    )
    assert list(report.results) == [m for m in METHOD_ORDER if m != "ridge_als_fields"]  # no fields declared
    cold_ids = set(graph.ad_ids[cold_split(graph, EvaluationParams(seed=0, k=10)).cold_ads])
    assert report.n_eval_users == len({u for u, a in click_set(graph) if a in cold_ids})
    # 20 cold ads, 10 per cluster: a user's held-out clicks should fill its top 10 (random
    # gets ~0.5). AUC is capped near (10 + 9/2) / 19 = 0.76, since same-cluster cold ads the
    # user never clicked are negatives indistinguishable by content.
    assert report.results[PIPELINE].recall > 0.95
    assert report.results["random"].recall == pytest.approx(0.5, abs=0.1)
    assert report.results[PIPELINE].auc > 0.7 > report.results["random"].auc + 0.15
    assert report.results["ridge_als"].recall > 0.95  # ALS factors separate the two communities too
    table = report.markdown()
    assert "Recall@10" in table and table.count("\n") == 1 + len(METHOD_ORDER) - 1  # one row per method


def test_compare_refresh_warm_starts_from_the_stale_model_and_scores_all_three():
    """Planted clusters again; 30% of the clicks arrive late. The stale model never saw
    users whose clicks are all new (they sit at its global mean); the refresh and the full
    retrain both learn them, and the refresh gets there from the stale state in 2 epochs."""
    rng = np.random.default_rng(1)
    n_ads, dim = 120, 16
    cluster = np.arange(n_ads) % 2
    content = np.random.default_rng(2).normal(size=(2, dim))[cluster] + 0.3 * rng.normal(size=(n_ads, dim))
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    graph = community_graph(cluster, 200, 8, rng)
    content = content[[int(a[2:]) for a in graph.ad_ids]].astype(np.float32)
    late_users = np.isin(graph.click_users(), np.arange(0, graph.n_users, 3))  # a third of users are new
    is_new = late_users | (rng.random(graph.n_clicks) < 0.1)
    user_params = UserTrainingParams(dim=8, epochs=15, batch_size=64, lr=1e-2, min_steps=0)
    projector_params = ProjectorParams(hidden_dim=32, epochs=15, batch_size=64, lr=3e-3, min_steps=0)
    params = EvaluationParams(seed=0, k=10, warm_reference=False)
    result = compare_refresh(graph, is_new, content, user_params, projector_params, params, refresh_epochs=(2, 2))
    assert result.n_new_clicks == int(is_new.sum())
    assert result.full.n_users == result.refreshed.n_users == result.stale.n_users
    # random recall@10 of 20 cold ads is ~0.5; both trained models must find the user's cluster
    assert result.full.recall > 0.9 and result.refreshed.recall > 0.9
    # the stale model ranks the new users' cold ads by its global mean alone: clearly worse
    assert result.stale.recall < result.refreshed.recall - 0.1
    assert "warm-start refresh" in result.markdown(10)
    with pytest.raises(EvaluationError, match="is_new_click"):
        compare_refresh(graph, is_new[:-1], content, user_params, projector_params, params)


def _report(seed: int, recalls: dict[str, float]) -> EvaluationReport:
    results = {name: MethodResult(r, r / 2, 0.5 + r, 10, 20) for name, r in recalls.items()}
    settings = json.dumps({"evaluation": {"seed": seed}})
    return EvaluationReport(k=20, results=results, n_cold_ads=20, n_eval_users=10, seconds=1.0, settings=settings,
                            seeds=[seed], per_seed={n: np.asarray([[r.recall, r.ndcg, r.auc]]) for n, r in results.items()})  # fmt: skip


def test_seeds_combine_into_means_with_each_seeds_numbers_and_a_headline_against_the_stronger_als_baseline():
    reports = [
        _report(0, {"random": 0.1, "ridge_als": 0.20, "ridge_als_fields": 0.22, PIPELINE: 0.30}),
        _report(3, {"random": 0.1, "ridge_als": 0.10, "ridge_als_fields": 0.12, PIPELINE: 0.10}),
    ]
    combined = combine_seeds(reports)
    assert combined.seeds == [0, 3] and combined.seconds == 2.0
    assert combined.results[PIPELINE].recall == pytest.approx(0.20)
    np.testing.assert_allclose(combined.per_seed[PIPELINE][:, 0], [0.30, 0.10])
    assert combined.als_baseline() == ("ridge_als_fields", pytest.approx(0.17))
    ratio, per_seed = combined.headline()
    assert ratio == pytest.approx(0.20 / 0.17)  # the ratio of the means, not the mean of the ratios
    np.testing.assert_allclose(per_seed, [0.30 / 0.22, 0.10 / 0.12])
    again = EvaluationReport.from_arrays(combined.to_arrays())
    assert again.seeds == [0, 3] and again.headline()[0] == pytest.approx(ratio)
    np.testing.assert_array_equal(again.per_seed["ridge_als"], combined.per_seed["ridge_als"])
    assert "0.2000 ± 0.1000" in combined.markdown()  # the pipeline's recall over the two seeds


def test_the_evaluation_plot_draws_every_seed():
    from adrec_assets.assets.evaluation import report_plot_markdown

    three = combine_seeds([_report(s, {"random": 0.1 + s / 100, "ridge_als": 0.2, PIPELINE: 0.3}) for s in range(3)])
    one = report_plot_markdown(combine_seeds([_report(0, {"random": 0.1, "ridge_als": 0.2, PIPELINE: 0.3})]))
    assert one.startswith("![cold-start evaluation](data:image/png;base64,")
    assert len(report_plot_markdown(three)) > len(one)  # the dots and error bars of three seeds
