"""Experiment reports (:mod:`adrec_assets.abtest.report`): the per-user table from events,
the report's numbers against a per-user linearization, a binomial interval and a
regression, its markdown and PNG, and the refusal of unusable tables."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from adrec_assets.abtest.report import analyze_experiment, look_tables, per_user_table
from adrec_assets.abtest.stats import AnalysisInputError, SequentialDesign
from adrec_assets_tests.abtest_helpers import SyntheticPopulation

POPULATION = SyntheticPopulation()


def direct_linearization(table: pd.DataFrame, arm: str) -> tuple[float, float, int]:
    """CTR and its delta-method variance computed per user, without RatioMoments."""
    rows = table[table["arm"] == arm]
    ctr = rows["clicks"].sum() / rows["impressions"].sum()
    linearized = (rows["clicks"] - ctr * rows["impressions"]) / rows["impressions"].mean()
    return ctr, linearized.var(ddof=1) / len(rows), len(rows)


# --- delta method in the report ----------------------------------------------------------


def test_with_one_impression_per_user_the_interval_is_the_binomial_one():
    clicks = (np.random.default_rng(5).random(5_000) < 0.04).astype(int)
    table = pd.DataFrame(
        {
            "user": [f"{i:032x}" for i in range(10_000)],
            "arm": ["a"] * 5_000 + ["b"] * 5_000,
            "impressions": 1,
            "clicks": np.concatenate([clicks, clicks[::-1]]),
            "pre_clicks": 0,
        }
    )
    report = analyze_experiment(table, {"a": 0.5, "b": 0.5})
    low, high = proportion_confint(clicks.sum(), 5_000, alpha=0.05, method="normal")
    # The delta method's ddof=1 variance differs from p(1-p)/n by n/(n-1) only.
    assert report.arms[0].ctr_ci == pytest.approx((low, high), rel=2e-4)


def test_the_report_matches_a_per_user_linearization_and_a_regression_for_cuped():
    rng = np.random.default_rng(6)
    table = POPULATION.table(rng, {"control": 4_000, "treatment": 4_000}, {"treatment": 0.1})
    report = analyze_experiment(table, {"control": 0.5, "treatment": 0.5}, experiment="exp")
    (c, var_c, _), (t, var_t, _) = direct_linearization(table, "control"), direct_linearization(table, "treatment")
    comparison = report.comparisons[0]
    z = stats.norm.ppf(0.975)
    assert comparison.diff == pytest.approx(t - c, rel=1e-9)
    half_width = z * math.sqrt(var_c + var_t)
    assert comparison.diff_ci == pytest.approx((t - c - half_width, t - c + half_width), rel=1e-9)
    assert comparison.p_value == pytest.approx(2 * stats.norm.sf(abs(t - c) / math.sqrt(var_c + var_t)), rel=1e-9)
    lift_se = math.sqrt(var_t / c**2 + t**2 * var_c / c**4)
    assert comparison.lift_ci == pytest.approx((t / c - 1 - z * lift_se, t / c - 1 + z * lift_se), rel=1e-9)
    # CUPED's pooled θ is the slope of L on W in a regression with one intercept per arm.
    linearized = np.empty(len(table))
    for arm in ("control", "treatment"):
        mask = (table["arm"] == arm).to_numpy()
        rows = table[mask]
        ctr = rows["clicks"].sum() / rows["impressions"].sum()
        linearized[mask] = (rows["clicks"] - ctr * rows["impressions"]) / rows["impressions"].mean()
    design = np.column_stack([table["pre_clicks"], table["arm"].eq("control"), table["arm"].eq("treatment")]).astype(
        float
    )
    theta = np.linalg.lstsq(design, linearized, rcond=None)[0][0]
    assert report.cuped_theta == pytest.approx(theta, rel=1e-9)
    pre_means = table.groupby("arm")["pre_clicks"].mean()
    expected_cuped_diff = t - c - theta * (pre_means["treatment"] - pre_means["control"])
    assert comparison.cuped_diff == pytest.approx(expected_cuped_diff, rel=1e-9)
    assert 0.1 < comparison.variance_reduction < 0.5


# --- events to table, report, errors -------------------------------------------------------------


def _events() -> pd.DataFrame:
    t0 = pd.Timestamp("2026-11-01T00:00:00Z")
    rows = [
        ("u1", "exp", "control", "impression", 0),
        ("u1", "exp", "control", "impression", 1),
        ("u1", "exp", "control", "click", 2),
        ("u2", "exp", "treatment", "impression", 3),
        ("u2", "exp", "treatment", "click", 30),
        ("u3", "exp", "treatment", "impression", 40),
        ("u1", "other", "b", "impression", 5),
    ]
    return pd.DataFrame(
        [(u, e, a, k, t0 + pd.Timedelta(minutes=m)) for u, e, a, k, m in rows],
        columns=["user", "experiment", "arm", "type", "timestamp"],
    )


def test_events_aggregate_into_one_row_per_user_with_pre_period_clicks():
    table = per_user_table(_events(), "exp", pre_clicks={"u1": 4})
    expected = pd.DataFrame(
        {
            "user": ["u1", "u2", "u3"],
            "arm": ["control", "treatment", "treatment"],
            "impressions": [2, 1, 1],
            "clicks": [1, 1, 0],
            "pre_clicks": [4, 0, 0],
        }
    )
    pd.testing.assert_frame_equal(table.reset_index(drop=True), expected, check_dtype=False)
    at_ten_minutes = look_tables(_events(), "exp", [pd.Timestamp("2026-11-01T00:10:00Z")])[0]
    assert at_ten_minutes["user"].tolist() == ["u1", "u2"] and at_ten_minutes["clicks"].tolist() == [1, 0]


def test_a_user_logged_in_two_arms_is_refused():
    events = pd.concat([_events(), _events().iloc[[0]].assign(arm="treatment")])
    with pytest.raises(AnalysisInputError, match="more than one arm"):
        per_user_table(events, "exp")


def test_the_report_renders_markdown_and_a_png_and_tracks_the_p_value_over_looks():
    rng = np.random.default_rng(15)
    table = POPULATION.table(rng, {"control": 3_000, "treatment": 3_000}, {"treatment": 0.15})
    looks = [table.groupby("arm").head(n) for n in (1_000, 2_000)]
    design = SequentialDesign.for_horizon(0.003, 3_000, 0.1 * 0.03)
    report = analyze_experiment(
        table, {"control": 0.5, "treatment": 0.5}, experiment="policy-thompson", sequential=design, looks=looks
    )
    comparison = report.comparisons[0]
    assert report.look_users == (2_000, 4_000, 6_000)
    assert len(comparison.always_valid_p_by_look) == 3
    assert list(comparison.always_valid_p_by_look) == sorted(comparison.always_valid_p_by_look, reverse=True)
    assert comparison.always_valid_p_value >= comparison.p_value  # the price of peeking safely
    text = report.markdown()
    assert "`policy-thompson`" in text and "| control | 3,000 |" in text and "| treatment | 3,000 |" in text
    assert f"{comparison.lift * 100:+.1f}%" in text and "Sample ratio" in text and "MISMATCH" not in text
    assert "given" in text
    picture = mpimg.imread(io.BytesIO(report.plot_png()), format="png")
    assert picture.shape[0] > 100 and picture.shape[1] > 500  # two panels side by side


def test_a_sample_ratio_mismatch_is_shouted_in_the_report():
    table = POPULATION.table(np.random.default_rng(16), {"control": 3_000, "treatment": 2_000})
    report = analyze_experiment(table, {"control": 0.5, "treatment": 0.5})
    assert report.srm.mismatch and "MISMATCH" in report.markdown()
    assert "post hoc" in report.markdown()


@pytest.mark.parametrize(
    "mutate, shares, message",
    [
        (lambda t: t.drop(columns="pre_clicks"), {"control": 0.5, "treatment": 0.5}, "pre_clicks"),
        (lambda t: t, {"control": 0.5, "other": 0.5}, r"column 'arm' has \['treatment'\]"),
        (lambda t: t.iloc[:-199], {"control": 0.5, "treatment": 0.5}, "arm 'treatment' has 1 users"),
        (lambda t: pd.concat([t, t.iloc[[0]]]), {"control": 0.5, "treatment": 0.5}, "column 'user' repeats"),
    ],
)
def test_unusable_tables_are_refused_with_the_experiment_and_column_named(mutate, shares, message):
    table = mutate(POPULATION.table(np.random.default_rng(17), {"control": 200, "treatment": 200}))
    with pytest.raises(AnalysisInputError, match=message) as raised:
        analyze_experiment(table, shares, experiment="exp-x")
    assert "experiment 'exp-x'" in str(raised.value)
