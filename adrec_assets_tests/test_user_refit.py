"""The user refit against the projected ads (what ``served_users`` serves)."""

from __future__ import annotations

import numpy as np
import pytest

from adrec_assets.ml.params import UserRefitParams
from adrec_assets.ml.types import ClickGraph
from adrec_assets.ml.user_refit import refit_users


def graph_of(clicks: dict[int, list[int]], n_users: int, n_ads: int, weights: list[float] | None = None) -> ClickGraph:
    """Every user and ad keeps its row, clicked or not (user u's ads in ``clicks[u]``, in order)."""
    rows = [clicks.get(u, []) for u in range(n_users)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.asarray([a for r in rows for a in r], dtype=np.int32)
    w = np.ones(len(indices), np.float32) if weights is None else np.asarray(weights, np.float32)
    return ClickGraph(np.asarray([f"u{i}" for i in range(n_users)]), np.asarray([f"a{i}" for i in range(n_ads)]),
                      indptr, indices, w)  # fmt: skip


def test_a_refit_user_turns_towards_the_projected_ads_it_clicked_and_matches_the_closed_form():
    ads = np.eye(4, dtype=np.float32)  # four orthogonal projected ads
    graph = graph_of({0: [2, 3], 1: []}, n_users=2, n_ads=4, weights=[1.0, 3.0])
    start = np.tile(np.asarray([1.0, 0.0, 0.0, 0.0], np.float32), (2, 1))  # both users point at ad 0
    out = refit_users(graph, start, ads, UserRefitParams(alpha=5.0, regularization=10.0, mix=1.0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert out[0] @ ads[3] > out[0] @ ads[2] > 0.3 and out[0] @ ads[1] == pytest.approx(0.0, abs=1e-7)  # weight 3 > 1
    np.testing.assert_array_equal(out[1], start[1])  # no click: unchanged
    # closed form over the clicked ads: (PᵀP + α Σ w p pᵀ + λI) û = Σ (1 + α w) p; per orthogonal ad (1 + 5w) / (1 + 5w + 10)
    fitted = np.asarray([0, 0, 6 / 16, 16 / 26])
    expected = start[0] + fitted / np.linalg.norm(fitted)
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), rtol=1e-6)


def test_mix_zero_keeps_the_vectors_and_shapes_are_checked():
    rng = np.random.default_rng(0)
    ads = rng.normal(size=(5, 3)).astype(np.float32)
    users = rng.normal(size=(2, 3)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    graph = graph_of({0: [0, 1], 1: [4]}, n_users=2, n_ads=5)
    np.testing.assert_allclose(refit_users(graph, users, ads, UserRefitParams(mix=0.0)), users, rtol=1e-6)
    with pytest.raises(ValueError, match="4 ad rows for 5 ads"):
        refit_users(graph, users, ads[:4])
    with pytest.raises(ValueError, match=r"regularization 0\.0 out of range"):
        refit_users(graph, users, ads, UserRefitParams(regularization=0.0))
    with pytest.raises(ValueError, match="alpha -1.0, mix nan"):
        refit_users(graph, users, ads, UserRefitParams(alpha=-1.0, mix=float("nan")))


def test_batched_refit_equals_one_user_at_a_time_whatever_the_batch_size():
    """Users of very different click counts are padded into shared batches; the padding
    must not count as clicks, and the result must not depend on how users are grouped."""
    rng = np.random.default_rng(3)
    n_users, n_ads, d = 40, 30, 6
    clicks = {
        u: sorted(rng.choice(n_ads, size=int(rng.integers(0, 25)), replace=False).tolist()) for u in range(n_users)
    }
    n_clicks = sum(len(c) for c in clicks.values())
    graph = graph_of(clicks, n_users, n_ads, weights=rng.uniform(0.5, 3.0, size=n_clicks).tolist())
    ads = rng.normal(size=(n_ads, d)).astype(np.float32)
    start = rng.normal(size=(n_users, d)).astype(np.float32)
    start /= np.linalg.norm(start, axis=1, keepdims=True)
    params = UserRefitParams(alpha=2.0, regularization=3.0, mix=0.7)
    clicked = ads[graph.ad_degrees() > 0].astype(np.float64)
    expected = start.astype(np.float64).copy()
    for u in range(n_users):
        a, w = (
            graph.indices[graph.indptr[u] : graph.indptr[u + 1]],
            graph.weights[graph.indptr[u] : graph.indptr[u + 1]],
        )
        if len(a):
            p = ads[a].astype(np.float64)
            system = clicked.T @ clicked + params.alpha * (p.T * w) @ p + params.regularization * np.eye(d)
            fit = np.linalg.solve(system, (1 + params.alpha * w) @ p)
            expected[u] += params.mix * fit / np.linalg.norm(fit)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    for batch_rows in (1, 7, 1 << 17):
        np.testing.assert_allclose(refit_users(graph, start, ads, params, batch_rows=batch_rows), expected, atol=1e-6)
    some = np.asarray([5, 0, 17])
    np.testing.assert_allclose(refit_users(graph, start, ads, params, users=some), expected[some], atol=1e-6)
