"""Fresh ads' random effects: the 1-d Laplace update is exact, the folded index query plus
the exact scan of the fresh ads is still the exact Thompson top-K, a fresh ad far below
every slate gets explored only through its own effect, and the propensities remain the
probabilities the policy serves with.

References as in ``test_policy``: explicit scoring one ad at a time in float64, empirical
frequencies over seeded requests, ``scipy.optimize`` for the MAP.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import expit

from adrec_assets.online.fresh_ads import FreshAdEffects, effects_from_arrays, laplace_offsets
from adrec_assets.online.policy import make_policy
from adrec_assets.online.posterior import LaplaceLogisticPosterior, PolicyPosterior, ad_features
from adrec_assets.online.store import MemoryState, MemoryStore
from adrec_assets_tests.test_policy import (
    ExactIndex,
    explicit_top,
    learned_posterior,
    random_catalogue,
    served_frequencies,
    unit_rows,
    within_binomial_error,
)

K = 10
#: The exact-search tests check the uncapped Thompson top-k with the stored effects (the cap and
#: the effect sized to the query's spread are checked in test_fresh_share.py).
UNCAPPED = {"fresh_share": 1.0, "fresh_spread_prior": False}


pytestmark = pytest.mark.usefixtures("single_blas_thread")  # conftest: one BLAS thread for small matrices


def fresh_effects(index: ExactIndex, slots: np.ndarray, prior_sd: float, rng: np.random.Generator | None = None,
                  learnt_spread: float = 0.0) -> FreshAdEffects:  # fmt: skip
    """Effects for ``slots`` (ad ids ``ad-<slot>``); with ``learnt_spread`` each starts from its
    own (mean, precision), as if loaded from ``policy_posterior``."""
    learnt = {}
    if rng is not None and learnt_spread:
        learnt = {f"ad-{s}": (float(rng.normal(scale=learnt_spread)), float(rng.uniform(0.5, 4.0))) for s in slots}
    effects = FreshAdEffects(index.dim, prior_sd, learnt)
    effects.register([f"ad-{s}" for s in slots], slots, index.vectors(slots))
    return effects


def explicit_fresh_top(index: ExactIndex, user: np.ndarray, theta: np.ndarray, effects: FreshAdEffects,
                       draws: np.ndarray, k: int) -> np.ndarray:  # fmt: skip
    """Top-k by ``theta . phi(u, a) + r~_a`` (``r~_a`` = ``draws`` for the fresh ads, 0 else), in float64."""
    slots = index.live_slots()
    scores = ad_features(user, index.vectors(slots).astype(np.float64)) @ theta
    view = effects.view()
    at = np.searchsorted(slots, view.slots)
    scores[at] += draws
    return slots[np.argsort(-scores, kind="stable")[:k]]


# --- the update --------------------------------------------------------------------------


def test_laplace_offsets_are_each_ads_exact_map_and_curvature():
    rng = np.random.default_rng(0)
    n, groups = 3_000, 6
    group = rng.integers(groups, size=n)
    offsets = rng.normal(-2.0, 1.0, size=n)
    clicked = (rng.random(n) < expit(offsets + rng.normal(size=groups)[group])).astype(float)
    weights = rng.uniform(0.2, 1.0, size=n)
    mean, precision = rng.normal(size=groups), rng.uniform(0.5, 3.0, size=groups)
    new_mean, new_precision = laplace_offsets(group, offsets, clicked, weights, mean, precision)
    for g in range(groups):
        rows = group == g

        def negative_log_posterior(r: float, rows=rows, g=g) -> float:
            logits = offsets[rows] + r
            loglik = weights[rows] * (clicked[rows] * logits - np.logaddexp(0.0, logits))
            return -loglik.sum() + 0.5 * precision[g] * (r - mean[g]) ** 2

        reference = minimize_scalar(negative_log_posterior, bounds=(-10, 10), method="bounded",
                                    options={"xatol": 1e-10}).x  # fmt: skip
        assert new_mean[g] == pytest.approx(reference, abs=1e-6)
        p = expit(offsets[rows] + new_mean[g])
        assert new_precision[g] == pytest.approx(precision[g] + np.sum(weights[rows] * p * (1 - p)), rel=1e-9)


def test_a_lopsided_batch_still_reaches_the_exact_map():
    """All 2,000 impressions clicked at a base logit of -6, under a wide prior: a plain Newton
    step from 0 would overshoot by hundreds of logits."""
    n = 2_000
    groups, offsets = np.zeros(n, np.int64), np.full(n, -6.0)
    clicked, weights = np.ones(n), np.ones(n)
    mean, precision = laplace_offsets(groups, offsets, clicked, weights, np.zeros(1), np.full(1, 0.01))

    def negative_log_posterior(r: float) -> float:
        return -np.sum(offsets + r - np.logaddexp(0.0, offsets + r)) + 0.5 * 0.01 * r**2

    reference = minimize_scalar(negative_log_posterior, bounds=(-50, 50), method="bounded", options={"xatol": 1e-10}).x
    assert mean[0] == pytest.approx(reference, abs=1e-6)
    assert np.isfinite(precision[0]) and precision[0] > 0.01


def test_skips_lower_a_fresh_effect_clicks_raise_it_and_either_shrinks_its_uncertainty():
    index = ExactIndex(random_catalogue(10, 4, np.random.default_rng(1)))
    effects = fresh_effects(index, np.array([2, 5]), prior_sd=1.0)
    before = effects.view()
    learnt = effects.update(np.array([2, 2, 2, 5, 5, 7]), np.full(6, -1.0), np.array([0, 0, 0, 1, 1, 1]), np.ones(6))
    after = effects.view()
    assert learnt == 5  # slot 7 is a trained ad: no effect to learn
    assert after.mean[0] < 0 < after.mean[1]
    assert np.all(after.precision > before.precision)
    assert set(effects.learnt()) == {"ad-2", "ad-5"}


def test_a_batch_without_fresh_ads_changes_nothing_and_retired_fresh_ads_are_forgotten():
    index = ExactIndex(random_catalogue(10, 4, np.random.default_rng(2)))
    effects = fresh_effects(index, np.array([3, 4]), prior_sd=1.0)
    view = effects.view()
    assert effects.update(np.array([0, 1]), np.zeros(2), np.array([1, 0]), np.ones(2)) == 0
    assert effects.view() is view
    effects.remove(np.array([3]))
    assert effects.view().slots.tolist() == [4]


# --- sharing between replicas ---------------------------------------------------------


def _learn(effects: FreshAdEffects, slots: list[int], clicked: list[int]) -> None:
    effects.update(np.asarray(slots), np.full(len(slots), -1.0), np.asarray(clicked, dtype=float), np.ones(len(slots)))


def test_two_replicas_syncing_through_the_store_each_end_with_both_ones_learning_counted_once():
    """Precision and precision x mean of independent batches add up: each replica adds only
    what it learnt since its last sync, so neither overwrites the other (last-write-wins
    would keep one replica's data) and a restart from the stored value counts nothing twice."""
    index = ExactIndex(random_catalogue(10, 4, np.random.default_rng(3)))
    store, blob = MemoryStore("src", state=MemoryState()), "fresh-effects.users:test"
    first, second = fresh_effects(index, np.array([2, 5]), 1.0), fresh_effects(index, np.array([2, 5]), 1.0)
    prior = first.view().precision.copy()
    _learn(first, [2, 2, 2, 5], [0, 0, 0, 1])
    _learn(second, [2, 5, 5, 5, 5], [1, 0, 0, 0, 0])
    gains = [effects.view().precision - prior for effects in (first, second)]
    etas = [effects.view().precision * effects.view().mean for effects in (first, second)]
    assert first.sync(store, blob) == 0  # the blob was empty: it takes this replica's values as they are
    assert second.sync(store, blob) == 2
    first.sync(store, blob)
    expected_precision = prior + gains[0] + gains[1]
    expected_mean = (etas[0] + etas[1]) / expected_precision
    for effects in (first, second):
        np.testing.assert_allclose(effects.view().precision, expected_precision, rtol=1e-12)
        np.testing.assert_allclose(effects.view().mean, expected_mean, rtol=1e-12)
    stored = store.get_arrays(blob)
    assert second.sync(store, blob) == 0 and first.sync(store, blob) == 0  # nothing new: nothing moves
    assert all(np.array_equal(stored[key], value) for key, value in store.get_arrays(blob).items())
    restarted = FreshAdEffects(index.dim, 1.0, effects_from_arrays(stored)[0])  # a restart loads the stored values
    restarted.register(["ad-2", "ad-5"], np.array([2, 5]), index.vectors(np.array([2, 5])))
    assert restarted.sync(store, blob) == 0
    np.testing.assert_allclose(restarted.view().precision, expected_precision, rtol=1e-12)


def test_an_ad_another_replica_learnt_about_starts_there_and_a_retired_one_leaves_the_shared_blob():
    index = ExactIndex(random_catalogue(10, 4, np.random.default_rng(4)))
    store, blob = MemoryStore("src", state=MemoryState()), "fresh-effects.users:test"
    serving = fresh_effects(index, np.array([2, 5]), 1.0)
    _learn(serving, [2, 2, 5], [0, 0, 1])
    serving.sync(store, blob)
    late = FreshAdEffects(index.dim, 1.0)  # a replica that registers the ads only after a sync
    late.sync(store, blob)
    late.register(["ad-2", "ad-5"], np.array([2, 5]), index.vectors(np.array([2, 5])))
    np.testing.assert_array_equal(late.view().mean, serving.view().mean)
    serving.remove(np.array([2]))
    serving.sync(store, blob)
    assert store.get_arrays(blob)["ad_ids"].tolist() == ["ad-5"]
    serving.register(["ad-2"], np.array([2]), index.vectors(np.array([2])))  # the id reused: a new ad
    assert serving.view().precision[serving.view().rows_of(np.array([2]))[0]] == 1.0


def test_fresh_effects_refuse_a_negative_prior_and_mismatched_rows():
    with pytest.raises(ValueError, match="prior_sd"):
        FreshAdEffects(4, -0.1)
    effects = FreshAdEffects(4, 1.0)
    with pytest.raises(ValueError, match="do not agree"):
        effects.register(["a", "b"], np.array([0, 1]), np.zeros((2, 3), np.float32))


def test_a_zero_prior_sd_registers_nothing_so_thompson_serves_as_without_effects():
    rng = np.random.default_rng(3)
    index = ExactIndex(random_catalogue(500, 8, rng))
    effects = fresh_effects(index, np.arange(0, 500, 5), prior_sd=0.0)
    assert effects.view().count == 0
    posterior = learned_posterior(index, rng)
    user = unit_rows(rng.normal(size=8))
    plain = make_policy("thompson", posterior=posterior).recommend(user, index, K, np.random.default_rng(4))
    with_none = make_policy("thompson", posterior=posterior, fresh=effects, **UNCAPPED).recommend(
        user, index, K, np.random.default_rng(4)
    )
    np.testing.assert_array_equal(plain.slots, with_none.slots)
    np.testing.assert_array_equal(plain.propensities, with_none.propensities)


# --- serving -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 128])
def test_folded_query_plus_the_fresh_scan_is_the_exact_thompson_top_k_with_fresh_effects(dim):
    rng = np.random.default_rng(dim)
    index = ExactIndex(random_catalogue(3_000, dim, rng), retired=rng.choice(3_000, size=100, replace=False))
    fresh_slots = np.sort(rng.choice(index.live_slots(), size=300, replace=False))
    effects = fresh_effects(index, fresh_slots, prior_sd=1.0, rng=rng, learnt_spread=1.0)
    posterior = learned_posterior(index, rng)
    policy = make_policy("thompson", posterior=posterior, fresh=effects, **UNCAPPED)
    view = effects.view()
    fresh_served = differs_from_the_shared_draw = 0
    for trial in range(5):
        user = unit_rows(rng.normal(size=dim))
        generator = np.random.default_rng(trial)  # recommend draws theta~, then the fresh effects
        theta = posterior.sample(generator)
        draws = view.mean + view.sd() * generator.standard_normal(view.count)
        slate = policy.recommend(user, index, 20, np.random.default_rng(trial))
        np.testing.assert_array_equal(slate.slots, explicit_fresh_top(index, user, theta, effects, draws, 20))
        fresh_served += int(np.isin(slate.slots, fresh_slots).sum())
        differs_from_the_shared_draw += not np.array_equal(slate.slots, explicit_top(index, user, theta, 20))
    assert fresh_served >= 5 and differs_from_the_shared_draw >= 3  # the effects really change slates


def test_fresh_ads_crowding_the_index_results_never_hide_a_trained_ad():
    """The 60 fresh ads hold the top of every query but carry effects of -50: the trained
    ads below them must still be found (the index is searched deeper until k are trained)."""
    rng = np.random.default_rng(5)
    rows = random_catalogue(1_000, 8, rng)
    user = unit_rows(rng.normal(size=8))
    fresh_slots = np.arange(60)
    rows[fresh_slots, :8] = user  # the user's best ads under any positive draw
    rows[fresh_slots, 8] = 1.0
    index = ExactIndex(rows)
    effects = FreshAdEffects(8, 1.0, {f"ad-{s}": (-50.0, 1e6) for s in fresh_slots})
    effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, index.vectors(fresh_slots))
    posterior = LaplaceLogisticPosterior.prior(8)
    slate = make_policy("thompson", posterior=posterior, fresh=effects, **UNCAPPED).recommend(
        user, index, K, np.random.default_rng(6)
    )
    generator = np.random.default_rng(6)
    theta = posterior.sample(generator)
    draws = effects.view().mean + effects.view().sd() * generator.standard_normal(60)
    assert not np.isin(slate.slots, fresh_slots).any()
    np.testing.assert_array_equal(slate.slots, explicit_fresh_top(index, user, theta, effects, draws, K))


