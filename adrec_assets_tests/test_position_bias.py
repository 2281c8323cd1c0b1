"""Position-bias estimation (PBM): both estimators recover a planted theta, the weights are the
closed forms, and bad logs are rejected with errors that say what is wrong.

Logs are simulated from the PBM itself: ``P(click) = theta_k * sigmoid(relevance logit)``
with a relevance that depends on two features (the logged model score and the score bias).
Without randomization the slate is ordered by a noisy version of the model score, so
relevant ads sit at the top and the naive CTR ratio confounds position with relevance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from adrec_assets.online.position_bias import (
    PositionBias,
    click_weight,
    estimate_from_randomized,
    estimate_position_bias,
    estimate_regression_em,
    impression_weights,
    skip_weight,
    theta_given_relevance,
)

PLANTED_THETA = np.array([1.0, 0.6, 0.45, 0.35, 0.3])
SLATE = len(PLANTED_THETA)


def simulate_logs(n_requests: int, *, randomized: bool, seed: int, base_logit: float = -1.0) -> pd.DataFrame:
    """PBM click logs of ``n_requests`` slates of 5 (``5 * n_requests`` impressions)."""
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(n_requests, SLATE))
    bias = rng.normal(scale=0.5, size=(n_requests, SLATE))
    if randomized:
        order = np.argsort(rng.random((n_requests, SLATE)), axis=1)
    else:  # the logging model ranks by its score (plus noise it does not log)
        order = np.argsort(-(score + 0.5 * bias + rng.normal(size=score.shape)), axis=1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.broadcast_to(np.arange(SLATE), order.shape), axis=1)
    relevance = expit(base_logit + score + 0.8 * bias)
    clicked = rng.random(score.shape) < PLANTED_THETA[position] * relevance
    return pd.DataFrame(
        {
            "position": position.ravel(),
            "clicked": clicked.ravel().astype(np.int64),
            "randomized": np.full(position.size, randomized),
            "score": (score + 0.5 * bias).ravel(),  # the logged model score
            "score_bias": bias.ravel(),
        }
    )


def naive_ctr_ratio(logs: pd.DataFrame) -> np.ndarray:
    ctr = logs.groupby("position")["clicked"].mean().to_numpy()
    return ctr / ctr[0]


# --- the randomized slice ------------------------------------------------------------------


def test_randomized_ratio_recovers_planted_theta_within_10_percent_at_1e5_impressions():
    logs = simulate_logs(20_000, randomized=True, seed=1)
    estimate = estimate_from_randomized(logs)
    assert len(logs) == 100_000
    assert estimate.theta[0] == 1.0
    np.testing.assert_array_equal(estimate.impressions, np.full(SLATE, 20_000))
    np.testing.assert_array_equal(estimate.clicks, logs.groupby("position")["clicked"].sum().to_numpy())
    relative_error = np.abs(estimate.theta / PLANTED_THETA - 1)
    assert relative_error.max() <= 0.10, relative_error
    assert np.all((estimate.lower <= PLANTED_THETA) & (PLANTED_THETA <= estimate.upper))


def test_randomized_ratio_uses_only_the_randomized_rows():
    randomized = simulate_logs(4_000, randomized=True, seed=2)
    confounded = simulate_logs(40_000, randomized=False, seed=3)
    mixed = pd.concat([randomized, confounded], ignore_index=True)
    np.testing.assert_array_equal(estimate_from_randomized(mixed).theta, estimate_from_randomized(randomized).theta)


def test_randomized_ratio_delta_method_intervals_cover_at_the_nominal_rate():
    """Over independent replicates the 90% interval covers the planted theta ~90% of the time
    (400 replicates: the coverage's own standard error is 1.5 points)."""
    replicates = 400
    covered = np.zeros(SLATE - 1)
    for seed in range(replicates):
        estimate = estimate_from_randomized(simulate_logs(1_000, randomized=True, seed=1000 + seed), confidence=0.9)
        covered += (estimate.lower[1:] <= PLANTED_THETA[1:]) & (PLANTED_THETA[1:] <= estimate.upper[1:])
    coverage = covered / replicates
    assert np.all(np.abs(coverage - 0.9) <= 0.05), coverage


def test_randomized_interval_is_exp_of_the_delta_method_on_the_log_ratio():
    logs = pd.DataFrame(
        {
            "position": np.repeat([0, 1], [1000, 800]),
            "clicked": np.concatenate([np.repeat([1, 0], [200, 800]), np.repeat([1, 0], [80, 720])]),
            "randomized": True,
        }
    )
    estimate = estimate_from_randomized(logs, confidence=0.95)
    ratio = (80 / 800) / (200 / 1000)
    se_log = np.sqrt((1 - 0.1) / (800 * 0.1) + (1 - 0.2) / (1000 * 0.2))
    assert estimate.theta[1] == pytest.approx(ratio)
    assert estimate.lower[1] == pytest.approx(ratio * np.exp(-1.959964 * se_log), rel=1e-6)
    assert estimate.upper[1] == pytest.approx(ratio * np.exp(1.959964 * se_log), rel=1e-6)


# --- regression-EM -------------------------------------------------------------------------


def test_regression_em_recovers_planted_theta_within_10_percent_at_1e5_impressions_without_randomization():
    logs = simulate_logs(20_000, randomized=False, seed=4)
    naive_error = np.abs(naive_ctr_ratio(logs) / PLANTED_THETA - 1)
    assert naive_error.max() > 0.4  # the logs really are confounded: clicks alone mislead
    estimate = estimate_regression_em(logs, ["score", "score_bias"])
    assert estimate.converged and estimate.iterations < 500
    relative_error = np.abs(estimate.theta / PLANTED_THETA - 1)
    assert relative_error.max() <= 0.10, (estimate.theta, relative_error)


def test_theta_given_the_true_relevance_recovers_the_planted_theta_and_reads_that_relevance():
    """The simulator's floor: with each impression's relevance known, theta is a 1-d MLE per position."""
    rng = np.random.default_rng(11)
    n = 100_000
    position = rng.integers(0, SLATE, size=n)
    relevance = expit(rng.normal(-1.0, 1.0, size=n))
    logs = pd.DataFrame({"position": position, "clicked": (rng.random(n) < PLANTED_THETA[position] * relevance).astype(int),
                         "randomized": np.zeros(n, dtype=bool)})  # fmt: skip
    estimate = theta_given_relevance(logs, relevance)
    assert estimate.method == "known_relevance" and estimate.theta[0] == 1.0
    assert np.abs(estimate.theta / PLANTED_THETA - 1).max() <= 0.05, estimate.theta
    halved = theta_given_relevance(logs, relevance * np.where(position == 0, 1.0, 0.5))  # relevance misstated low
    assert (halved.theta[1:] > 1.5 * PLANTED_THETA[1:]).all()
    with pytest.raises(ValueError, match="one per impression"):
        theta_given_relevance(logs, relevance[:-1])


def test_regression_em_closed_form_and_conditional_mle_theta_steps_reach_the_same_fixed_point():
    """The paper's closed-form M-step and the ECME step are two routes to one MLE."""
    logs = simulate_logs(6_000, randomized=False, seed=14)
    paper = estimate_regression_em(logs, ["score", "score_bias"], theta_step="closed_form", tolerance=1e-8)
    ecme = estimate_regression_em(logs, ["score", "score_bias"], tolerance=1e-8)
    assert paper.converged and ecme.converged
    assert ecme.iterations < paper.iterations
    np.testing.assert_allclose(ecme.theta, paper.theta, atol=2e-5)


def test_regression_em_is_deterministic_and_its_sampled_variant_reproducible_by_seed():
    logs = simulate_logs(3_000, randomized=False, seed=5)
    first = estimate_regression_em(logs, ["score", "score_bias"], max_iterations=30)
    again = estimate_regression_em(logs, ["score", "score_bias"], max_iterations=30)
    np.testing.assert_array_equal(first.theta, again.theta)
    sampled = [
        estimate_regression_em(logs, ["score", "score_bias"], relevance_labels="sampled", seed=seed, max_iterations=30)
        for seed in (7, 7, 8)
    ]
    np.testing.assert_array_equal(sampled[0].theta, sampled[1].theta)
    assert not np.array_equal(sampled[0].theta, sampled[2].theta)


def test_regression_em_reports_non_convergence_when_iterations_run_out():
    logs = simulate_logs(3_000, randomized=False, seed=6)
    estimate = estimate_regression_em(logs, ["score"], max_iterations=2)
    assert estimate.iterations == 2 and not estimate.converged


# --- the shared weights --------------------------------------------------------------------


def test_click_weight_is_inverse_theta_capped():
    theta = np.array([1.0, 0.5, 0.05, 0.0])
    np.testing.assert_allclose(click_weight(np.array([0, 1, 2, 3]), theta, cap=10.0), [1.0, 2.0, 10.0, 10.0])
    assert click_weight(1, theta, cap=1.5) == 1.5


def test_skip_weight_is_the_pbm_posterior_of_examination_given_a_skip():
    theta = np.array([1.0, 0.4])
    relevance = 0.3
    # Bayes by enumeration: P(E=1, no click) = theta (1 - r); P(no click) = 1 - theta r.
    expected = 0.4 * (1 - relevance) / (0.4 * (1 - relevance) + (1 - 0.4))
    assert skip_weight(1, theta, relevance) == pytest.approx(expected)
    assert skip_weight(1, theta) == pytest.approx(0.4)
    assert skip_weight(0, theta, relevance) == pytest.approx(1.0)


@pytest.mark.parametrize("scheme, mean_relevance", [("examination", 0.25), ("ips", 0.01)])
def test_weighted_click_rate_at_every_position_estimates_relevance(scheme, mean_relevance):
    """Positions assigned at random, constant relevance r: the weighted CTR at each position is
    r (exactly consistent for "examination", for "ips" while r is small)."""
    rng = np.random.default_rng(9)
    n = 400_000
    position = rng.integers(SLATE, size=n)
    clicked = rng.random(n) < PLANTED_THETA[position] * mean_relevance
    weights = impression_weights(position, clicked, PLANTED_THETA, scheme=scheme, predicted_relevance=mean_relevance)
    for k in range(SLATE):
        at_k = position == k
        weighted_ctr = np.sum(weights[at_k] * clicked[at_k]) / np.sum(weights[at_k])
        n_examined_clicks = PLANTED_THETA[k] * mean_relevance * at_k.sum()
        tolerance = 4 * mean_relevance / np.sqrt(n_examined_clicks)  # 4 standard errors of a Poisson count
        assert abs(weighted_ctr - mean_relevance) <= tolerance, (k, weighted_ctr)


def test_impression_weights_follow_the_scheme():
    position = np.array([0, 1, 1, 2])
    clicked = np.array([1, 1, 0, 0])
    theta = np.array([1.0, 0.5, 0.25])
    np.testing.assert_allclose(impression_weights(position, clicked, theta), [1.0, 1.0, 0.5, 0.25])
    ips = impression_weights(position, clicked, theta, scheme="ips", cap=3.0)
    np.testing.assert_allclose(ips, [1.0, 2.0, 1.0, 1.0])


# --- bad input -----------------------------------------------------------------------------


def good_logs() -> pd.DataFrame:
    return pd.DataFrame(
        {"position": [0, 1, 0, 1], "clicked": [1, 0, 0, 1], "randomized": [True] * 4, "score": [0.1, 0.2, 0.3, 0.4]}
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: f.iloc[:0], "empty DataFrame"),
        (lambda f: f.drop(columns="clicked"), r"missing column\(s\) \['clicked'\]"),
        (lambda f: f.assign(position=[0, -1, 0, 1]), "negative position -1"),
        (lambda f: f.assign(position=[0.0, 1.0, 0.0, 1.0]), "position: expected integers"),
        (lambda f: f.assign(clicked=[1, 2, 0, 1]), r"clicked: expected 0/1 values, found \[2\]"),
        (lambda f: f.assign(randomized=[1, 1, 1, 1]), "randomized: expected bool"),
        (lambda f: f.assign(position=[0, 2, 0, 2]), r"no randomized impressions at position\(s\) \[1\]"),
        (lambda f: f.assign(randomized=False), "no randomized rows"),
        (lambda f: f.assign(clicked=[0, 1, 0, 1]), "no clicks at position 0"),
    ],
)
def test_randomized_estimator_rejects_bad_logs(mutate, match):
    with pytest.raises(ValueError, match=match):
        estimate_from_randomized(mutate(good_logs()))


