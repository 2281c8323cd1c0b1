"""The ad refit: ads with clicks learn from them, ads without keep their projection exactly."""

from __future__ import annotations

import numpy as np
import pytest

from adrec_assets.ml.ad_refit import refit_ads
from adrec_assets.ml.params import AdRefitParams
from adrec_assets_tests.test_user_refit import graph_of


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def world(seed: int = 0, n_users: int = 60, n_ads: int = 12, d: int = 5):
    """Users in two taste clusters; ad 0 is clicked by many users of cluster B although its
    projection points at cluster A; ad 1 has one click; the last ad has none."""
    rng = np.random.default_rng(seed)
    a, b = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    users = unit(np.where(np.arange(n_users)[:, None] < n_users // 2, a, b) + 0.3 * rng.normal(size=(n_users, d)))
    clicks: dict[int, list[int]] = {}
    for u in range(n_users):
        ads = set(rng.choice(np.arange(2, n_ads - 1), size=2, replace=False).tolist())
        if u >= n_users // 2:
            ads.add(0)  # cluster B clicks ad 0
        clicks[u] = sorted(ads)
    clicks[0] = sorted(set(clicks[0]) | {1})
    graph = graph_of(clicks, n_users, n_ads)
    # projections near their clickers' centroid (a trained projector), but ad 0's points at cluster A
    centroids = np.zeros((n_ads, d))
    np.add.at(centroids, graph.indices, users[graph.click_users()])
    projected = unit(centroids / np.maximum(graph.ad_degrees(), 1)[:, None] + 0.5 * rng.normal(size=(n_ads, d)))
    projected[0] = a
    bias = rng.normal(scale=0.2, size=n_ads).astype(np.float32)
    return graph, users, projected, bias, a, b


def test_an_ad_without_clicks_scores_exactly_as_before():
    graph, users, projected, bias, _, _ = world()
    out = refit_ads(graph, users, projected, bias, AdRefitParams())
    last = graph.n_ads - 1
    assert graph.ad_degrees()[last] == 0 and not out.refitted[last]
    np.testing.assert_array_equal(out.vectors[last], projected[last])
    assert out.score_bias[last] == bias[last]
    np.testing.assert_array_equal(
        users @ out.vectors[last] + out.score_bias[last], users @ projected[last] + bias[last]
    )


def test_a_heavily_clicked_ad_moves_toward_its_clickers_and_a_rarely_clicked_one_stays_near_its_projection():
    graph, users, projected, bias, a, b = world()
    out = refit_ads(graph, users, projected, bias, AdRefitParams())
    clickers_b = users[graph.n_users // 2 :].mean(axis=0)
    before, after = projected[0] @ clickers_b, unit(out.vectors[0]) @ clickers_b
    assert after > before + 0.3  # followed its 30 clickers from cluster A toward cluster B
    cos_rare = unit(out.vectors[1]) @ projected[1]
    cos_heavy = unit(out.vectors[0]) @ projected[0]
    assert cos_rare > 0.8 and cos_rare > cos_heavy  # one click barely moves it
    # a stronger pull toward the projection keeps even the heavy ad closer to it
    strong = refit_ads(graph, users, projected, bias, AdRefitParams(regularization=1e4))
    assert unit(strong.vectors[0]) @ projected[0] > cos_heavy


def test_refit_matches_the_closed_form_per_ad_and_the_scale_is_the_least_squares_one():
    graph, users, projected, bias, _, _ = world(seed=1)
    params = AdRefitParams(alpha=3.0, regularization=7.0, warm_bias=0.5)
    out = refit_ads(graph, users, projected, bias, params)
    u, p = users.astype(np.float64), projected.astype(np.float64)
    y = np.zeros((graph.n_users, graph.n_ads))
    y[graph.click_users(), graph.indices] = graph.weights
    c = 1.0 + params.alpha * y
    warm = graph.ad_degrees() > 0
    x = u @ p[warm].T  # every (user, warm ad) pair: the brute-force least-squares scale
    scale = (c[:, warm] * (y[:, warm] > 0) * x).sum() / (c[:, warm] * x * x).sum()
    assert out.scale == pytest.approx(scale, rel=1e-9)
    for ad in np.flatnonzero(warm):
        system = (u.T * c[:, ad]) @ u + params.regularization * np.eye(u.shape[1])
        fit = np.linalg.solve(system, (u.T * c[:, ad]) @ (y[:, ad] > 0) + params.regularization * scale * p[ad])
        np.testing.assert_allclose(out.vectors[ad], fit / scale, rtol=1e-5, atol=1e-6)
        assert out.score_bias[ad] == pytest.approx(0.5 * bias[ad])


def test_settings_and_shapes_are_checked_with_the_field_named():
    graph, users, projected, bias, _, _ = world()
    with pytest.raises(ValueError, match=r"regularization 0\.0 out of range"):
        refit_ads(graph, users, projected, bias, AdRefitParams(regularization=0.0))
    with pytest.raises(ValueError, match="alpha -1.0, warm_bias nan"):
        refit_ads(graph, users, projected, bias, AdRefitParams(alpha=-1.0, warm_bias=float("nan")))
    with pytest.raises(ValueError, match="11 ad rows"):
        refit_ads(graph, users, projected[:-1], bias, AdRefitParams())


def test_projections_pointing_away_from_their_clickers_are_no_prior():
    """s <= 0: the clicked ads get the plain implicit-ALS step (zero prior, ALS scale)."""
    graph, users, projected, bias, _, _ = world()
    params = AdRefitParams()
    out = refit_ads(graph, users, -projected, bias, params)
    assert out.scale < 0
    u = users.astype(np.float64)
    for ad in np.flatnonzero(graph.ad_degrees() > 0)[:4]:
        clicked = np.zeros(graph.n_users)
        clicked[graph.click_users()[graph.indices == ad]] = 1.0
        c = 1.0 + params.alpha * clicked
        fit = np.linalg.solve((u.T * c) @ u + params.regularization * np.eye(u.shape[1]), (u.T * c) @ clicked)
        np.testing.assert_allclose(out.vectors[ad], fit, rtol=1e-5, atol=1e-6)


def test_the_served_model_keeps_the_refitted_users_by_default_and_alternation_moves_them():
    from adrec_assets.ml.params import UserRefitParams
    from adrec_assets.ml.served_model import fit_served_model
    from adrec_assets.ml.user_refit import refit_users

    graph, users, projected, bias, _, _ = world(seed=3)
    stages: list[str] = []
    model = fit_served_model(graph, users, projected, bias, timing=lambda stage, seconds: stages.append(stage))
    np.testing.assert_array_equal(model.users, refit_users(graph, users, projected, UserRefitParams()))
    np.testing.assert_array_equal(model.ads.vectors, refit_ads(graph, model.users, projected, bias).vectors)
    assert stages == ["user refit", "ad step 0"]
    alternated = fit_served_model(graph, users, projected, bias, ad_params=AdRefitParams(iterations=2))
    np.testing.assert_allclose(np.linalg.norm(alternated.users, axis=1), 1.0, rtol=1e-5)
    assert np.abs(alternated.users - model.users).max() > 1e-3
    np.testing.assert_array_equal(alternated.projection_users, model.users)
    cold = graph.ad_degrees() == 0
    np.testing.assert_array_equal(alternated.ads.vectors[cold], projected[cold])
    with pytest.raises(ValueError, match="iterations -1"):
        fit_served_model(graph, users, projected, bias, ad_params=AdRefitParams(iterations=-1))