def test_a_fresh_ad_far_below_every_slate_is_explored_only_through_its_effect():
    rng = np.random.default_rng(7)
    index = ExactIndex(random_catalogue(400, 8, rng, bias_scale=0.0))
    user = unit_rows(rng.normal(size=8))
    worst = int(np.argsort(index.vectors(index.live_slots())[:, :8] @ user)[0])
    posterior = LaplaceLogisticPosterior.prior(8, weight_std=1e-3, bias_std=1e-3, intercept_std=1e-3)
    shown = {}
    for prior_sd in (0.0, 3.0):
        policy = make_policy(
            "thompson", posterior=posterior, fresh=fresh_effects(index, np.array([worst]), prior_sd), **UNCAPPED
        )
        generator = np.random.default_rng(8)
        shown[prior_sd] = sum(worst in policy.recommend(user, index, 5, generator).slots for _ in range(300))
    assert shown[0.0] == 0
    assert shown[3.0] >= 5


def test_thompson_with_zero_exploration_and_no_feedback_equals_greedy_with_fresh_ads():
    rng = np.random.default_rng(9)
    index = ExactIndex(random_catalogue(2_000, 16, rng))
    effects = fresh_effects(index, np.arange(0, 2_000, 4), prior_sd=2.0)
    posterior = learned_posterior(index, rng)
    thompson = make_policy("thompson", posterior=posterior, fresh=effects, exploration_scale=0.0, **UNCAPPED)
    greedy = make_policy("greedy", posterior=posterior)
    for trial in range(5):
        user = unit_rows(rng.normal(size=16))
        np.testing.assert_array_equal(
            thompson.recommend(user, index, K, np.random.default_rng(trial)).slots,
            greedy.recommend(user, index, K, np.random.default_rng(trial)).slots,
        )