@pytest.mark.parametrize(
    "kwargs, frame, match",
    [
        ({"feature_columns": []}, good_logs(), "feature_columns: regression-EM needs"),
        ({"feature_columns": ["nope"]}, good_logs(), r"missing column\(s\) \['nope'\]"),
        (
            {"feature_columns": ["score"]},
            good_logs().assign(score=[0.1, np.nan, 0.2, 0.3]),
            "score: feature columns must be finite",
        ),
        ({"feature_columns": ["score"], "max_iterations": 0}, good_logs(), "max_iterations"),
        ({"feature_columns": ["score"], "relevance_labels": "hard"}, good_logs(), "relevance_labels"),
        ({"feature_columns": ["score"], "theta_step": "newton"}, good_logs(), "theta_step"),
    ],
)
def test_regression_em_rejects_bad_input(kwargs, frame, match):
    with pytest.raises(ValueError, match=match):
        estimate_regression_em(frame, **kwargs)


def test_weights_reject_positions_beyond_theta_and_caps_below_one():
    with pytest.raises(ValueError, match=r"position: must lie in \[0, 1\]"):
        click_weight(np.array([0, 2]), np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match="cap: must be a finite number >= 1"):
        click_weight(0, np.array([1.0]), cap=0.5)
    with pytest.raises(ValueError, match="scheme: unknown weighting scheme"):
        impression_weights(np.array([0]), np.array([1]), np.array([1.0]), scheme="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clicked: expected 0/1"):
        impression_weights(np.array([0]), np.array([3]), np.array([1.0]))


