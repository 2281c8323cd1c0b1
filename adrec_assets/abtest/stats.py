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

Plain numpy/scipy/statsmodels: no Dagster, no torch. Turning logged events into
per-user tables and reports lives in :mod:`adrec_assets.abtest.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats
from statsmodels.stats.power import NormalIndPower

DEFAULT_ALPHA = 0.05
SRM_P_THRESHOLD = 0.001


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
            n=total(np.ones_like(x)),
            x=total(x),
            y=total(y),
            w=total(w),
            xx=total(x * x),
            yy=total(y * y),
            ww=total(w * w),
            xy=total(x * y),
            xw=total(x * w),
            yw=total(y * w),
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
        return PowerPlan(
            "fixed",
            users,
            alpha,
            power,
            relative_lift,
            baseline_ctr,
            per_user_variance,
            delta / math.sqrt(variance_sum / users),
        )
    if test != "sequential":
        raise AnalysisInputError(f"plan_users_per_arm: test must be 'fixed' or 'sequential', got {test!r}")
    prior_ratio = 1.0 if effect_prior_sd is None else effect_prior_sd / delta
    z_needed = _sequential_z_for_power(alpha, power, looks, prior_ratio, simulations, seed)
    users = int(math.ceil(z_needed**2 * variance_sum / delta**2))
    design = SequentialDesign.for_horizon(
        per_user_variance, users, prior_ratio * delta, alpha, treatment_per_user_variance=treatment_variance
    )
    return PowerPlan(
        "sequential",
        users,
        alpha,
        power,
        relative_lift,
        baseline_ctr,
        per_user_variance,
        delta / math.sqrt(variance_sum / users),
        looks,
        design,
    )


def sequential_power(
    standardized_effect: float,
    alpha: float,
    looks: int,
    prior_ratio: float = 1.0,
    simulations: int = 20_000,
    seed: int = 0,
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