def test_thompson_propensities_with_fresh_effects_match_brute_force_serving_frequencies():
    """40 ads, 15 of them fresh with wide effects; the candidates cover the catalogue, so only
    Monte Carlo noise separates the distribution from the served frequencies."""
    rng = np.random.default_rng(10)
    index = ExactIndex(random_catalogue(40, 4, rng))
    effects = fresh_effects(index, np.arange(0, 40, 3)[:15], prior_sd=1.5)
    posterior = LaplaceLogisticPosterior.prior(4, weight_std=0.5, bias_std=0.5)
    user = unit_rows(rng.normal(size=4))
    k, runs = 3, 3_000
    policy = make_policy("thompson", posterior=posterior, fresh=effects, propensity_candidates=40, **UNCAPPED)
    generator = np.random.default_rng(100)
    slates = [policy.recommend(user, index, k, generator) for _ in range(runs)]
    frequencies = served_frequencies(slates, 40, k)
    reference = make_policy("thompson", posterior=posterior, fresh=effects, propensity_candidates=40,
                            propensity_draws=200_000, **UNCAPPED)  # fmt: skip
    distribution = reference.position_distribution(user, index, k, np.random.default_rng(101))
    np.testing.assert_allclose(distribution.probabilities.sum(axis=0), 1.0)
    truth = np.zeros((40, k))
    truth[distribution.slots] = distribution.probabilities
    assert truth[effects.view().slots].sum() > 0.3 * k  # the fresh ads hold a real share of the slots
    within_binomial_error(frequencies, truth, runs)
    logged = np.concatenate([s.propensities for s in slates])
    cell_truth = np.concatenate([truth[s.slots, np.arange(k)] for s in slates])
    assert abs(np.mean(logged - cell_truth)) <= 0.01


