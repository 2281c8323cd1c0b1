"""The posterior over the shared click model: Bayesian logistic regression, Laplace approximation.

**Model.** One shared-parameter contextual model for every ad, on the features
``phi(u, a) = [u * p_a, b_a, 1]`` (``d + 2`` numbers; ``u`` the unit user vector, ``p_a`` the
projected ad, ``b_a`` its ``score_bias``): ``P(click | examined) = sigmoid(theta . phi)``.
The prior mean ``theta_0 = [s 1_d, s, c]`` gives ``theta_0 . phi = s (u . p_a + b_a) + c``,
today's score up to a positive scale and a shift, so without feedback every policy
(:mod:`adrec_assets.online.policy`) ranks exactly as greedy does.

**Why Bayesian logistic regression with a Laplace approximation** (not Gaussian linear): ad
click rates are well under 1%. A Gaussian model of 0/1 clicks needs its noise variance set to
``p (1 - p)``, which differs by user and ad by orders of magnitude; with one fixed variance it
is over-confident about rarely clicked ads or under-confident about popular ones, and its
predicted click rate can leave [0, 1]. The logistic likelihood gives each impression its own
information ``p (1 - p)`` automatically, keeps calibrated click probabilities (what the logs
and off-policy evaluation need), and the prior ``s (u.p + b) + c`` is a logit with base rate
``sigmoid(c)``. Cost at d = 128 (p = 130 parameters): per event batch of n impressions, a few
damped Newton steps on the exact MAP objective with the previous posterior as prior
(sequential Laplace: the new precision is the Hessian at the new mean), ``O(n p^2 + p^3)``
each, cheap enough to run on every event batch. After every update the inverse Cholesky
factor ``L^-1`` of the precision is cached, so a draw is ``mean + L^-T z``: one p x p
product, never a factorization per request. (Rank-one Sherman-Morrison updates cost
``O(p^2)`` per impression but are exact only for the Gaussian model; batches make the Newton
step both exact and cheap.)

**Position bias.** :meth:`LaplaceLogisticPosterior.update_position_aware` weights each
impression with :func:`adrec_assets.online.position_bias.impression_weights` (default: click 1,
skip ``P(examined | skipped)`` ~ ``theta_k``), so the posterior models relevance, not attention.
The user-vector EMA and the training click weights use
:func:`~adrec_assets.online.position_bias.click_weight` (``min(1/theta_k, cap)``). Applying
both corrections to the same data would over-rate ads shown low (see ``impression_weights``).

**Per event batch (service):** ``posterior.update_position_aware(user_vectors,
index.vectors(slots), clicked, positions, theta)`` (``theta`` from
:mod:`~adrec_assets.online.position_bias`), persist ``posterior.to_arrays()``. The user
vectors must be the ones the request was served with (before any EMA update the click
triggers): ``phi`` depends on them. :class:`PolicyPosterior` is the artifact that carries a
posterior (and the fresh ads' effects, :mod:`adrec_assets.online.fresh_ads`) from the
pipeline to the service; :func:`replay_posterior` rebuilds one from logged impressions.

Randomness: every draw comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import expit

from adrec_assets.ml.types import Fields, artifact_type
from adrec_assets.online.fresh_ads import (
    DEFAULT_FRESH_PRIOR_SD,
    FreshAdEffects,
    effects_from_arrays,
    effects_to_arrays,
)
from adrec_assets.online.position_bias import (
    DEFAULT_CLICK_WEIGHT_CAP,
    WeightScheme,
    _binary,
    impression_weights,
)

# Prior: logit = DEFAULT_SCALE * (u.p + b) + DEFAULT_INTERCEPT. A power of two keeps the
# float32 prior-mean query [2u, 2] ranking bit-for-bit like today's [u, 1].
DEFAULT_SCALE = 2.0
DEFAULT_INTERCEPT = -4.6  # sigmoid(-4.6) ~ 1%: the order of magnitude of an ad click rate


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------


def ad_features(users: np.ndarray, ad_vectors: np.ndarray) -> np.ndarray:
    """``phi = [u * p, b, 1]`` per impression, (n, d + 2) float64.

    ``users``: (d,) for one user shown every ad, or (n, d); ``ad_vectors``: (n, d + 1) stored
    ``[p_a, b_a]`` rows as returned by ``index.vectors``.
    """
    ad_vectors = np.asarray(ad_vectors, dtype=np.float64)
    if ad_vectors.ndim != 2 or ad_vectors.shape[1] < 2:
        raise ValueError(f"ad_vectors: expected (n, d + 1) rows [p_a, b_a], got shape {ad_vectors.shape}")
    dim = ad_vectors.shape[1] - 1
    users = np.asarray(users, dtype=np.float64)
    if users.shape not in ((dim,), (len(ad_vectors), dim)):
        raise ValueError(
            f"users: expected shape ({dim},) or ({len(ad_vectors)}, {dim}) to match ad_vectors {ad_vectors.shape}"
        )
    if not (np.all(np.isfinite(users)) and np.all(np.isfinite(ad_vectors))):
        raise ValueError("users/ad_vectors: must be finite")
    return np.hstack([users * ad_vectors[:, :dim], ad_vectors[:, dim:], np.ones((len(ad_vectors), 1))])


def score_scale(mean: np.ndarray) -> float:
    """How many times sharper a posterior mean ranks than the prior: the root mean square of
    its weights on ``[u * p, b]`` over the prior's (``DEFAULT_SCALE``). A fresh ad's prior
    uncertainty is set in these units (:meth:`FreshAdEffects.register`)."""
    weights = np.asarray(mean, dtype=np.float64)[:-1]
    return max(float(np.sqrt(np.mean(weights**2))) / DEFAULT_SCALE, 0.1)


# ---------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------


class _PosteriorState(NamedTuple):
    """Replaced as a whole on update: readers never see a mean from one batch and a factor
    from another."""

    mean: np.ndarray  # (d+2,)
    precision: np.ndarray  # (d+2, d+2)
    inverse_factor: np.ndarray  # L^-1 with precision = L L^T; a draw is mean + L^-T z
    inverse_factor_t32: np.ndarray  # L^-T in float32 for the Monte Carlo scores


class LaplaceLogisticPosterior:
    """Gaussian (Laplace) posterior ``N(mean, precision^-1)`` over the logistic ``theta``.

    State is replaced as a whole on update (one attribute assignment), so a request thread
    reading it while an event batch is folded in sees either the old or the new posterior.
    """

    def __init__(self, mean: np.ndarray, precision: np.ndarray, observed_weight: float = 0.0) -> None:
        self._state = self._make_state(mean, precision)
        self.observed_weight = float(observed_weight)

    @staticmethod
    def _make_state(mean: np.ndarray, precision: np.ndarray) -> _PosteriorState:
        mean = np.array(mean, dtype=np.float64)
        precision = np.array(precision, dtype=np.float64)
        if mean.ndim != 1 or len(mean) < 3:
            raise ValueError(f"mean: expected a (d + 2,) vector with d >= 1, got shape {mean.shape}")
        if precision.shape != (len(mean), len(mean)):
            raise ValueError(f"precision: expected shape {(len(mean), len(mean))}, got {precision.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(precision))):
            raise ValueError("mean/precision: must be finite")
        if not np.allclose(precision, precision.T, rtol=1e-10, atol=1e-12 * np.abs(precision).max()):
            raise ValueError("precision: must be symmetric")
        precision = (precision + precision.T) / 2
        try:
            lower = np.linalg.cholesky(precision)
        except np.linalg.LinAlgError:
            raise ValueError("precision: must be positive definite (a valid inverse covariance)") from None
        # theta~ = mean + L^-T z has covariance L^-T L^-1 = precision^-1; rows: z @ L^-1.
        inverse_factor = solve_triangular(lower, np.eye(len(mean)), lower=True)
        # float32 L^-T for the Monte Carlo scores: ranks need no more precision, half the cost.
        inverse_factor_t32 = np.ascontiguousarray(inverse_factor.T, dtype=np.float32)
        return _PosteriorState(mean, precision, inverse_factor, inverse_factor_t32)

    @classmethod
    def prior(
        cls,
        dim: int,
        *,
        scale: float = DEFAULT_SCALE,
        intercept: float = DEFAULT_INTERCEPT,
        weight_std: float = 1.0,
        bias_std: float = 1.0,
        intercept_std: float = 2.0,
    ) -> LaplaceLogisticPosterior:
        """No feedback yet: mean ``[scale 1_d, scale, intercept]``, diagonal covariance.

        ``weight_std`` sets how far a draw may re-weight single user-space dimensions (the
        exploration strength); ``bias_std`` the weight of content popularity.
        """
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        if not scale > 0:
            raise ValueError(f"scale: must be > 0 so the prior ranks like u.p + b, got {scale}")
        for name, std in (("weight_std", weight_std), ("bias_std", bias_std), ("intercept_std", intercept_std)):
            if not (np.isfinite(std) and std > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {std}")
        mean = np.concatenate([np.full(dim + 1, float(scale)), [float(intercept)]])
        variances = np.concatenate([np.full(dim, weight_std**2), [bias_std**2, intercept_std**2]])
        return cls(mean, np.diag(1.0 / variances))

    def snapshot(self) -> LaplaceLogisticPosterior:
        """A read-only view of the current state (O(1), shares the arrays): one request uses
        one posterior for its draw, its query and its propensities even if a batch lands."""
        view = object.__new__(LaplaceLogisticPosterior)
        view._state = self._state
        view.observed_weight = self.observed_weight
        return view

    @property
    def dim(self) -> int:
        """d, the user-space dimension (the parameter has d + 2 entries)."""
        return len(self._state.mean) - 2

    def mean(self) -> np.ndarray:
        return self._state.mean.copy()

    def precision(self) -> np.ndarray:
        return self._state.precision.copy()

    def covariance(self) -> np.ndarray:
        inverse_factor = self._state.inverse_factor
        return inverse_factor.T @ inverse_factor

    def sample(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """One draw ``mean + scale L^-T z`` (d + 2,); ``scale`` 0 returns the mean."""
        return self.sample_many(rng, 1, scale)[0]

    def sample_many(self, rng: np.random.Generator, count: int, scale: float = 1.0) -> np.ndarray:
        """``count`` independent draws (count, d + 2) from one ``standard_normal`` call."""
        state = self._state
        noise = rng.standard_normal((count, len(state.mean)))
        return state.mean + scale * (noise @ state.inverse_factor)

    def sample_scores(
        self, rng: np.random.Generator, features: np.ndarray, count: int, scale: float = 1.0
    ) -> np.ndarray:
        """(n, count) float32: column m is ``features @ theta~_m`` for independent draws.

        Same distribution as ``features @ sample_many(rng, count, scale).T`` without forming
        the draws: ``theta~ = mean + scale L^-T z`` gives ``F theta~ = F mean + scale (F L^-T) z``,
        so the noise enters through the (n, d+2) loadings ``F L^-T`` and one float32 product
        with the (d+2, count) normals, laid out candidates x draws for the rank counts.
        """
        state = self._state
        features32 = np.asarray(features, dtype=np.float32)
        noise = rng.standard_normal((len(state.mean), count), dtype=np.float32)
        loadings = features32 @ state.inverse_factor_t32
        return (features32 @ state.mean.astype(np.float32))[:, None] + np.float32(scale) * (loadings @ noise)

    def _batch(
        self, users: np.ndarray, ad_vectors: np.ndarray, clicked: np.ndarray, weight: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validated (features (n, d+2), targets (n,) float, weights (n,)) of an event batch."""
        features = ad_features(users, ad_vectors)
        if features.shape[1] != len(self._state.mean):
            raise ValueError(f"ad_vectors: {features.shape[1] - 2}-d ads for a {self.dim}-d posterior")
        clicks = _binary(np.asarray(clicked), "clicked")
        if clicks.shape != (len(features),):
            raise ValueError(f"clicked: expected shape ({len(features)},) to match ad_vectors, got {clicks.shape}")
        if weight is None:
            return features, clicks.astype(np.float64), np.ones(len(features))
        weights = np.asarray(weight, dtype=np.float64)
        if weights.shape != (len(features),):
            raise ValueError(f"weight: expected shape ({len(features)},), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("weight: impression weights must be finite and >= 0")
        return features, clicks.astype(np.float64), weights

    def _laplace_map(
        self,
        features: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray,
        start: np.ndarray,
        max_newton_steps: int,
        tolerance: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(MAP, Hessian at the MAP) of the weighted logistic likelihood times the current posterior."""
        prior_mean, prior_precision = self._state.mean, self._state.precision

        def objective(theta: np.ndarray) -> float:
            logits = features @ theta
            delta = theta - prior_mean
            return 0.5 * delta @ prior_precision @ delta + weights @ (np.logaddexp(0.0, logits) - targets * logits)

        def hessian_at(theta: np.ndarray) -> np.ndarray:
            predicted = expit(features @ theta)
            curvature = weights * predicted * (1 - predicted)
            return prior_precision + (features * curvature[:, None]).T @ features

        theta = start.copy()
        current = objective(theta)
        for _ in range(max_newton_steps):
            residual = weights * (expit(features @ theta) - targets)
            gradient = prior_precision @ (theta - prior_mean) + features.T @ residual
            step = cho_solve((np.linalg.cholesky(hessian_at(theta)), True), gradient)
            decrease = gradient @ step
            size = 1.0
            while True:  # backtracking (Armijo): a full Newton step can overshoot on a large batch
                candidate = theta - size * step
                value = objective(candidate)
                if value <= current - 1e-4 * size * decrease or size < 1e-10:
                    break
                size /= 2
            theta, current = candidate, value
            if np.max(np.abs(size * step)) < tolerance:
                break
        hessian = hessian_at(theta)
        return theta, (hessian + hessian.T) / 2

    def update(
        self,
        users: np.ndarray,
        ad_vectors: np.ndarray,
        clicked: np.ndarray,
        weight: np.ndarray | None = None,
        *,
        max_newton_steps: int = 25,
        tolerance: float = 1e-9,
    ) -> None:
        """Fold a batch of impressions into the posterior (sequential Laplace).

        ``users`` (d,) or (n, d); ``ad_vectors`` (n, d+1) stored ``[p_a, b_a]``; ``clicked`` (n,)
        0/1; ``weight`` (n,) >= 0 scales each impression's log-likelihood (duplicates, or
        position-bias weights computed by the caller). New mean: the MAP of ``sum_i w_i log
        p(y_i | phi_i, theta) + log N(theta; mean, precision^-1)`` by damped Newton steps; new
        precision: the Hessian there.
        """
        features, targets, weights = self._batch(users, ad_vectors, clicked, weight)
        if not weights.any():
            return
        theta, hessian = self._laplace_map(features, targets, weights, self._state.mean, max_newton_steps, tolerance)
        self._state = self._make_state(theta, hessian)
        self.observed_weight += float(weights.sum())

    def update_position_aware(
        self,
        users: np.ndarray,
        ad_vectors: np.ndarray,
        clicked: np.ndarray,
        positions: np.ndarray,
        theta: np.ndarray,
        *,
        scheme: WeightScheme = "examination",
        cap: float = DEFAULT_CLICK_WEIGHT_CAP,
        weight: np.ndarray | None = None,
        max_em_steps: int = 20,
        em_tolerance: float = 1e-7,
        max_newton_steps: int = 25,
        tolerance: float = 1e-9,
    ) -> None:
        """:meth:`update` for impressions at 0-based ``positions``, ``theta`` from position_bias.

        Default ``"examination"``: a click counts 1 (it proves the ad was examined), a skip
        counts ``P(examined | skipped) = theta_k (1 - r) / (1 - theta_k r)``, ``r`` the model's
        click probability given examination. The weights are recomputed at the new mean until
        it stops moving (EM inside the batch), so the mean is the MAP of the exact PBM
        likelihood ``P(click) = theta_k sigmoid(theta . phi)``: the posterior learns relevance,
        not attention, and only gains information from impressions that were likely seen.
        (For click rates under 1% ``r`` ~ 0 and one pass suffices.) The new precision is the
        weighted-logistic Hessian there, the complete-data information of that EM: slightly
        more confident than the exact PBM information when click rates are high, the same in
        the low-CTR limit. ``"ips"``: click ``min(1/theta_k, cap)``, skip 1, one pass.
        ``weight`` multiplies either.
        """
        features, targets, base_weights = self._batch(users, ad_vectors, clicked, weight)
        positions = np.asarray(positions)
        mean = self._state.mean
        for _ in range(max_em_steps if scheme == "examination" else 1):
            weights = base_weights * impression_weights(
                positions, targets.astype(bool), theta, scheme=scheme, cap=cap,
                predicted_relevance=expit(features @ mean),
            )  # fmt: skip
            if not weights.any():
                return
            updated, hessian = self._laplace_map(features, targets, weights, mean, max_newton_steps, tolerance)
            moved = np.max(np.abs(updated - mean))
            mean = updated
            if moved < em_tolerance:
                break
        self._state = self._make_state(mean, hessian)
        self.observed_weight += float(weights.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numeric arrays only (``np.savez`` without pickle); the draw factor is recomputed."""
        return {"mean": self.mean(), "precision": self.precision(), "observed_weight": np.array(self.observed_weight)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LaplaceLogisticPosterior:
        missing = [key for key in ("mean", "precision") if key not in arrays]
        if missing:
            raise ValueError(f"arrays: missing {missing}; expected the keys written by to_arrays()")
        for key, value in arrays.items():
            if np.asarray(value).dtype.kind not in "fiu":
                raise ValueError(f"arrays[{key!r}]: expected a numeric array, got dtype {np.asarray(value).dtype}")
        return cls(arrays["mean"], arrays["precision"], float(arrays.get("observed_weight", 0.0)))


# ---------------------------------------------------------------------------------------
# The artifact and its replay
# ---------------------------------------------------------------------------------------


@artifact_type("policy_posterior")
@dataclass(eq=False)
class PolicyPosterior:
    """The ``policy_posterior`` artifact: the Thompson posterior rebuilt from every logged
    impression with this snapshot's user space (features depend on the user and ad vectors,
    so a posterior learnt in another space is meaningless here), and the random effects of
    the fresh ads that have impressions (ad id -> (mean, precision), prior ``fresh_prior_sd``)."""

    posterior: LaplaceLogisticPosterior
    space: str
    n_impressions: int
    n_clicks: int
    fresh: dict[str, tuple[float, float]] = field(default_factory=dict)
    fresh_prior_sd: float = DEFAULT_FRESH_PRIOR_SD

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"posterior__{k}": v for k, v in self.posterior.to_arrays().items()},
            **{f"fresh__{k}": v for k, v in effects_to_arrays(self.fresh, self.fresh_prior_sd).items()},
            "space": np.asarray(self.space),
            "n_impressions": np.asarray(self.n_impressions),
            "n_clicks": np.asarray(self.n_clicks),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PolicyPosterior:
        f = Fields(arrays, cls.type_tag)
        posterior = LaplaceLogisticPosterior.from_arrays(
            {k[len("posterior__") :]: v for k, v in arrays.items() if k.startswith("posterior__")}
        )
        fresh: dict[str, tuple[float, float]] = {}
        prior_sd = DEFAULT_FRESH_PRIOR_SD
        if "fresh__ad_ids" in arrays:  # artifacts written before fresh-ad effects have none
            fresh, prior_sd = effects_from_arrays(
                {k[len("fresh__") :]: v for k, v in arrays.items() if k.startswith("fresh__")}
            )
        return cls(posterior, f.text("space"), int(f.array("n_impressions")), int(f.array("n_clicks")), fresh, prior_sd)


def replay_posterior(
    dim: int,
    users: np.ndarray,
    ad_vectors: np.ndarray,
    clicked: np.ndarray,
    positions: np.ndarray,
    theta: np.ndarray,
    chunk: int = 50_000,
    *,
    ad_rows: np.ndarray | None = None,
    fresh: FreshAdEffects | None = None,
) -> LaplaceLogisticPosterior:
    """The posterior after learning logged impressions in order (sequential Laplace over
    chunks, so memory stays bounded for long logs), from the prior whose mean ranks as greedy.

    ``fresh`` (registered with ``ad_rows``' numbering as its slots) learns its ads' effects
    from the same chunks, after each posterior step, as the service does per batch."""
    posterior = LaplaceLogisticPosterior.prior(dim)
    for start in range(0, len(users), chunk):
        stop = start + chunk
        posterior.update_position_aware(
            users[start:stop], ad_vectors[start:stop], clicked[start:stop], positions[start:stop], theta
        )
        if fresh is not None and ad_rows is not None and fresh.enabled:
            offsets = ad_features(users[start:stop], ad_vectors[start:stop]) @ posterior.mean()
            fresh.update_position_aware(ad_rows[start:stop], offsets, clicked[start:stop], positions[start:stop], theta)
    return posterior
