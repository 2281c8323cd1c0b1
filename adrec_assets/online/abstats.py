"""A/B statistics for the click-through rate, with users as the randomization unit.

CTR = Σclicks / Σimpressions over an arm's users is a *ratio* metric: impressions of one
user are not independent draws, so the binomial standard error over impressions is too
small. Everything here is a function of per-arm sums over users (:class:`RatioMoments`),
which keeps the formulas in one place and lets simulations evaluate thousands of
experiments at once on arrays.

Methods and sources
-------------------
* **Delta method** for the CTR, the absolute difference and the relative lift
  (Deng, Knoblich, Lu, "Applying the Delta Method in Metric Analytics", KDD 2018). With
  R = ΣY/ΣX the per-user linearization is ``L_i = (Y_i - R X_i) / mean(X)`` and
  ``Var(CTR) ≈ Var(L) / n``. The relative lift T/C - 1 of two independent arms has
  ``Var ≈ Var(T)/C² + T² Var(C)/C⁴``.
* **CUPED** (Deng, Xu, Kohavi, Walker, WSDM 2013) with the user's pre-experiment clicks W
  as covariate, applied to the ratio through its linearization: ``CTR_adj = CTR -
  θ (mean(W) - pooled mean(W))`` with θ = Cov(L, W) / Var(W) pooled over the arms' within-arm
  sums; ``Var(CTR_adj) ≈ Var(L - θ W) / n``.
* **Sample-ratio mismatch**: χ² goodness of fit of user counts against the configured
  shares (``scipy.stats.chisquare``), flagged at p < 0.001.
* **Always-valid p-values**: the mixture SPRT with a normal mixture (Johari, Koomen,
  Pekelis, Walsh, "Peeking at A/B Tests", KDD 2017; "Always Valid Inference", Operations
  Research 2022) on the difference θ̂ of the arms' CTRs (the difference of the means of
  the linearized metric) with plug-in variance V = Var_T(L)/n_T + Var_C(L)/n_C::

      Λ = sqrt(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²)))

  and p = min over looks of min(1, 1/Λ). τ² is fixed before the experiment from the
  planned horizon, see :func:`mixture_variance`.
* **Power**: users per arm for a relative lift, for the fixed-horizon delta-method z-test
  (``statsmodels NormalIndPower``) or for the mSPRT (seeded simulation of the Gaussian
  look process, see :func:`plan_users_per_arm`).

No Dagster here: the pipeline's asset wraps :func:`analyze_experiment`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special, stats
from statsmodels.stats.power import NormalIndPower

from adrec_assets.ml.types import Fields, artifact_type

DEFAULT_ALPHA = 0.05
SRM_P_THRESHOLD = 0.001
REQUIRED_COLUMNS = ("user", "arm", "impressions", "clicks", "pre_clicks")
EVENT_COLUMNS = ("user", "experiment", "arm", "type", "timestamp")
EVENT_TYPES = ("impression", "click")


class AnalysisInputError(ValueError):
    """The data handed to the analysis cannot be analysed as given; the message says why
    and what to do."""


# --- sufficient statistics ---------------------------------------------------------------


@dataclass(frozen=True)
class RatioMoments:
    """Sums over an arm's users of X = impressions, Y = clicks, W = pre-period clicks and
    their products. Fields may be arrays of any common shape (e.g. simulations x looks)."""

    n: np.ndarray
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    ww: np.ndarray
    xy: np.ndarray
    xw: np.ndarray
    yw: np.ndarray

    @classmethod
    def of_users(
        cls,
        impressions: np.ndarray,
        clicks: np.ndarray,
        pre_clicks: np.ndarray | None = None,
        axis: int = -1,
    ) -> RatioMoments:
        """Sum per-user values along ``axis`` (the user axis)."""
        x = np.asarray(impressions, dtype=np.float64)
        y = np.asarray(clicks, dtype=np.float64)
        w = np.zeros_like(x) if pre_clicks is None else np.asarray(pre_clicks, dtype=np.float64)

        def total(values: np.ndarray) -> np.ndarray:
            return np.sum(values, axis=axis)

        return cls(
            n=total(np.ones_like(x)), x=total(x), y=total(y), w=total(w),
            xx=total(x * x), yy=total(y * y), ww=total(w * w),
            xy=total(x * y), xw=total(x * w), yw=total(y * w),
        )

    def cumsum(self, axis: int = -1) -> RatioMoments:
        """Running totals along ``axis``: batch sums become the data seen at each look."""
        return RatioMoments(**{name: np.cumsum(getattr(self, name), axis=axis) for name in self.__dataclass_fields__})

    @property
    def ctr(self) -> np.ndarray:
        return self.y / self.x

    @property
    def mean_impressions(self) -> np.ndarray:
        return self.x / self.n

    @property
    def mean_covariate(self) -> np.ndarray:
        return self.w / self.n

    def _centered(self) -> dict[str, np.ndarray]:
        n = self.n
        return {
            "xx": self.xx - self.x * self.x / n,
            "yy": self.yy - self.y * self.y / n,
            "ww": self.ww - self.w * self.w / n,
            "xy": self.xy - self.x * self.y / n,
            "xw": self.xw - self.x * self.w / n,
            "yw": self.yw - self.y * self.w / n,
        }

    def linearized_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centred sums of squares S_LL, S_LW, S_WW of L = (Y - R X)/mean(X) and W."""
        c = self._centered()
        r, xbar = self.ctr, self.mean_impressions
        s_ll = (c["yy"] - 2.0 * r * c["xy"] + r * r * c["xx"]) / (xbar * xbar)
        s_lw = (c["yw"] - r * c["xw"]) / xbar
        return np.maximum(s_ll, 0.0), s_lw, np.maximum(c["ww"], 0.0)

    @property
    def linearized_variance(self) -> np.ndarray:
        """Per-user variance of L (ddof 1): the σ² that sample sizes are planned with."""
        return self.linearized_sums()[0] / (self.n - 1.0)

    @property
    def ctr_variance(self) -> np.ndarray:
        """Delta-method variance of the arm's CTR."""
        return self.linearized_variance / self.n

    def adjusted_ctr(self, theta: np.ndarray, covariate_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CUPED-adjusted CTR and its variance for a given θ and pooled covariate mean."""
        s_ll, s_lw, s_ww = self.linearized_sums()
        per_user = np.maximum(s_ll - 2.0 * theta * s_lw + theta * theta * s_ww, 0.0) / (self.n - 1.0)
        return self.ctr - theta * (self.mean_covariate - covariate_mean), per_user / self.n


def cuped_theta(arms: Sequence[RatioMoments]) -> tuple[np.ndarray, np.ndarray]:
    """θ = Cov(L, W)/Var(W) from within-arm sums pooled over the arms (so the treatment
    effect does not leak into θ), and the pooled covariate mean every arm is centred on.
    θ is 0 where the covariate does not vary (no pre-period data)."""
    s_lw = sum(arm.linearized_sums()[1] for arm in arms)
    s_ww = sum(arm.linearized_sums()[2] for arm in arms)
    theta = np.divide(s_lw, s_ww, out=np.zeros_like(np.asarray(s_lw, dtype=float)), where=np.asarray(s_ww) > 0)
    covariate_mean = sum(arm.w for arm in arms) / sum(arm.n for arm in arms)
    return theta, covariate_mean


@dataclass(frozen=True)
class Contrast:
    """Treatment vs control: absolute difference and relative lift with delta-method
    variances. Fields may be arrays (simulations)."""

    control_ctr: np.ndarray
    treatment_ctr: np.ndarray
    diff: np.ndarray
    diff_variance: np.ndarray
    lift: np.ndarray
    lift_variance: np.ndarray

    @property
    def z(self) -> np.ndarray:
        return self.diff / np.sqrt(self.diff_variance)

    @property
    def p_value(self) -> np.ndarray:
        return 2.0 * stats.norm.sf(np.abs(self.z))

    def diff_interval(self, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
        half = stats.norm.ppf(1.0 - alpha / 2.0) * np.sqrt(self.diff_variance)
        return self.diff - half, self.diff + half

    def lift_interval(self, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
        half = stats.norm.ppf(1.0 - alpha / 2.0) * np.sqrt(self.lift_variance)
        return self.lift - half, self.lift + half


def contrast(
    control: RatioMoments,
    treatment: RatioMoments,
    cuped: tuple[np.ndarray, np.ndarray] | None = None,
) -> Contrast:
    """Delta-method contrast; with ``cuped=(θ, pooled covariate mean)`` the CUPED one."""
    if cuped is None:
        c, var_c = control.ctr, control.ctr_variance
        t, var_t = treatment.ctr, treatment.ctr_variance
    else:
        c, var_c = control.adjusted_ctr(*cuped)
        t, var_t = treatment.adjusted_ctr(*cuped)
    return Contrast(
        control_ctr=c,
        treatment_ctr=t,
        diff=t - c,
        diff_variance=var_t + var_c,
        lift=t / c - 1.0,
        lift_variance=var_t / (c * c) + t * t * var_c / c**4,
    )


# --- always-valid inference ----------------------------------------------------------------


def mixture_variance(horizon_variance: float, effect_prior_sd: float, alpha: float = DEFAULT_ALPHA) -> float:
    """τ² of the normal mixture, chosen for the planned horizon.

    Inputs: V_M, the variance of the estimated difference at the planned horizon (M users
    per arm), and s, the prior sd of the true difference θ ~ N(0, s²) (in the same units).
    Returns ``τ² = s² Φ(-b) / (φ(b)/b - Φ(-b))`` with ``b = c / s`` and
    ``c = sqrt(2 V_M log(1/α))``.

    Why this τ²: with information I = 1/V and θ̂ ≈ θ,
    ``log Λ ≈ θ² I/2 - θ²/(2τ²) - ½ log(τ² I)``, so reaching log(1/α) takes extra
    information ∝ 1/τ² + log(τ²)/θ² beyond the oracle's. Only effects with |θ| > c can be
    detected by the horizon (θ² I_M / 2 > log 1/α). Minimising the prior expectation of that
    extra time over those effects gives τ² = P(|θ|>c) / E[θ⁻² 1{|θ|>c}], and for a normal
    prior ∫_b^∞ φ(z)/z² dz = φ(b)/b - Φ(-b) yields the formula. This is the form of the
    mixing variance Johari et al. recommend for a test truncated at a maximum sample size
    (KDD 2017; Operations Research 2022); the derivation here is ours, so b is stated
    explicitly (public ports such as R mixtureSPRT::calcTau use b = 2 log(1/α)/sqrt(M σ²)
    on a standardized scale). Limits: τ² → c² when the prior sits below what the horizon can
    detect, and τ² ≈ 1.25 s c when it is much wider. τ² must be fixed before data arrive:
    Λ is a martingale under H0 only for a mixture that does not move with the data.
    """
    if not (horizon_variance > 0 and effect_prior_sd > 0 and 0 < alpha < 1):
        raise AnalysisInputError(
            f"mixture_variance needs positive horizon variance and prior sd and 0 < alpha < 1; got "
            f"V_M={horizon_variance!r}, s={effect_prior_sd!r}, alpha={alpha!r}"
        )
    threshold = math.sqrt(2.0 * horizon_variance * math.log(1.0 / alpha))
    b = threshold / effect_prior_sd
    mills = math.sqrt(math.pi / 2.0) * float(special.erfcx(b / math.sqrt(2.0)))  # Φ(-b)/φ(b), stable
    return effect_prior_sd**2 * mills / (1.0 / b - mills)


def msprt_log_likelihood_ratio(estimate: np.ndarray, variance: np.ndarray, tau2: float) -> np.ndarray:
    """log Λ of the normal-mixture SPRT for H0: θ = 0, given θ̂ ~ N(θ, V)."""
    estimate, variance = np.asarray(estimate, dtype=float), np.asarray(variance, dtype=float)
    total = variance + tau2
    return 0.5 * np.log(variance / total) + estimate * estimate * tau2 / (2.0 * variance * total)


def always_valid_p_values(estimates: np.ndarray, variances: np.ndarray, tau2: float, axis: int = -1) -> np.ndarray:
    """Running p-value over looks along ``axis``: min over looks so far of min(1, 1/Λ).
    By Ville's inequality P(ever ≤ α) ≤ α under H0, however often and whenever one looks:
    exactly for Gaussian estimates with known variance, asymptotically with the plug-in
    variance used here (as in Johari et al.)."""
    log_lr = msprt_log_likelihood_ratio(estimates, variances, tau2)
    per_look = np.exp(-np.maximum(log_lr, 0.0))
    per_look = np.where(np.isfinite(log_lr), per_look, 1.0)
    return np.minimum.accumulate(per_look, axis=axis)


@dataclass(frozen=True)
class SequentialDesign:
    """The mSPRT's fixed settings: α and the mixing variance τ² (squared CTR units)."""

    alpha: float
    tau2: float
    horizon_users_per_arm: int
    effect_prior_sd: float

    @classmethod
    def for_horizon(
        cls,
        per_user_variance: float,
        users_per_arm: int,
        effect_prior_sd: float,
        alpha: float = DEFAULT_ALPHA,
        treatment_per_user_variance: float | None = None,
    ) -> SequentialDesign:
        """τ² for M users per arm, per-user linearized variances σ_C² (and σ_T², default
        σ_C²), and an effect prior sd in absolute CTR units."""
        treatment = per_user_variance if treatment_per_user_variance is None else treatment_per_user_variance
        horizon_variance = (per_user_variance + treatment) / users_per_arm
        tau2 = mixture_variance(horizon_variance, effect_prior_sd, alpha)
        return cls(alpha, tau2, int(users_per_arm), effect_prior_sd)


# --- sample-ratio mismatch -----------------------------------------------------------------


@dataclass(frozen=True)
class SampleRatioCheck:
    users: dict[str, int]
    expected_shares: dict[str, float]
    chi2: float
    p_value: float
    threshold: float = SRM_P_THRESHOLD

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.threshold


def sample_ratio_mismatch(
    users: Mapping[str, int], shares: Mapping[str, float], threshold: float = SRM_P_THRESHOLD
) -> SampleRatioCheck:
    """χ² test of users per arm against the configured shares. A mismatch means assignment
    or logging lost users unevenly, so the arms are no longer comparable."""
    names = list(shares)
    observed = np.array([users.get(name, 0) for name in names], dtype=float)
    expected_shares = np.array([shares[name] for name in names], dtype=float)
    expected = observed.sum() * expected_shares / expected_shares.sum()
    result = stats.chisquare(observed, expected)
    return SampleRatioCheck(
        users={name: int(count) for name, count in zip(names, observed)},
        expected_shares=dict(zip(names, expected_shares.tolist())),
        chi2=float(result.statistic),
        p_value=float(result.pvalue),
        threshold=threshold,
    )


# --- power -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerPlan:
    test: Literal["fixed", "sequential"]
    users_per_arm: int
    alpha: float
    power: float
    relative_lift: float
    baseline_ctr: float
    per_user_variance: float
    standardized_effect: float  # δ / sqrt(V_M): the z the effect reaches at the horizon
    looks: int | None = None
    sequential: SequentialDesign | None = None


def plan_users_per_arm(
    baseline_ctr: float,
    per_user_variance: float,
    relative_lift: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = 0.8,
    test: Literal["fixed", "sequential"] = "fixed",
    looks: int = 20,
    effect_prior_sd: float | None = None,
    treatment_per_user_variance: float | None = None,
    simulations: int = 20_000,
    seed: int = 0,
) -> PowerPlan:
    """Users per arm (equal allocation) to detect ``relative_lift`` on ``baseline_ctr``.

    The absolute effect is δ = lift·CTR. The per-user variance σ² of the linearized metric
    (``RatioMoments.linearized_variance`` of historical data) sets the control arm's
    variance. The treatment's, unknown before the experiment, defaults to (1 + lift)²σ²:
    the part of σ² due to CTR differences between users scales like that, the binomial
    part only by (1 + lift), so the default over-states it a little and the plan errs on
    the side of power. Pass ``treatment_per_user_variance`` when it is known. The
    difference at n users per arm has ``V = (σ_C² + σ_T²) / n``.

    * ``fixed``: two-sided delta-method z-test at one final look — statsmodels
      ``NormalIndPower`` with effect size δ / sqrt((σ_C² + σ_T²)/2).
    * ``sequential``: the mSPRT with ``looks`` equally spaced looks and τ² from
      :func:`mixture_variance` at that horizon (prior sd = δ unless given). Its power
      depends only on z = δ/sqrt(V_M): the look process is simulated in information time
      (S_j = z·I_j + W(I_j), I_j = j/looks, ``simulations`` seeded Brownian paths shared
      by every z), and z is bisected until the share of paths that reject reaches
      ``power``. Then n = z²(σ_C² + σ_T²)/δ². Monte Carlo error of the power: about
      sqrt(p(1-p)/simulations), 0.003 at the defaults.
    """
    delta = relative_lift * baseline_ctr
    if not (delta > 0 and per_user_variance > 0 and 0 < alpha < 1 and 0 < power < 1):
        raise AnalysisInputError(
            "plan_users_per_arm needs a positive lift, CTR and per-user variance, and alpha, power in (0, 1); "
            f"got lift={relative_lift!r}, ctr={baseline_ctr!r}, variance={per_user_variance!r}, "
            f"alpha={alpha!r}, power={power!r}"
        )
    treatment_variance = treatment_per_user_variance
    if treatment_variance is None:
        treatment_variance = per_user_variance * (1.0 + relative_lift) ** 2
    variance_sum = per_user_variance + treatment_variance
    if test == "fixed":
        effect_size = delta / math.sqrt(variance_sum / 2.0)
        n = NormalIndPower().solve_power(effect_size=effect_size, alpha=alpha, power=power, ratio=1.0)
        users = int(math.ceil(n))
        return PowerPlan("fixed", users, alpha, power, relative_lift, baseline_ctr, per_user_variance,
                         delta / math.sqrt(variance_sum / users))
    if test != "sequential":
        raise AnalysisInputError(f"plan_users_per_arm: test must be 'fixed' or 'sequential', got {test!r}")
    prior_ratio = 1.0 if effect_prior_sd is None else effect_prior_sd / delta
    z_needed = _sequential_z_for_power(alpha, power, looks, prior_ratio, simulations, seed)
    users = int(math.ceil(z_needed**2 * variance_sum / delta**2))
    design = SequentialDesign.for_horizon(
        per_user_variance, users, prior_ratio * delta, alpha, treatment_per_user_variance=treatment_variance
    )
    return PowerPlan("sequential", users, alpha, power, relative_lift, baseline_ctr, per_user_variance,
                     delta / math.sqrt(variance_sum / users), looks, design)


def sequential_power(
    standardized_effect: float, alpha: float, looks: int, prior_ratio: float = 1.0,
    simulations: int = 20_000, seed: int = 0,
) -> float:
    """P(mSPRT rejects by the horizon) for an effect of ``standardized_effect`` standard
    errors at the horizon, with τ² from :func:`mixture_variance` (prior sd =
    ``prior_ratio`` × effect) and ``looks`` equally spaced looks (Gaussian approximation)."""
    return float(_rejections(standardized_effect, alpha, _brownian_looks(looks, simulations, seed), prior_ratio).mean())


def _brownian_looks(looks: int, simulations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    information = np.arange(1, looks + 1) / looks
    increments = np.random.default_rng(seed).standard_normal((simulations, looks)) * np.sqrt(1.0 / looks)
    return np.cumsum(increments, axis=1), information


def _rejections(z: float, alpha: float, paths: tuple[np.ndarray, np.ndarray], prior_ratio: float) -> np.ndarray:
    noise, information = paths
    estimate = z + noise / information  # θ̂_j in units of sqrt(V_M)
    variance = 1.0 / information
    tau2 = mixture_variance(1.0, prior_ratio * z, alpha)
    return np.any(msprt_log_likelihood_ratio(estimate, variance, tau2) >= math.log(1.0 / alpha), axis=1)


def _sequential_z_for_power(
    alpha: float, power: float, looks: int, prior_ratio: float, simulations: int, seed: int
) -> float:
    paths = _brownian_looks(looks, simulations, seed)
    low, high = 0.5, 12.0
    for _ in range(50):
        middle = 0.5 * (low + high)
        if _rejections(middle, alpha, paths, prior_ratio).mean() >= power:
            high = middle
        else:
            low = middle
    return high


# --- synthetic users ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticPopulation:
    """Users as seen by an ads experiment, for planning and for validating the analysis:
    activity ~ Gamma (so impressions = 1 + Poisson(activity) are negative binomial), a
    per-user CTR ~ Beta(ctr·k, (1 - ctr)·k), and a pre-period of Poisson(activity ·
    ``pre_period_ratio``) impressions clicked at the same per-user CTR (so pre-period
    clicks predict the experiment's, as in real logs)."""

    ctr: float = 0.03
    ctr_concentration: float = 30.0
    mean_impressions: float = 20.0
    activity_shape: float = 1.5
    pre_period_ratio: float = 1.0

    def sample(
        self, rng: np.random.Generator, shape: int | tuple[int, ...], relative_lift: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, clicks, pre_clicks) of ``shape`` users; the treatment's per-user
        CTR is multiplied by 1 + ``relative_lift``."""
        activity = rng.gamma(self.activity_shape, (self.mean_impressions - 1.0) / self.activity_shape, size=shape)
        impressions = 1 + rng.poisson(activity)
        user_ctr = rng.beta(self.ctr * self.ctr_concentration, (1.0 - self.ctr) * self.ctr_concentration, size=shape)
        clicks = rng.binomial(impressions, np.minimum(user_ctr * (1.0 + relative_lift), 1.0))
        pre_clicks = rng.binomial(rng.poisson(activity * self.pre_period_ratio), user_ctr)
        return impressions, clicks, pre_clicks

    def table(
        self, rng: np.random.Generator, users: Mapping[str, int], lifts: Mapping[str, float] | None = None
    ) -> pd.DataFrame:
        """A per-user table (the analysis's input) with ``users[arm]`` users per arm."""
        frames = []
        for arm, count in users.items():
            impressions, clicks, pre_clicks = self.sample(rng, count, (lifts or {}).get(arm, 0.0))
            frames.append(
                pd.DataFrame({"arm": arm, "impressions": impressions, "clicks": clicks, "pre_clicks": pre_clicks})
            )
        table = pd.concat(frames, ignore_index=True)
        table.insert(0, "user", [f"{i:032x}" for i in range(len(table))])
        return table

    def look_moments(
        self, rng: np.random.Generator, sims: int, users_per_arm: int, looks: int,
        relative_lift: float = 0.0, chunk: int = 64,
    ) -> RatioMoments:
        """Cumulative moments of one arm, shape (sims, looks): users arrive in ``looks``
        equal batches (``users_per_arm`` rounded down to a multiple of ``looks``) and each
        brings its whole outcome."""
        per_look = users_per_arm // looks
        if per_look < 2:
            raise AnalysisInputError(f"look_moments: {users_per_arm} users over {looks} looks leaves < 2 per look")
        parts = []
        for start in range(0, sims, chunk):
            size = min(chunk, sims - start)
            impressions, clicks, pre_clicks = self.sample(rng, (size, looks, per_look), relative_lift)
            parts.append(RatioMoments.of_users(impressions, clicks, pre_clicks, axis=-1))
        batches = RatioMoments(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in RatioMoments.__dataclass_fields__}
        )
        return batches.cumsum(axis=1)


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
    events: pd.DataFrame, experiment: str, look_times: Sequence[pd.Timestamp],
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
) -> ExperimentReport:
    """Full analysis of one experiment from its per-user table.

    ``shares`` are the configured arm shares (``Experiment.shares``); the control is the
    first arm unless named. ``looks`` are earlier snapshots of the table (e.g.
    :func:`look_tables`) in time order; the always-valid p-value is the minimum over them
    and the final table. ``sequential`` should be the design fixed when the experiment was
    planned (:func:`plan_users_per_arm`); without it a design is derived from this data
    (horizon = current users per arm, prior sd = ``default_prior_relative_lift`` × control
    CTR) and the report says so: fine for a single final look, not for a mixture that moves
    with every peek."""
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
            float(control_moments.linearized_variance), users_per_arm,
            default_prior_relative_lift * float(control_moments.ctr), alpha,
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
                arm=name, control=control,
                diff=float(plain.diff), diff_ci=_pair(plain.diff_interval(alpha)), p_value=float(plain.p_value),
                lift=float(plain.lift), lift_ci=_pair(plain.lift_interval(alpha)),
                cuped_diff=float(adjusted.diff), cuped_diff_ci=_pair(adjusted.diff_interval(alpha)),
                cuped_lift=float(adjusted.lift), cuped_lift_ci=_pair(adjusted.lift_interval(alpha)),
                cuped_p_value=float(adjusted.p_value),
                variance_reduction=float(1.0 - adjusted.diff_variance / plain.diff_variance),
                always_valid_p_value=float(running[-1]),
                always_valid_p_by_look=tuple(float(p) for p in running),
            )
        )
    return ExperimentReport(
        experiment=experiment, alpha=alpha, control=control, arms=summaries, comparisons=tuple(comparisons),
        srm=srm, cuped_theta=float(theta), sequential=sequential, sequential_design_source=source,
        look_users=look_users,
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
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "ExperimentReports":
        f = Fields(arrays, cls.type_tag)
        designs = {name: SequentialDesign(**values) for name, values in f.json("designs").items()}
        return cls(f.text("markdown"), designs, list(f.json("figures")))


def report_figures(report: ExperimentReport) -> list[dict[str, float | str]]:
    """Flat per-arm numbers of a report (for metadata and the stored artifact)."""
    by_arm = {c.arm: c for c in report.comparisons}
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
        out.append(row)
    return out