# --- persistence -------------------------------------------------------------------------


def test_policy_posterior_round_trips_fresh_effects_and_reads_artifacts_written_before_them():
    posterior = LaplaceLogisticPosterior.prior(4)
    artifact = PolicyPosterior(posterior, "users:abc", 10, 2, {"ad-1": (-0.25, 3.5), "ad-9": (0.5, 1.25)}, 0.7)
    arrays = artifact.to_arrays()
    back = PolicyPosterior.from_arrays(arrays)
    assert back.fresh == artifact.fresh and back.fresh_prior_sd == 0.7
    older = PolicyPosterior.from_arrays({k: v for k, v in arrays.items() if not k.startswith("fresh__")})
    assert older.fresh == {} and older.n_clicks == 2


def test_replaying_a_log_learns_each_fresh_ads_effect_and_leaves_trained_ads_without_one():
    """The ``policy_posterior`` replay: fresh ad 0 is clicked far more often than the shared
    model predicts, fresh ad 1 never; ad 2 is a trained ad (no effect to learn)."""
    from adrec_assets.online.posterior import replay_posterior

    rng = np.random.default_rng(11)
    index = ExactIndex(random_catalogue(3, 4, rng))
    effects = fresh_effects(index, np.array([0, 1]), prior_sd=1.0)
    n = 6_000
    rows = rng.choice(3, size=n, p=[0.1, 0.1, 0.8])  # the shared model mostly sees the trained ad
    users = unit_rows(rng.normal(size=(n, 4)))
    clicked = np.where(rows == 0, rng.random(n) < 0.3, np.where(rows == 1, False, rng.random(n) < 0.02)).astype(float)
    replay_posterior(4, users, index.vectors(rows), clicked, np.zeros(n, np.int64), np.ones(1), chunk=1_000,
                     ad_rows=rows, fresh=effects)  # fmt: skip
    learnt = effects.learnt()
    assert set(learnt) == {"ad-0", "ad-1"}
    assert learnt["ad-0"][0] > 1.0 and learnt["ad-1"][0] < -1.0


