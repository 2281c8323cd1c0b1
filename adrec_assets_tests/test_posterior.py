"""The shared click model's posterior: one batch is the exact Laplace MAP and Hessian, the
mean reaches a planted parameter inside its own credible region, position-aware weights learn
relevance rather than attention, and the state round-trips through numeric arrays.

Independent references as in ``test_policy``: ``scipy.optimize`` for the MAP, planted
parameters, explicit draws.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import chi2

from adrec_assets.online.policy import make_policy
from adrec_assets.online.posterior import LaplaceLogisticPosterior, ad_features
from adrec_assets_tests.test_policy import ExactIndex, K, learned_posterior, random_catalogue, unit_rows

pytestmark = pytest.mark.usefixtures("single_blas_thread")  # conftest: one BLAS thread for small matrices


def test_one_batch_update_is_the_exact_laplace_map_and_hessian():
    rng = np.random.default_rng(14)
    dim, n = 3, 400
    prior = LaplaceLogisticPosterior.prior(dim, intercept=-1.0)
    posterior = LaplaceLogisticPosterior.from_arrays(prior.to_arrays())
    users = unit_rows(rng.normal(size=(n, dim)))
    ads = random_catalogue(n, dim, rng, bias_scale=1.0)
    clicked = rng.random(n) < 0.3
    weights = rng.uniform(0.2, 2.0, size=n)
    posterior.update(users, ads, clicked, weights)

    features = ad_features(users, ads)
    m0, p0 = prior.mean(), prior.precision()

    def negative_log_posterior(theta):
        logits = features @ theta
        return 0.5 * (theta - m0) @ p0 @ (theta - m0) + weights @ (np.logaddexp(0, logits) - clicked * logits)

    def gradient(theta):
        return p0 @ (theta - m0) + features.T @ (weights * (expit(features @ theta) - clicked))

    reference = minimize(negative_log_posterior, m0, jac=gradient, method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(posterior.mean(), reference, atol=1e-6)
    curvature = weights * expit(features @ reference) * (1 - expit(features @ reference))
    hessian = p0 + sum(c * np.outer(f, f) for c, f in zip(curvature, features))
    np.testing.assert_allclose(posterior.precision(), hessian, rtol=1e-6)
    np.testing.assert_allclose(posterior.covariance() @ posterior.precision(), np.eye(dim + 2), atol=1e-8)
    assert posterior.observed_weight == pytest.approx(weights.sum())


def simulate_impressions(theta_star, n, dim, rng, catalogue):
    users = unit_rows(rng.normal(size=(n, dim)))
    ads = catalogue[rng.integers(len(catalogue), size=n)]
    return users, ads, rng.random(n) < expit(ad_features(users, ads) @ theta_star)


def test_posterior_mean_moves_to_a_planted_theta_within_its_own_credible_region():
    rng = np.random.default_rng(15)
    dim = 6
    theta_star = np.r_[rng.uniform(0.0, 5.0, dim), -1.5, -1.0]
    catalogue = random_catalogue(300, dim, rng, bias_scale=0.7)
    posterior = LaplaceLogisticPosterior.prior(dim, intercept=-1.0)
    distances = [np.linalg.norm(posterior.mean() - theta_star)]
    for _ in range(8):
        posterior.update(*simulate_impressions(theta_star, 4_000, dim, rng, catalogue))
        distances.append(np.linalg.norm(posterior.mean() - theta_star))
    assert distances[-1] < 0.2 * distances[0]
    assert distances[-1] < distances[1]
    delta = posterior.mean() - theta_star
    assert delta @ posterior.precision() @ delta < chi2.ppf(0.999, dim + 2)  # calibrated, not just closer


@pytest.mark.parametrize("scheme, base_logit, n", [("examination", -1.0, 60_000), ("ips", -4.0, 400_000)])
def test_position_aware_update_learns_relevance_where_the_unweighted_update_learns_attention(scheme, base_logit, n):
    """Clicks from the PBM at random positions: the weighted posterior recovers the planted
    relevance model; the plain update is pulled down by examination (intercept too low)."""
    rng = np.random.default_rng(17)
    dim = 2
    examination = np.array([1.0, 0.6, 0.45, 0.35, 0.3])
    theta_star = np.array([2.0, 1.0, 1.0, base_logit])
    users = unit_rows(rng.normal(size=(n, dim)))
    ads = random_catalogue(n, dim, rng, bias_scale=0.5)
    positions = rng.integers(5, size=n)
    clicked = rng.random(n) < examination[positions] * expit(ad_features(users, ads) @ theta_star)

    aware = LaplaceLogisticPosterior.prior(dim, intercept=base_logit)
    aware.update_position_aware(users, ads, clicked, positions, examination, scheme=scheme, cap=10.0)
    plain = LaplaceLogisticPosterior.prior(dim, intercept=base_logit)
    plain.update(users, ads, clicked)

    standard_errors = np.sqrt(np.diag(aware.covariance()))
    assert np.all(np.abs(aware.mean() - theta_star) < 4 * standard_errors), (aware.mean(), standard_errors)
    assert plain.mean()[-1] < theta_star[-1] - 10 * standard_errors[-1]


def test_posterior_round_trips_through_numeric_arrays_to_identical_draws():
    rng = np.random.default_rng(18)
    index = ExactIndex(random_catalogue(500, 8, rng))
    posterior = learned_posterior(index, rng)
    arrays = posterior.to_arrays()
    assert all(np.asarray(value).dtype.kind in "fiu" for value in arrays.values())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        restored = LaplaceLogisticPosterior.from_arrays(dict(stored))
    np.testing.assert_array_equal(restored.sample(np.random.default_rng(3)), posterior.sample(np.random.default_rng(3)))
    features = ad_features(np.ones(8) / np.sqrt(8), index.vectors(np.arange(50)))
    np.testing.assert_array_equal(
        restored.sample_scores(np.random.default_rng(4), features, 30),
        posterior.sample_scores(np.random.default_rng(4), features, 30),
    )
    user = unit_rows(rng.normal(size=8))
    before = make_policy("thompson", posterior=posterior).recommend(user, index, K, np.random.default_rng(5))
    after = make_policy("thompson", posterior=restored).recommend(user, index, K, np.random.default_rng(5))
    np.testing.assert_array_equal(before.slots, after.slots)
    np.testing.assert_array_equal(before.propensities, after.propensities)
    assert restored.observed_weight == posterior.observed_weight


def test_sample_scores_follow_the_posterior_predictive_of_explicit_draws():
    rng = np.random.default_rng(19)
    index = ExactIndex(random_catalogue(300, 4, rng))
    posterior = learned_posterior(index, rng)
    features = ad_features(unit_rows(rng.normal(size=4)), index.vectors(np.arange(6)))
    draws = 100_000
    scores = posterior.sample_scores(np.random.default_rng(1), features, draws, scale=2.0).astype(np.float64)
    covariance = 4 * features @ posterior.covariance() @ features.T  # scale 2: variance x 4
    variance = np.diag(covariance)
    # 5 Monte Carlo standard errors: mean sqrt(S_ii / n), covariance sqrt((S_ii S_jj + S_ij^2) / n)
    assert np.all(np.abs(scores.mean(axis=1) - features @ posterior.mean()) <= 5 * np.sqrt(variance / draws))
    covariance_error = np.sqrt((np.outer(variance, variance) + covariance**2) / draws)
    assert np.all(np.abs(np.cov(scores) - covariance) <= 5 * covariance_error)


def test_posterior_rejects_bad_batches_and_bad_state():
    rng = np.random.default_rng(22)
    posterior = LaplaceLogisticPosterior.prior(4)
    ads = random_catalogue(3, 4, rng)
    user = np.ones(4) / 2
    with pytest.raises(ValueError, match=r"clicked: expected 0/1 values, found \[2\]"):
        posterior.update(user, ads, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="weight: impression weights must be finite and >= 0"):
        posterior.update(user, ads, np.array([0, 1, 0]), np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"users: expected shape \(4,\) or \(3, 4\)"):
        posterior.update(np.ones((2, 4)), ads, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="ad_vectors: 3-d ads for a 4-d posterior"):
        posterior.update(np.ones(3), ads[:, 1:], np.array([0, 1, 0]))
    with pytest.raises(ValueError, match=r"position: must lie in \[0, 1\]"):
        posterior.update_position_aware(user, ads, np.array([0, 1, 0]), np.array([0, 1, 2]), np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match="arrays: missing \\['precision'\\]"):
        LaplaceLogisticPosterior.from_arrays({"mean": np.zeros(6)})
    with pytest.raises(ValueError, match="precision: must be positive definite"):
        LaplaceLogisticPosterior.from_arrays({"mean": np.zeros(6), "precision": -np.eye(6)})
    with pytest.raises(ValueError, match="arrays\\['mean'\\]: expected a numeric array"):
        LaplaceLogisticPosterior.from_arrays({"mean": np.array(["a"] * 6), "precision": np.eye(6)})
    with pytest.raises(ValueError, match="scale: must be > 0"):
        LaplaceLogisticPosterior.prior(4, scale=0.0)
    np.testing.assert_array_equal(posterior.mean(), LaplaceLogisticPosterior.prior(4).mean())  # untouched
