"""A/B statistics (:mod:`adrec_assets.abtest.stats`): each statistic is checked against an
independent computation (bootstrap, closed form, numerical integration, or simulation)."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, stats
from statsmodels.stats.proportion import proportion_confint

from adrec_assets.abtest.stats import (
    RatioMoments,
    always_valid_p_values,
    contrast,
    cuped_theta,
    mixture_variance,
    msprt_log_likelihood_ratio,
    plan_users_per_arm,
    sample_ratio_mismatch,
    sequential_power,
)
from adrec_assets_tests.abtest_helpers import SyntheticPopulation

POPULATION = SyntheticPopulation()
CONFIDENCE = 0.99  # intervals for simulated rates: a seeded check fails only on a real defect


@cache
def pilot(seed: int = 100, users: int = 200_000, relative_lift: float = 0.0) -> tuple[float, float]:
    """CTR and per-user linearized variance from a large 'historical' sample."""
    moments = RatioMoments.of_users(*POPULATION.sample(np.random.default_rng(seed), users, relative_lift))
    return float(moments.ctr), float(moments.linearized_variance)


def rate_interval(successes: int, trials: int, method: str = "beta") -> tuple[float, float]:
    return proportion_confint(successes, trials, alpha=1 - CONFIDENCE, method=method)


# --- delta method ----------------------------------------------------------------------


def test_the_delta_method_standard_error_of_ctr_matches_a_bootstrap_over_users():
    rng = np.random.default_rng(1)
    impressions, clicks, _ = POPULATION.sample(rng, 3_000)
    delta_se = float(np.sqrt(RatioMoments.of_users(impressions, clicks).ctr_variance))
    resampled = np.random.default_rng(2).integers(0, 3_000, size=(2_000, 3_000))
    bootstrap_se = np.std(clicks[resampled].sum(axis=1) / impressions[resampled].sum(axis=1), ddof=1)
    # 2,000 replicates estimate an SE to ~1.6%; 7% is four of those.
    assert delta_se == pytest.approx(bootstrap_se, rel=0.07)
    # The binomial SE over impressions ignores that a user's impressions are correlated.
    naive_se = math.sqrt(clicks.sum() / impressions.sum() * (1 - clicks.sum() / impressions.sum()) / impressions.sum())
    assert naive_se < 0.8 * bootstrap_se


def test_lift_and_difference_standard_errors_match_a_bootstrap_within_arms():
    rng = np.random.default_rng(3)
    arms = [POPULATION.sample(rng, 3_000, lift) for lift in (0.0, 0.1)]
    result = contrast(*(RatioMoments.of_users(i, c) for i, c, _ in arms))
    boot = np.random.default_rng(4)
    ctrs = []
    for impressions, clicks, _ in arms:
        index = boot.integers(0, len(impressions), size=(2_000, len(impressions)))
        ctrs.append(clicks[index].sum(axis=1) / impressions[index].sum(axis=1))
    assert math.sqrt(result.diff_variance) == pytest.approx(np.std(ctrs[1] - ctrs[0], ddof=1), rel=0.07)
    assert math.sqrt(result.lift_variance) == pytest.approx(np.std(ctrs[1] / ctrs[0] - 1, ddof=1), rel=0.07)


# --- CUPED over simulated experiments -------------------------------------------------------


def _variance_interval(samples: np.ndarray) -> tuple[float, float]:
    """99.9% χ² interval for the variance of normal-ish estimates."""
    dof = len(samples) - 1
    s2 = np.var(samples, ddof=1)
    return dof * s2 / stats.chi2.ppf(0.9995, dof), dof * s2 / stats.chi2.ppf(0.0005, dof)


def test_plain_and_cuped_variances_match_the_spread_over_1000_simulated_experiments():
    rng = np.random.default_rng(7)
    control = POPULATION.look_moments(rng, 1_000, 2_000, 1)
    treatment = POPULATION.look_moments(rng, 1_000, 2_000, 1, relative_lift=0.1)
    plain = contrast(control, treatment)
    adjusted = contrast(control, treatment, cuped_theta([control, treatment]))
    for result in (plain, adjusted):
        low, high = _variance_interval(result.diff[:, 0])
        assert low <= np.mean(result.diff_variance) <= high
    # Same true difference (E[pre-clicks] is equal in both arms), smaller spread.
    standard_error = np.std(adjusted.diff) / math.sqrt(1_000)
    assert np.mean(adjusted.diff) == pytest.approx(np.mean(plain.diff), abs=4 * standard_error)
    assert np.var(adjusted.diff) < 0.9 * np.var(plain.diff)


def test_lift_intervals_cover_the_true_lift_95_percent_of_the_time_with_and_without_cuped():
    rng = np.random.default_rng(8)
    control = POPULATION.look_moments(rng, 1_000, 2_000, 1)
    treatment = POPULATION.look_moments(rng, 1_000, 2_000, 1, relative_lift=0.1)
    # The generator multiplies each user's CTR by 1.1 independently of impressions: true lift 0.1.
    for cuped in (None, cuped_theta([control, treatment])):
        low, high = contrast(control, treatment, cuped).lift_interval(0.05)
        covered = int(np.sum((low[:, 0] <= 0.1) & (0.1 <= high[:, 0])))
        lower, upper = rate_interval(covered, 1_000, method="wilson")
        assert lower <= 0.95 <= upper


# --- sample-ratio mismatch ------------------------------------------------------------------


def test_srm_is_the_chi_square_of_users_against_shares():
    check = sample_ratio_mismatch({"a": 505_000, "b": 495_000}, {"a": 0.5, "b": 0.5})
    assert check.chi2 == pytest.approx(2 * 5_000**2 / 500_000)
    assert check.p_value == pytest.approx(stats.chi2.sf(100.0, df=1))
    assert check.mismatch
    assert not sample_ratio_mismatch({"a": 500_000, "b": 500_000}, {"a": 0.5, "b": 0.5}).mismatch
    three = sample_ratio_mismatch({"a": 2_000, "b": 3_000, "c": 5_100}, {"a": 0.2, "b": 0.3, "c": 0.5})
    expected = np.array([0.2, 0.3, 0.5]) * 10_100
    assert three.chi2 == pytest.approx(np.sum((np.array([2_000, 3_000, 5_100]) - expected) ** 2 / expected))


def test_a_one_percent_imbalance_is_flagged_at_a_million_users_and_a_balanced_split_rarely():
    rng = np.random.default_rng(9)
    shares = {"control": 0.5, "treatment": 0.5}
    imbalanced = rng.binomial(1_000_000, 0.505, size=500)
    flagged = sum(
        sample_ratio_mismatch({"control": n, "treatment": 1_000_000 - n}, shares).mismatch for n in imbalanced
    )
    assert flagged == 500  # χ² ≈ 100 against a threshold of 10.8: a miss has probability < 1e-9
    balanced = rng.binomial(1_000_000, 0.5, size=20_000)
    chi2 = (balanced - 500_000) ** 2 / 250_000.0
    false_flags = int(np.sum(stats.chi2.sf(chi2, df=1) < 0.001))
    assert rate_interval(false_flags, 20_000)[0] <= 0.001 <= rate_interval(false_flags, 20_000)[1]


# --- always-valid inference ----------------------------------------------------------------


@pytest.mark.parametrize("estimate", [0.0, 1e-3, 4e-3, -2.5e-3])
def test_the_msprt_statistic_is_the_normal_mixture_likelihood_ratio(estimate):
    variance, tau2 = 1e-6, 1e-5

    def integrand(u: float) -> float:  # θ = τ u, so the prior is a standard normal in u
        theta = math.sqrt(tau2) * u
        return stats.norm.pdf(estimate, theta, math.sqrt(variance)) * stats.norm.pdf(u)

    mixture = integrate.quad(integrand, -12, 12, points=[estimate / math.sqrt(tau2)], limit=200)[0]
    expected = math.log(mixture / stats.norm.pdf(estimate, 0.0, math.sqrt(variance)))
    assert float(msprt_log_likelihood_ratio(estimate, variance, tau2)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "horizon_variance, prior_sd, alpha", [(1.0, 3.0, 0.05), (1e-6, 2e-3, 0.05), (1.0, 0.5, 0.01), (1.0, 30.0, 0.1)]
)
def test_the_mixture_variance_minimises_the_prior_expected_extra_time_to_reject(horizon_variance, prior_sd, alpha):
    threshold = math.sqrt(2 * horizon_variance * math.log(1 / alpha))
    detectable = 2 * stats.norm.sf(threshold / prior_sd)
    inverse_square = 2 * integrate.quad(lambda t: stats.norm.pdf(t, 0, prior_sd) / t**2, threshold, np.inf)[0]
    extra_time = lambda log_tau2: detectable * math.exp(-log_tau2) + inverse_square * log_tau2  # noqa: E731
    centre = math.log(prior_sd**2)
    best = optimize.minimize_scalar(
        extra_time, bounds=(centre - 30, centre + 30), method="bounded", options={"xatol": 1e-10}
    )
    assert mixture_variance(horizon_variance, prior_sd, alpha) == pytest.approx(math.exp(best.x), rel=1e-5)


def test_the_mixture_variance_tends_to_the_detectable_effect_when_the_prior_is_narrow():
    threshold_sq = 2 * math.log(20)
    assert mixture_variance(1.0, 1e-3, 0.05) == pytest.approx(threshold_sq, rel=1e-4)


def test_gaussian_streams_under_the_null_cross_alpha_at_most_alpha_of_the_time_over_100_looks():
    rng = np.random.default_rng(10)
    paths, looks = 20_000, 100
    information = np.arange(1, looks + 1) / looks
    sums = np.cumsum(rng.standard_normal((paths, looks)) * math.sqrt(1 / looks), axis=1)
    p = always_valid_p_values(sums / information, 1 / information, tau2=4.0, axis=1)
    assert np.all(np.diff(p, axis=1) <= 0)
    rejected = int(np.sum(p[:, -1] <= 0.05))
    assert rate_interval(rejected, paths)[1] <= 0.05
    # Peeking at a fixed-horizon z-test on the same paths rejects far more often.
    naive = int(np.sum(np.any(np.abs(sums / np.sqrt(information)) > 1.96, axis=1)))
    assert rate_interval(naive, paths)[0] > 0.2


def test_aa_tests_peeked_at_10_times_keep_the_msprt_under_5_percent_and_inflate_naive_z():
    ctr, variance = pilot()
    plan = plan_users_per_arm(ctr, variance, 0.3, test="sequential", looks=10)
    rng = np.random.default_rng(11)
    sims = 500
    control = POPULATION.look_moments(rng, sims, plan.users_per_arm, 10)
    treatment = POPULATION.look_moments(rng, sims, plan.users_per_arm, 10)
    result = contrast(control, treatment)
    always_valid = always_valid_p_values(result.diff, result.diff_variance, plan.sequential.tau2, axis=1)
    sequential_rejections = int(np.sum(always_valid[:, -1] <= 0.05))
    naive_rejections = int(np.sum(np.any(result.p_value <= 0.05, axis=1)))
    # Measured at this size with 4,000 sims: ~1.5% and ~20%. The 99% Clopper-Pearson bounds
    # make the claims "FPR ≤ 5%" and "peeking inflates it above 5%" at 99% confidence.
    assert rate_interval(sequential_rejections, sims)[1] <= 0.05
    assert rate_interval(naive_rejections, sims)[0] > 0.05


# --- power ------------------------------------------------------------------------------------


def test_the_fixed_horizon_plan_is_the_closed_form_sample_size():
    plan = plan_users_per_arm(0.03, 0.003, 0.1, alpha=0.05, power=0.8)
    delta = 0.1 * 0.03
    closed_form = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 * 0.003 * (1 + 1.1**2) / delta**2
    assert abs(plan.users_per_arm - closed_form) <= 1
    assert plan_users_per_arm(0.03, 0.003, 0.1, power=0.9).users_per_arm > plan.users_per_arm
    # An unknown treatment variance is taken as (1 + lift)² σ²: more users than a smaller known one.
    known = plan_users_per_arm(0.03, 0.003, 0.1, treatment_per_user_variance=0.003 * 1.1)
    assert known.users_per_arm < plan.users_per_arm


@pytest.mark.parametrize("test", ["fixed", "sequential"])
def test_simulated_users_at_the_planned_size_are_detected_at_the_planned_rate(test):
    ctr, variance = pilot()
    treatment_variance = pilot(seed=101, relative_lift=0.2)[1]
    plan = plan_users_per_arm(
        ctr, variance, 0.2, power=0.8, test=test, looks=10, treatment_per_user_variance=treatment_variance
    )
    rng = np.random.default_rng(12)
    sims, looks = 500, (10 if test == "sequential" else 1)
    control = POPULATION.look_moments(rng, sims, plan.users_per_arm, looks)
    treatment = POPULATION.look_moments(rng, sims, plan.users_per_arm, looks, relative_lift=0.2)
    result = contrast(control, treatment)
    if test == "sequential":
        detected = always_valid_p_values(result.diff, result.diff_variance, plan.sequential.tau2, axis=1)[:, -1] <= 0.05
    else:
        detected = result.p_value[:, -1] <= 0.05
    low, high = rate_interval(int(np.sum(detected)), sims, method="wilson")
    assert low <= 0.8 <= high


def test_the_sequential_plan_reaches_its_power_on_fresh_gaussian_paths():
    plan = plan_users_per_arm(0.03, 0.003, 0.1, test="sequential", looks=20, seed=0)
    fresh = sequential_power(plan.standardized_effect, 0.05, 20, simulations=100_000, seed=1)
    assert fresh == pytest.approx(0.8, abs=0.01)  # Monte Carlo error ~0.003 on each side


def test_the_sequential_test_needs_more_users_than_the_fixed_one_for_the_same_power():
    fixed = plan_users_per_arm(0.03, 0.003, 0.1, test="fixed")
    sequential = plan_users_per_arm(0.03, 0.003, 0.1, test="sequential", looks=20)
    assert 1.2 * fixed.users_per_arm < sequential.users_per_arm < 3 * fixed.users_per_arm
    assert sequential.sequential.horizon_users_per_arm == sequential.users_per_arm
    assert plan_users_per_arm(0.03, 0.003, 0.1, test="sequential", seed=0) == sequential


# --- determinism -------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_synthetic_users():
    first = POPULATION.table(np.random.default_rng(13), {"a": 100, "b": 100})
    second = POPULATION.table(np.random.default_rng(13), {"a": 100, "b": 100})
    pd.testing.assert_frame_equal(first, second)
    assert not first.equals(POPULATION.table(np.random.default_rng(14), {"a": 100, "b": 100}))
