"""Ads with clicks learn from them: a collaborative ad vector whose prior is its projection.

Every ad is first placed in the user space by the projector (``ad_projected``): that is all a
new ad has. An ad with clicks also has its clickers, so its served vector is the posterior mean
of one implicit-ALS ad step against the served users with the projection as prior mean
(regression-based latent factors, Agarwal & Chen 2009):

    v_a = (UᵀU + α Σ_{u clicked a} w_u u uᵀ + λI)⁻¹ (Σ_{u clicked a} (1 + α w_u) u + λ s p_a) / s

``U`` holds the users with a click. ``s`` puts the projection on the ALS scale: it is the
least-squares scale of the score ``u · s p_a`` against the implicit-ALS targets (1 for a
click, 0 otherwise, with confidence 1 + α w) over the ads with clicks, in closed form. Dividing
by ``s`` brings the fit back to the projection's scale, so an ad with few clicks stays near
its projection and competes with cold ads on one scale, and one with many follows its
clickers. An ad without a click keeps its projection and its ``score_bias`` exactly. Where the
projections do not point toward their clickers at all (``s <= 0``, an untrained projector) they
are no prior, and the clicked ads follow their clicks alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adrec_assets.ml.als_step import solve_rows
from adrec_assets.ml.params import AdRefitParams
from adrec_assets.ml.types import ClickGraph

CHUNK = 1 << 18  # clicks per chunk of the scale's dot products


@dataclass(frozen=True)
class RefitAds:
    vectors: np.ndarray  # (n_ads, d) float32: the refit for ads with clicks, the projection otherwise
    score_bias: np.ndarray  # (n_ads,) float32
    scale: float  # s: the projection's least-squares scale on the ALS targets (<= 0: no prior was used)
    refitted: np.ndarray  # (n_ads,) bool: ads with at least one click


def check_params(params: AdRefitParams) -> None:
    bad = [f"{name} {value!r}" for name, value, ok in (
        ("alpha", params.alpha, params.alpha >= 0), ("regularization", params.regularization, params.regularization > 0),
        ("warm_bias", params.warm_bias, params.warm_bias >= 0), ("iterations", params.iterations, params.iterations >= 0),
        ("user_regularization", params.user_regularization, params.user_regularization > 0)) if not (ok and np.isfinite(value))]  # fmt: skip
    if bad:
        raise ValueError(f"AdRefitParams: {', '.join(bad)} out of range (alpha >= 0, regularization > 0, warm_bias >= 0, "
                         "iterations >= 0, user_regularization > 0)")  # fmt: skip


def refit_ads(
    graph: ClickGraph,
    user_vectors: np.ndarray,
    projected: np.ndarray,
    score_bias: np.ndarray,
    params: AdRefitParams = AdRefitParams(),
) -> RefitAds:
    """Served ad vectors and score terms; rows align with ``graph.ad_ids`` (``projected`` and
    ``score_bias`` too) and ``user_vectors`` with ``graph.user_ids``."""
    if len(projected) != graph.n_ads or len(score_bias) != graph.n_ads or len(user_vectors) != graph.n_users:
        raise ValueError(f"refit_ads: {len(projected)} ad rows and {len(score_bias)} score terms for {graph.n_ads} ads, "
                         f"{len(user_vectors)} user rows for {graph.n_users} users")  # fmt: skip
    check_params(params)
    p = np.asarray(projected, dtype=np.float64)
    u = np.asarray(user_vectors, dtype=np.float64)
    d = p.shape[1]
    order = np.argsort(graph.indices, kind="stable")  # clicks by ad: the CSC view, with weights
    clickers, weights = graph.click_users()[order], graph.weights[order].astype(np.float64)
    degree = graph.ad_degrees()
    ad_indptr = np.concatenate([[0], np.cumsum(degree)]).astype(np.int64)
    warm = np.flatnonzero(degree > 0)
    active = u[np.diff(graph.indptr) > 0]
    user_gram = active.T @ active
    scale = _projection_scale(graph, u, p, user_gram, warm, params.alpha)
    # A projection that does not point toward its clickers on the whole (an untrained projector)
    # is no prior: the fit then follows the clicks alone, on the ALS scale.
    prior_scale, rescale = (scale, scale) if scale > 0 else (0.0, 1.0)
    vectors = np.array(projected, dtype=np.float32, copy=True)
    bias = np.array(score_bias, dtype=np.float32, copy=True)
    if len(warm):
        gram = user_gram + params.regularization * np.eye(d)
        prior = params.regularization * prior_scale * p[warm]
        fitted = solve_rows(ad_indptr, clickers, weights, u, gram, params.alpha, warm, prior=prior)
        vectors[warm] = fitted / rescale
        bias[warm] *= params.warm_bias
    return RefitAds(vectors, bias, scale, degree > 0)


def _projection_scale(
    graph: ClickGraph, u: np.ndarray, p: np.ndarray, user_gram: np.ndarray, warm: np.ndarray, alpha: float
) -> float:
    """argmin_s Σ_{users, warm ads} c (y − s u·p_a)²: Σ c y x / Σ c x² with x = u·p_a, where
    the sum over every (user, ad) pair is pᵀ(UᵀU)p and the clicks add their extra confidence."""
    users = graph.click_users()
    x = (
        np.concatenate(
            [
                np.einsum("ij,ij->i", u[users[i : i + CHUNK]], p[graph.indices[i : i + CHUNK]])
                for i in range(0, graph.n_clicks, CHUNK)
            ]
        )
        if graph.n_clicks
        else np.zeros(0)
    )  # fmt: skip  (in chunks: clicks x d doubles would not fit at 10M clicks)
    w = graph.weights.astype(np.float64)
    numerator = float(((1.0 + alpha * w) * x).sum())
    denominator = float(np.einsum("ad,de,ae->", p[warm], user_gram, p[warm]) + (alpha * w * x * x).sum())
    return numerator / denominator if denominator > 0 else 0.0