# ---------------------------------------------------------------- what a snapshot publishes


def _served_log(n_slates: int, theta: np.ndarray, randomized_share: float, seed: int = 0):
    """A served event log (the service's parquet schema) from a planted PBM."""
    import pyarrow as pa

    from adrec_assets.online.events import EVENT_SCHEMA

    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_slates):
        randomized = bool(rng.random() < randomized_share)
        for position in range(len(theta)):
            relevance = rng.uniform(0.05, 0.35)
            base = {"event_id": f"r{s}:{position}", "request_id": f"r{s}", "user_pseudonym": "0" * 32,
                    "ad_id": f"ad-{rng.integers(100)}", "position": position, "timestamp": float(s),
                    "served_at": float(s), "policy": "greedy", "propensity": 1.0, "score": float(relevance),
                    "randomized": randomized, "experiments": "", "model_version": "s-x", "weight": 1.0}  # fmt: skip
            rows.append({**base, "type": "impression"})
            if rng.random() < theta[position] * relevance:
                rows.append({**base, "type": "click", "timestamp": float(s) + 0.5})
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def test_impressions_are_joined_with_their_clicks_one_row_per_served_position():
    from adrec_assets.online.events import impressions_with_outcomes

    log = _served_log(200, np.array([1.0, 0.5]), 0.0)
    table = impressions_with_outcomes(log)
    assert len(table) == 400 and set(table.columns) >= {"position", "clicked", "randomized", "score"}
    clicks = log.to_pandas().query("type == 'click'")
    assert int(table["clicked"].sum()) == len(clicks)
    lone_click = log.slice(0, 1).to_pandas().assign(type="click", request_id="only-click")
    import pyarrow as pa

    with_lone = pa.concat_tables([log, pa.Table.from_pandas(lone_click, schema=log.schema, preserve_index=False)])
    assert len(impressions_with_outcomes(with_lone)) == 401  # a click implies its impression


def test_the_published_estimate_uses_the_randomized_slice_then_em_then_none():
    from adrec_assets.online.events import impressions_with_outcomes

    theta = np.array([1.0, 0.6, 0.45, 0.35, 0.3])
    randomized = estimate_position_bias(impressions_with_outcomes(_served_log(6000, theta, 0.5)))
    assert randomized.method.startswith("randomized")
    em = estimate_position_bias(impressions_with_outcomes(_served_log(6000, theta, 0.0)))
    assert em.method.startswith("regression")
    for estimate in (randomized, em):
        np.testing.assert_allclose(estimate.theta, theta, rtol=0.2)
    none = estimate_position_bias(impressions_with_outcomes(_served_log(20, theta, 0.0)))
    assert none.method.startswith("none") and none.theta.tolist() == [1.0]
    back = PositionBias.from_arrays(randomized.to_arrays())
    np.testing.assert_array_equal(back.theta, randomized.theta)
    assert back.method == randomized.method
