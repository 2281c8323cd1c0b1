"""The users and ads the service ranks with, fitted together from the clicks.

1. Users are refitted against the content projections (:mod:`adrec_assets.ml.user_refit`),
   so they live where cold ads live.
2. Ads with clicks take one implicit-ALS step against those users, with their projection as
   prior mean (:mod:`adrec_assets.ml.ad_refit`).
3. ``iterations`` times (default 0): users take a plain implicit-ALS step against the served
   ads, then the ads take their step again against those users: alternating least squares
   whose item factors are pulled toward the content projections (Agarwal & Chen 2009). It
   ranks warm ads better and cold ads worse (``benchmarks/README.md``, warm section), so by
   default the served users stay those of step 1.

Served users are unit rows (the score of a cold ad, u . p_a + b_a, keeps the scale its
``score_bias`` was calibrated on); a user without a click keeps the vector step 1 gives it. An
ad without a click keeps its projection and score term exactly, whatever the iterations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adrec_assets.ml.ad_refit import RefitAds, check_params, refit_ads
from adrec_assets.ml.als_step import solve_rows
from adrec_assets.ml.params import AdRefitParams, UserRefitParams
from adrec_assets.ml.types import ClickGraph
from adrec_assets.ml.user_refit import refit_users


@dataclass(frozen=True)
class ServedModel:
    users: np.ndarray  # (n_users, d) float32 unit rows, aligned with graph.user_ids
    ads: RefitAds  # rows aligned with graph.ad_ids
    projection_users: np.ndarray  # step 1 alone: the users fitted to the projections (what served before the ad refit)


def user_step(graph: ClickGraph, ad_vectors: np.ndarray, alpha: float, regularization: float) -> np.ndarray:
    """(n_users, d) one implicit-ALS user step against ``ad_vectors`` (rows align with
    ``graph.ad_ids``), zero prior mean; a user without a click gets a zero row. (A prior mean
    at the step-1 user gave back most of the warm gain on ml-latest-small.)"""
    v = np.asarray(ad_vectors, dtype=np.float64)
    clicked = v[graph.ad_degrees() > 0]
    gram = clicked.T @ clicked + regularization * np.eye(v.shape[1])
    return solve_rows(graph.indptr, graph.indices, graph.weights, v, gram, alpha, np.arange(graph.n_users))


def fit_served_model(
    graph: ClickGraph,
    user_vectors: np.ndarray,
    projected: np.ndarray,
    score_bias: np.ndarray,
    user_params: UserRefitParams = UserRefitParams(),
    ad_params: AdRefitParams = AdRefitParams(),
    timing: Callable[[str, float], None] | None = None,
) -> ServedModel:
    """Served users and ads (see the module docstring); ``user_vectors`` are the InfoNCE users
    (rows align with ``graph.user_ids``), ``projected`` and ``score_bias`` the projections of
    the graph's ads. ``timing(stage, seconds)`` hears each step's wall time."""
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        if timing is not None:
            timing(stage, now - clock[0])
        clock[0] = now

    check_params(ad_params)
    users = first = refit_users(graph, user_vectors, projected, user_params)
    lap("user refit")
    ads = refit_ads(graph, users, projected, score_bias, ad_params)
    lap("ad step 0")
    has_clicks = np.diff(graph.indptr) > 0
    for iteration in range(1, ad_params.iterations + 1):
        fitted = user_step(graph, ads.vectors, ad_params.alpha, ad_params.user_regularization)[has_clicks]
        norms = np.linalg.norm(fitted, axis=1, keepdims=True)
        users = users.copy()
        users[has_clicks] = np.where(norms > 1e-12, fitted / np.maximum(norms, 1e-12), users[has_clicks])
        lap(f"user step {iteration}")
        ads = refit_ads(graph, users, projected, score_bias, ad_params)
        lap(f"ad step {iteration}")
    return ServedModel(users.astype(np.float32), ads, first)