def test_a_sharper_shared_model_widens_a_new_ads_prior_in_proportion():
    """The prior is set in score units: a posterior mean whose weights are twice the prior's
    doubles a newly registered ad's prior sd; ads registered earlier keep theirs."""
    from adrec_assets.online.posterior import score_scale

    prior = LaplaceLogisticPosterior.prior(8)
    assert score_scale(prior.mean()) == pytest.approx(1.0)
    sharper = prior.mean().copy()
    sharper[:-1] *= 2.0
    assert score_scale(sharper) == pytest.approx(2.0)
    index = ExactIndex(random_catalogue(4, 8, np.random.default_rng(12)))
    effects = FreshAdEffects(8, 1.5)
    effects.register(["early"], np.array([0]), index.vectors([0]), score_scale(prior.mean()))
    effects.register(["late"], np.array([1]), index.vectors([1]), score_scale(sharper))
    np.testing.assert_allclose(effects.view().sd(), [1.5, 3.0])
    assert effects.learnt() == {}  # both still at their own priors
    with pytest.raises(ValueError, match="scale"):
        effects.register(["bad"], np.array([2]), index.vectors([2]), 0.0)


def test_excluded_fresh_and_trained_ads_are_never_served_and_the_rest_is_the_exact_top_k():
    rng = np.random.default_rng(13)
    index = ExactIndex(random_catalogue(1_500, 16, rng))
    fresh_slots = np.sort(rng.choice(1_500, size=200, replace=False))
    effects = fresh_effects(index, fresh_slots, prior_sd=1.0, rng=rng, learnt_spread=1.0)
    posterior = learned_posterior(index, rng)
    user = unit_rows(rng.normal(size=16))
    generator = np.random.default_rng(14)
    theta = posterior.sample(generator)
    view = effects.view()
    first = view.mean + view.sd() * generator.standard_normal(view.count)
    fresh_scores = ad_features(user, view.vectors.astype(np.float64)) @ theta + first
    trained = np.setdiff1d(index.live_slots(), fresh_slots)
    trained_scores = ad_features(user, index.vectors(trained).astype(np.float64)) @ theta
    exclude = set(trained[np.argsort(-trained_scores)[:3]].tolist())  # the trained ads likeliest to be served
    exclude |= set(view.slots[np.argsort(-fresh_scores)[:3]].tolist())  # ... and the fresh ones
    assert exclude & set(fresh_slots.tolist()) and exclude - set(fresh_slots.tolist())  # both kinds excluded
    generator = np.random.default_rng(15)
    theta = posterior.sample(generator)
    kept = view.without(np.asarray(sorted(exclude)))
    draws = kept.mean + kept.sd() * generator.standard_normal(kept.count)
    slate = make_policy("thompson", posterior=posterior, fresh=effects, **UNCAPPED).recommend(
        user, index, K, np.random.default_rng(15), exclude
    )
    slots = index.live_slots()
    scores = ad_features(user, index.vectors(slots).astype(np.float64)) @ theta
    scores[np.searchsorted(slots, kept.slots)] += draws
    scores[np.searchsorted(slots, np.asarray(sorted(exclude)))] = -np.inf
    np.testing.assert_array_equal(slate.slots, slots[np.argsort(-scores, kind="stable")[:K]])
    assert not set(slate.slots.tolist()) & exclude
