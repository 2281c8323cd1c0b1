"""Experiment reports: from logged events to a per-user table, and from that table to a
rendered analysis.

* :func:`per_user_table` aggregates exploded events (one row per event and experiment, see
  :func:`adrec_assets.online.experiments.explode_event_log`) into one row per user with
  impressions, clicks and pre-period clicks; :func:`look_tables` gives the table as it
  stood at each earlier look.
* :func:`analyze_experiment` runs the statistics of :mod:`adrec_assets.abtest.stats` on
  that table (delta-method CIs and lift, CUPED, sample-ratio check, always-valid p-values
  over the looks) and returns an :class:`ExperimentReport`, which renders itself as
  markdown and as a PNG.
* :class:`ExperimentReports` is the stored ``experiment_report`` artifact of a source.

No Dagster here: the pipeline's asset wraps :func:`analyze_experiment`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from adrec_assets.abtest.stats import (
    DEFAULT_ALPHA,
    AnalysisInputError,
    RatioMoments,
    SampleRatioCheck,
    SequentialDesign,
    always_valid_p_values,
    contrast,
    cuped_theta,
    sample_ratio_mismatch,
)
from adrec_assets.ml.types import Fields, artifact_type

REQUIRED_COLUMNS = ("user", "arm", "impressions", "clicks", "pre_clicks")
EVENT_COLUMNS = ("user", "experiment", "arm", "type", "timestamp")
EVENT_TYPES = ("impression", "click")


# --- from logged events to the per-user table ----------------------------------------------------


def per_user_table(
    events: pd.DataFrame, experiment: str, pre_clicks: Mapping[str, int] | pd.Series | None = None
) -> pd.DataFrame:
    """Per-user impressions and clicks of one experiment from exploded events (columns
    user, experiment, arm, type in {'impression', 'click'}, timestamp), plus the users'
    pre-period clicks (0 for users without any)."""
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise AnalysisInputError(
            f"experiment '{experiment}': event frame lacks columns {missing}; expected {list(EVENT_COLUMNS)}"
        )
    rows = events.loc[events["experiment"] == experiment]
    unknown = sorted(set(rows["type"].unique()) - set(EVENT_TYPES))
    if unknown:
        raise AnalysisInputError(
            f"experiment '{experiment}': column 'type' has {unknown}; only {list(EVENT_TYPES)} are counted. "
            "Filter other event types out first."
        )
    arms_per_user = rows.groupby("user")["arm"].nunique()
    switched = arms_per_user[arms_per_user > 1]
    if len(switched):
        raise AnalysisInputError(
            f"experiment '{experiment}': {len(switched)} users appear in more than one arm (e.g. "
            f"{switched.index[0]!r}); the assignment changed mid-experiment (salt or shares edited?). "
            "Analyse each configuration apart."
        )
    counts = (
        rows.assign(impression=rows["type"].eq("impression"), click=rows["type"].eq("click"))
        .groupby(["user", "arm"], sort=True)[["impression", "click"]]
        .sum()
        .rename(columns={"impression": "impressions", "click": "clicks"})
        .reset_index()
    )
    prior = pd.Series(dtype="int64") if pre_clicks is None else pd.Series(pre_clicks, dtype="int64")
    counts["pre_clicks"] = counts["user"].map(prior).fillna(0).astype("int64")
    return counts[list(REQUIRED_COLUMNS)].astype({"impressions": "int64", "clicks": "int64"})


def look_tables(
    events: pd.DataFrame,
    experiment: str,
    look_times: Sequence[pd.Timestamp],
    pre_clicks: Mapping[str, int] | pd.Series | None = None,
) -> list[pd.DataFrame]:
    """The per-user table as it stood at each look time (events strictly before it)."""
    return [per_user_table(events.loc[events["timestamp"] < t], experiment, pre_clicks) for t in look_times]


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    share: float
    users: int
    impressions: int
    clicks: int
    ctr: float
    ctr_se: float
    ctr_ci: tuple[float, float]


@dataclass(frozen=True)
class ArmComparison:
    arm: str
    control: str
    diff: float
    diff_ci: tuple[float, float]
    p_value: float
    lift: float
    lift_ci: tuple[float, float]
    cuped_diff: float
    cuped_diff_ci: tuple[float, float]
    cuped_lift: float
    cuped_lift_ci: tuple[float, float]
    cuped_p_value: float
    variance_reduction: float  # 1 - Var(CUPED diff) / Var(diff)
    always_valid_p_value: float
    always_valid_p_by_look: tuple[float, ...]


@dataclass(frozen=True)
class ArmSlots:
    """Exploration's cost in one arm: of its impressions logged with slot flags, the share on
    fresh ads and the share on exploratory slots (ads the posterior mean's top-k would not
    have shown), and the policies that served them."""

    arm: str
    policies: tuple[str, ...]
    impressions: int
    fresh_share: float
    explored_share: float


def slot_shares(events: pd.DataFrame, experiment: str, arms: Sequence[str]) -> tuple[ArmSlots, ...]:
    """Per arm of ``experiment``: the fresh and exploratory shares of its impressions, from
    the exploded served log (:func:`adrec_assets.online.experiments.explode_event_log`:
    columns arm, type, policy, fresh, explored). Impressions logged before the flags were
    (null) are left out; an arm without flagged impressions is left out; a log without the
    columns gives none."""
    if not {"arm", "type", "policy", "fresh", "explored"} <= set(events.columns):
        return ()
    rows = events.loc[(events["experiment"] == experiment) & events["type"].eq("impression")]
    rows = rows.loc[rows["fresh"].notna() & rows["explored"].notna()]
    out = []
    for arm in arms:
        flagged = rows.loc[rows["arm"] == arm]
        if len(flagged):
            out.append(ArmSlots(
                arm, tuple(sorted(flagged["policy"].dropna().unique().tolist())), len(flagged),
                float(flagged["fresh"].astype(bool).mean()), float(flagged["explored"].astype(bool).mean()),
            ))  # fmt: skip
    return tuple(out)


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    alpha: float
    control: str
    arms: tuple[ArmSummary, ...]
    comparisons: tuple[ArmComparison, ...]
    srm: SampleRatioCheck
    cuped_theta: float
    sequential: SequentialDesign
    sequential_design_source: str
    look_users: tuple[int, ...] = field(default=())
    slots: tuple[ArmSlots, ...] = field(default=())  # exploration's cost per arm (slot_shares)

    def markdown(self) -> str:
        level = f"{1 - self.alpha:.0%}"
        lines = [
            f"### Experiment `{self.experiment}` (control: `{self.control}`)",
            "",
            f"| arm | users | impressions | clicks | CTR ({level} CI) | lift ({level} CI) "
            f"| CUPED lift ({level} CI) | p-value | always-valid p |",
            "|---|---:|---:|---:|---|---|---|---:|---:|",
        ]
        by_arm = {c.arm: c for c in self.comparisons}
        for arm in self.arms:
            ctr = f"{_pct(arm.ctr, 3)} ({_pct(arm.ctr_ci[0], 3)} to {_pct(arm.ctr_ci[1], 3)})"
            comparison = by_arm.get(arm.arm)
            if comparison is None:
                rest = "— | — | — | —"
            else:
                rest = (
                    f"{_with_interval(comparison.lift, comparison.lift_ci)} | "
                    f"{_with_interval(comparison.cuped_lift, comparison.cuped_lift_ci)} | "
                    f"{_p(comparison.p_value)} | {_p(comparison.always_valid_p_value)}"
                )
            lines.append(f"| {arm.arm} | {arm.users:,} | {arm.impressions:,} | {arm.clicks:,} | {ctr} | {rest} |")
        srm = self.srm
        counts = " / ".join(f"{srm.users[a]:,}" for a in srm.users)
        expected = " / ".join(f"{s:g}" for s in srm.expected_shares.values())
        verdict = "**MISMATCH: users were lost unevenly; do not trust these results**" if srm.mismatch else "ok"
        lines += [
            "",
            f"Sample ratio: χ² = {srm.chi2:.2f}, p = {_p(srm.p_value)} (users {counts} against shares {expected}; "
            f"flagged below p = {srm.threshold:g}): {verdict}.",
        ]
        if self.comparisons:
            reductions = ", ".join(f"{c.arm} {c.variance_reduction:.1%}" for c in self.comparisons)
            lines.append(
                f"CUPED (pre-period clicks): θ = {self.cuped_theta:.4g}; "
                f"variance of the difference reduced by {reductions}."
            )
        lines.append(
            f"Always-valid p: mSPRT, normal mixture τ = {math.sqrt(self.sequential.tau2):.3g} (CTR units), "
            f"α = {self.sequential.alpha:g}, designed for {self.sequential.horizon_users_per_arm:,} users per arm "
            f"({self.sequential_design_source}); minimum over {max(len(self.look_users), 1)} look(s)."
        )
        if self.slots:
            lines += [
                "",
                "Exploration's cost (impressions logged with slot flags):",
                "",
                "| arm | policies | impressions | on fresh ads | exploratory |",
                "|---|---|---:|---:|---:|",
            ]
            for arm in self.slots:
                lines.append(
                    f"| {arm.arm} | {', '.join(arm.policies) or '—'} | {arm.impressions:,} | "
                    f"{_pct(arm.fresh_share, 1)} | {_pct(arm.explored_share, 1)} |"
                )
        return "\n".join(lines) + "\n"

    def plot_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with_looks = len(self.look_users) > 1 and bool(self.comparisons)
        figure, axes = plt.subplots(1, 2 if with_looks else 1, figsize=(10 if with_looks else 5.5, 3.6), squeeze=False)
        ctr_axis = axes[0][0]
        names = [a.arm for a in self.arms]
        ctrs = np.array([a.ctr for a in self.arms]) * 100
        errors = np.array([[a.ctr - a.ctr_ci[0], a.ctr_ci[1] - a.ctr] for a in self.arms]).T * 100
        ctr_axis.errorbar(names, ctrs, yerr=errors, fmt="o", capsize=6)
        ctr_axis.set_ylabel(f"CTR % ({1 - self.alpha:.0%} CI)")
        ctr_axis.set_title(f"{self.experiment}: CTR per arm")
        if with_looks:
            p_axis = axes[0][1]
            for comparison in self.comparisons:
                p_axis.plot(self.look_users, comparison.always_valid_p_by_look, marker=".", label=comparison.arm)
            p_axis.axhline(self.sequential.alpha, color="grey", linestyle="--", label=f"α = {self.sequential.alpha:g}")
            p_axis.set_yscale("log")
            p_axis.set_xlabel("users at look")
            p_axis.set_ylabel("always-valid p")
            p_axis.set_title("mSPRT p-value over looks")
            p_axis.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        return buffer.getvalue()


def analyze_experiment(
    table: pd.DataFrame,
    shares: Mapping[str, float],
    *,
    experiment: str = "experiment",
    control: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    sequential: SequentialDesign | None = None,
    looks: Sequence[pd.DataFrame] = (),
    default_prior_relative_lift: float = 0.05,
    slots: Sequence[ArmSlots] = (),
) -> ExperimentReport:
    """Full analysis of one experiment from its per-user table.

    ``shares`` are the configured arm shares (``Experiment.shares``); the control is the
    first arm unless named. ``looks`` are earlier snapshots of the table (e.g.
    :func:`look_tables`) in time order; the always-valid p-value is the minimum over them
    and the final table. ``sequential`` should be the design fixed when the experiment was
    planned (:func:`plan_users_per_arm`); without it a design is derived from this data
    (horizon = current users per arm, prior sd = ``default_prior_relative_lift`` × control
    CTR) and the report says so: fine for a single final look, not for a mixture that moves
    with every peek. ``slots``: each arm's fresh and exploratory shares (:func:`slot_shares`),
    shown beside the analysis."""
    arms = list(shares)
    control = arms[0] if control is None else control
    if control not in shares:
        raise AnalysisInputError(f"experiment '{experiment}': control arm '{control}' is not among the arms {arms}")
    moments = _arm_moments(table, arms, experiment)
    summaries = tuple(_summary(name, shares[name], m, alpha) for name, m in moments.items())
    srm = sample_ratio_mismatch({name: int(m.n) for name, m in moments.items()}, shares)
    theta, covariate_mean = cuped_theta(list(moments.values()))
    source = "given"
    if sequential is None:
        control_moments = moments[control]
        users_per_arm = int(round(sum(int(m.n) for m in moments.values()) / len(moments)))
        sequential = SequentialDesign.for_horizon(
            float(control_moments.linearized_variance),
            users_per_arm,
            default_prior_relative_lift * float(control_moments.ctr),
            alpha,
        )
        source = "derived post hoc from this data"
    snapshots = [_arm_moments(t, arms, f"{experiment} (look {i + 1})") for i, t in enumerate(looks)] + [moments]
    look_users = tuple(int(sum(m.n for m in snapshot.values())) for snapshot in snapshots)
    comparisons = []
    for name in arms:
        if name == control:
            continue
        plain = contrast(moments[control], moments[name])
        adjusted = contrast(moments[control], moments[name], (theta, covariate_mean))
        per_look = [contrast(s[control], s[name]) for s in snapshots]
        running = always_valid_p_values(
            np.array([c.diff for c in per_look], dtype=float),
            np.array([c.diff_variance for c in per_look], dtype=float),
            sequential.tau2,
        )
        comparisons.append(
            ArmComparison(
                arm=name,
                control=control,
                diff=float(plain.diff),
                diff_ci=_pair(plain.diff_interval(alpha)),
                p_value=float(plain.p_value),
                lift=float(plain.lift),
                lift_ci=_pair(plain.lift_interval(alpha)),
                cuped_diff=float(adjusted.diff),
                cuped_diff_ci=_pair(adjusted.diff_interval(alpha)),
                cuped_lift=float(adjusted.lift),
                cuped_lift_ci=_pair(adjusted.lift_interval(alpha)),
                cuped_p_value=float(adjusted.p_value),
                variance_reduction=float(1.0 - adjusted.diff_variance / plain.diff_variance),
                always_valid_p_value=float(running[-1]),
                always_valid_p_by_look=tuple(float(p) for p in running),
            )
        )
    return ExperimentReport(
        experiment=experiment,
        alpha=alpha,
        control=control,
        arms=summaries,
        comparisons=tuple(comparisons),
        srm=srm,
        cuped_theta=float(theta),
        sequential=sequential,
        sequential_design_source=source,
        look_users=look_users,
        slots=tuple(slots),
    )


def _arm_moments(table: pd.DataFrame, arms: Sequence[str], experiment: str) -> dict[str, RatioMoments]:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise AnalysisInputError(
            f"experiment '{experiment}': per-user table lacks columns {missing}; expected {list(REQUIRED_COLUMNS)} "
            "(pre_clicks = 0 for users without pre-period data); per_user_table() builds it from events"
        )
    if table["user"].duplicated().any():
        user = table.loc[table["user"].duplicated(), "user"].iloc[0]
        raise AnalysisInputError(
            f"experiment '{experiment}': column 'user' repeats {user!r}; the table needs one row per user "
            "(a user in two arms means the assignment changed mid-experiment)"
        )
    unknown = sorted(set(table["arm"].unique()) - set(arms))
    if unknown:
        raise AnalysisInputError(
            f"experiment '{experiment}': column 'arm' has {unknown}, not in the configured arms {list(arms)}; "
            "analyse with the experiment's own shares"
        )
    numbers = table[["impressions", "clicks", "pre_clicks"]]
    if numbers.isna().any().any() or (numbers < 0).any().any():
        raise AnalysisInputError(
            f"experiment '{experiment}': impressions, clicks and pre_clicks must be non-negative counts with no gaps"
        )
    moments = {}
    for name in arms:
        rows = table.loc[table["arm"] == name]
        if len(rows) < 2 or rows["impressions"].sum() == 0:
            raise AnalysisInputError(
                f"experiment '{experiment}': arm '{name}' has {len(rows)} users and {int(rows['impressions'].sum())} "
                "impressions; a ratio's variance needs at least 2 users with impressions. Wait for more traffic."
            )
        moments[name] = RatioMoments.of_users(
            rows["impressions"].to_numpy(), rows["clicks"].to_numpy(), rows["pre_clicks"].to_numpy()
        )
    return moments


def _summary(name: str, share: float, m: RatioMoments, alpha: float) -> ArmSummary:
    se = float(np.sqrt(m.ctr_variance))
    half = float(stats.norm.ppf(1.0 - alpha / 2.0)) * se
    ctr = float(m.ctr)
    return ArmSummary(name, float(share), int(m.n), int(m.x), int(m.y), ctr, se, (ctr - half, ctr + half))


def _pair(values: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _pct(value: float, digits: int) -> str:
    return f"{value * 100:.{digits}f}%"


def _signed_pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    return f"{_signed_pct(value)} ({_signed_pct(interval[0])} to {_signed_pct(interval[1])})"


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


@artifact_type("experiment_report")
@dataclass(eq=False)
class ExperimentReports:
    """The ``experiment_report`` artifact of a source: every experiment's report as markdown,
    its per-arm figures, and the sequential design each experiment's first report fixed
    (later reports reuse it, so that the always-valid p-value stays valid at every look)."""

    markdown: str
    designs: dict[str, SequentialDesign]
    figures: list[dict[str, float | str]]

    def to_arrays(self) -> dict[str, np.ndarray]:
        import json
        from dataclasses import asdict

        return {
            "markdown": np.asarray(self.markdown),
            "designs": np.asarray(json.dumps({k: asdict(v) for k, v in self.designs.items()}, sort_keys=True)),
            "figures": np.asarray(json.dumps(self.figures, sort_keys=True)),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ExperimentReports:
        f = Fields(arrays, cls.type_tag)
        designs = {name: SequentialDesign(**values) for name, values in f.json("designs").items()}
        return cls(f.text("markdown"), designs, list(f.json("figures")))


def report_figures(report: ExperimentReport) -> list[dict[str, float | str]]:
    """Flat per-arm numbers of a report (for metadata and the stored artifact)."""
    by_arm = {c.arm: c for c in report.comparisons}
    slots = {a.arm: a for a in report.slots}
    out = []
    for arm in report.arms:
        row: dict[str, float | str] = {
            "experiment": report.experiment, "arm": arm.arm, "users": arm.users, "impressions": arm.impressions,
            "clicks": arm.clicks, "ctr": arm.ctr, "ctr_low": arm.ctr_ci[0], "ctr_high": arm.ctr_ci[1],
            "srm_p_value": report.srm.p_value,
        }  # fmt: skip
        comparison = by_arm.get(arm.arm)
        if comparison is not None:
            row.update(lift=comparison.lift, lift_low=comparison.lift_ci[0], lift_high=comparison.lift_ci[1],
                       cuped_lift=comparison.cuped_lift, p_value=comparison.p_value,
                       always_valid_p_value=comparison.always_valid_p_value)  # fmt: skip
        if arm.arm in slots:
            row.update(fresh_share=slots[arm.arm].fresh_share, explored_share=slots[arm.arm].explored_share)
        out.append(row)
    return out
