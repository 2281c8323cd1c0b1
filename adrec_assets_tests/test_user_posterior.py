"""The per-user posterior (adrec_assets.online.user_posterior): exact Laplace steps, skips and
clicks moving the mean, the stored record, and Thompson's draws of the user's vector."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from adrec_assets.online.index import NumpyIndex
from adrec_assets.online.policy import ThompsonPolicy, make_policy
from adrec_assets.online.posterior import LaplaceLogisticPosterior
from adrec_assets.online.store import MemoryStore
from adrec_assets.online.user_posterior import (
    UserPrior,
    belief_from_record,
    belief_to_record,
    draw_spread,
    prior_belief,
    record_length,
    update_belief,
)

DIM, RANK = 8, 4


def _population(seed: int = 0, n: int = 300, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((n, dim)) * np.linspace(1.0, 0.1, dim)
    return (users / np.linalg.norm(users, axis=1, keepdims=True)).astype(np.float32)


def _ads(seed: int = 1, n: int = 40, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hstack([rng.standard_normal((n, dim)) * 0.5, rng.standard_normal((n, 1)) * 0.1])


def test_the_prior_is_the_populations_spread_in_its_principal_directions():
    users = _population()
    prior = UserPrior.from_users(users, RANK)
    covariance = np.cov(users.T.astype(np.float64))
    values = np.sort(np.linalg.eigvalsh(covariance))[::-1][:RANK]
    np.testing.assert_allclose(np.sort(np.linalg.svd(prior.basis, compute_uv=False) ** 2)[::-1], values, rtol=1e-6)
    again = UserPrior.from_users(users, RANK)  # deterministic, signs included
    np.testing.assert_array_equal(again.basis, prior.basis)
    assert again.checksum == prior.checksum
    assert prior.checksum == float(np.float32(prior.checksum))  # survives the float32 record
    with pytest.raises(ValueError, match="rank"):
        UserPrior.from_users(users, DIM + 1)
    with pytest.raises(ValueError, match="4096"):
        UserPrior.from_users(_population(dim=128), 64)


def test_a_skip_moves_the_mean_away_from_the_skipped_ad_and_a_click_toward_the_clicked_one():
    prior = UserPrior.from_users(_population(), RANK)
    user = _population(5)[0]
    ads = _ads()
    belief = prior_belief(user, prior)
    score = ads[:, :DIM] @ user + ads[:, DIM]
    skipped = update_belief(belief, prior, ads[:1], [0.0], [1.0])
    clicked = update_belief(belief, prior, ads[:1], [1.0], [1.0])
    assert ads[0, :DIM] @ skipped.mean + ads[0, DIM] < score[0] < ads[0, :DIM] @ clicked.mean + ads[0, DIM]
    # the move lies in the prior's subspace, and a skip seen with half the weight moves less
    move = skipped.mean - user
    np.testing.assert_allclose(prior.basis @ np.linalg.lstsq(prior.basis, move, rcond=None)[0], move, atol=1e-10)
    half = update_belief(belief, prior, ads[:1], [0.0], [0.5])
    assert 0 < np.linalg.norm(half.mean - user) < np.linalg.norm(move)
    # nothing to learn: unchanged
    assert update_belief(belief, prior, ads[:1], [0.0], [0.0]) is belief


def test_the_update_is_the_exact_laplace_step_and_sequential_batches_agree():
    prior = UserPrior.from_users(_population(), RANK)
    user = _population(5)[0]
    ads = _ads(n=30)
    rng = np.random.default_rng(3)
    clicked = (rng.random(30) < 0.3).astype(float)
    weights = np.where(clicked == 1, 1.0, rng.uniform(0.3, 1.0, 30))
    belief = update_belief(prior_belief(user, prior), prior, ads, clicked, weights)
    features = prior.scale * (ads[:, :DIM] @ prior.basis)
    base = prior.scale * (ads[:, :DIM] @ user + ads[:, DIM]) + prior.intercept

    def objective(delta):
        logits = base + features @ delta
        return 0.5 * delta @ delta + weights @ (np.logaddexp(0, logits) - clicked * logits)

    best = minimize(objective, np.zeros(RANK), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(belief.mean, user + prior.basis @ best, atol=1e-6)
    probability = expit(base + features @ best)
    hessian = np.eye(RANK) + (features * (weights * probability * (1 - probability))[:, None]).T @ features
    np.testing.assert_allclose(belief.factor @ belief.factor.T, hessian, atol=1e-6)  # BFGS finds delta to ~1e-7
    # two batches, one after the other, land near the one-batch answer (Laplace is exact for
    # the Gaussian part, approximate only through the logistic curvature)
    twice = update_belief(update_belief(prior_belief(user, prior), prior, ads[:15], clicked[:15], weights[:15]),
                          prior, ads[15:], clicked[15:], weights[15:])  # fmt: skip
    assert np.linalg.norm(twice.mean - belief.mean) < 0.05 * np.linalg.norm(belief.mean - user) + 1e-9
    # evidence shrinks the draws' spread
    assert np.trace(draw_spread(belief, prior) @ draw_spread(belief, prior).T) < np.trace(prior.basis @ prior.basis.T)


def test_the_record_round_trips_fits_4_kb_and_is_reset_under_another_basis():
    prior = UserPrior.from_users(_population(dim=128), 16)
    assert 4 * record_length(128, 16) == 1064
    user = _population(5, dim=128)[0]
    ads = np.hstack([np.random.default_rng(0).standard_normal((5, 128)) * 0.1, np.zeros((5, 1))])
    belief = update_belief(prior_belief(user, prior), prior, ads, [1, 0, 0, 0, 0], [1, 1, 1, 1, 1])
    record = belief_to_record(belief, prior)
    assert record.dtype == np.float32 and len(record) == record_length(128, 16)
    again = belief_from_record(record, user, prior)
    np.testing.assert_allclose(again.mean, belief.mean, rtol=1e-6)
    np.testing.assert_allclose(again.factor, belief.factor, rtol=1e-5)
    assert again.count == 5
    other = UserPrior.from_users(_population(9, dim=128), 16)
    reset = belief_from_record(record, user, other)  # another snapshot's basis: the mean stays, the doubt resets
    np.testing.assert_allclose(reset.mean, record[:128])
    np.testing.assert_array_equal(reset.factor, np.eye(16))
    ema_era = belief_from_record(user * 2, user, prior)  # a d-number EMA vector
    np.testing.assert_allclose(ema_era.mean, user * 2, rtol=1e-6)
    # the online store keeps the whole record, and refuses more than 4 KB
    store = MemoryStore("s", user_dim=128)
    pseudonym = "0" * 32
    store.update_user("space", pseudonym, lambda current: record)
    np.testing.assert_array_equal(store.get_user("space", pseudonym), record)
    with pytest.raises(ValueError, match="at most 1024"):
        store.update_user("space", pseudonym, lambda current: np.zeros(1025, np.float32))
    with pytest.raises(ValueError, match="shape"):
        store.update_user("space", pseudonym, lambda current: np.zeros(127, np.float32))


def _index(n: int = 60) -> NumpyIndex:
    ads = _ads(n=n)
    return NumpyIndex.build(
        [f"ad-{i}" for i in range(n)], ads[:, :DIM].astype(np.float32), ads[:, DIM].astype(np.float32)
    )


def test_thompson_draws_the_users_vector_and_logs_the_propensities_of_those_draws():
    index = _index()
    prior = UserPrior.from_users(_population(), RANK, spread=3.0)
    user = _population(5)[0].astype(np.float64)
    belief = prior_belief(user, prior)
    shared = LaplaceLogisticPosterior.prior(DIM)
    greedy = make_policy("greedy").recommend(user, index, 3, np.random.default_rng(0))
    still = ThompsonPolicy(posterior=shared, shared_scale=0.0, user_spread=np.zeros((DIM, RANK)))
    np.testing.assert_array_equal(still.recommend(user, index, 3, np.random.default_rng(0)).slots, greedy.slots)
    policy = ThompsonPolicy(posterior=shared, shared_scale=0.0, user_spread=draw_spread(belief, prior),
                            propensity_draws=400)  # fmt: skip
    slates = [policy.recommend(user, index, 3, np.random.default_rng(seed)) for seed in range(300)]
    first = np.array([s.slots[0] for s in slates])
    assert len(np.unique(first)) > 1  # the user's uncertainty explores
    top = np.bincount(first).argmax()
    logged = np.mean([s.propensities[0] for s in slates if s.slots[0] == top])
    assert abs(logged - np.mean(first == top)) < 0.08  # the logged propensity is the draws' frequency
    explored = np.array([s.explored[0] for s in slates])
    np.testing.assert_array_equal(explored, ~np.isin(first, greedy.slots))
    with pytest.raises(ValueError, match="user_spread"):
        ThompsonPolicy(posterior=shared, user_spread=np.zeros((DIM + 1, RANK))).recommend(
            user, index, 3, np.random.default_rng(0)
        )


@pytest.mark.parametrize("users", [1, 0], ids=["one user", "no users"])
def test_without_a_population_spread_a_click_still_moves_the_user(users):
    """A snapshot with fewer than two served users has no spread to learn a prior from: the
    prior falls back to an isotropic one (a zero basis would leave every user where they are)."""
    vectors = _population(n=max(users, 1))[:users]
    prior = UserPrior.from_users(vectors, RANK)
    assert np.any(prior.basis)
    ad = _ads(n=1)
    belief = prior_belief(np.zeros(DIM) if users == 0 else vectors[0].astype(np.float64), prior)
    moved = update_belief(belief, prior, ad, np.ones(1), np.ones(1))
    assert ad[0, :DIM] @ moved.mean > ad[0, :DIM] @ belief.mean
