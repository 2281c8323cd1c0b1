"""The user refit against the projected ads (the evaluation's diagnostic row)."""

from __future__ import annotations

import numpy as np
import pytest

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
    out = refit_users(graph, start, ads, np.asarray([0, 1]), np.arange(4), alpha=5.0, regularization=10.0, mix=1.0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert out[0] @ ads[3] > out[0] @ ads[2] > 0.3 and out[0] @ ads[1] == pytest.approx(0.0, abs=1e-7)  # weight 3 > 1
    np.testing.assert_array_equal(out[1], start[1])  # no click: unchanged
    # closed form: (PᵀP + α Σ w p pᵀ + λI) û = Σ (1 + α w) p; per orthogonal ad (1 + 5w) / (1 + 5w + 10)
    fitted = np.asarray([0, 0, 6 / 16, 16 / 26])
    expected = start[0] + fitted / np.linalg.norm(fitted)
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), rtol=1e-6)


def test_mix_zero_keeps_the_vectors_and_shapes_are_checked():
    rng = np.random.default_rng(0)
    ads = rng.normal(size=(5, 3)).astype(np.float32)
    users = rng.normal(size=(2, 3)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    graph = graph_of({0: [0, 1], 1: [4]}, n_users=2, n_ads=5)
    np.testing.assert_allclose(refit_users(graph, users, ads, np.asarray([0, 1]), np.arange(5), mix=0.0), users, rtol=1e-6)
    with pytest.raises(ValueError, match="4 ad rows for 5 ads"):
        refit_users(graph, users, ads[:4], np.asarray([0]), np.arange(4))
