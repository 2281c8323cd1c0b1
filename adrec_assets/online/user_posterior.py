"""A posterior per user, in user space: what a user's impressions *and* skips say about them.

**Model.** A user's click model is today's score with their own vector ``w``:
``P(click | examined) = sigmoid(s (w . p_a + b_a) + c)`` (``s``, ``c``: the shared model's
prior scale and intercept, :mod:`adrec_assets.online.posterior`, so the logit is the one the
policies rank with). The prior on ``w`` is Gaussian: mean = the user's served vector (the
global mean for a new user), covariance = the population's spread of served vectors, kept
to its top ``rank`` principal directions (``B B^T``, :class:`UserPrior`): a user is uncertain
where users actually differ, and a rank-16 subspace makes a per-user posterior small
(:func:`record_length`: 1,064 bytes at d = 128) and its update cheap.

**Update (LinTS with the projected ads as features).** The posterior is
``w = mean + B delta``, ``delta ~ N(0, P^-1)`` (``P = L L^T`` in the basis's coordinates).
An event batch is folded in by the sequential Laplace step the shared posterior uses: a few
Newton steps on ``1/2 delta^T P delta + sum_i omega_i [log(1 + e^l_i) - y_i l_i]``, then
``mean += B delta*`` and ``P`` = the Hessian there (``delta`` re-centred at 0). ``omega``:
:func:`~adrec_assets.online.position_bias.impression_weights` (click 1, skip
``P(examined | skipped)``), so a skip at a position rarely looked at teaches little, and a
user who ignores an ad moves away from it.

**Serving.** Greedy serves the mean; Thompson one draw ``mean + B L^-T z``
(:func:`draw_spread` gives ``B L^-T``, folded into the index query by the policy). The
stored record (:func:`belief_to_record`) is one float32 vector ``[mean, checksum, count,
L packed]``; the checksum names the basis it was written under, so a record from another
snapshot's basis keeps its mean and starts its uncertainty afresh. A record of exactly
``d`` numbers is an EMA-era vector (``ADREC_SERVE_USER_UPDATE=ema``): its mean is kept.

Randomness: draws come from the generator passed in; :meth:`UserPrior.from_users` is
deterministic.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.special import expit

from adrec_assets.online.posterior import DEFAULT_INTERCEPT, DEFAULT_SCALE
from adrec_assets.online.store.base import MAX_USER_RECORD

DEFAULT_RANK = 16
#: A user's record in the online store is at most this many float32 numbers (4 KB).
MAX_RECORD_FLOATS = MAX_USER_RECORD
NEWTON_STEPS = 4
#: Rows of served users the prior's principal directions are computed from (an even sample).
PRIOR_SAMPLE = 20_000


class UserPrior(NamedTuple):
    """The population's spread of users in the user space: prior covariance ``B B^T``."""

    basis: np.ndarray  # (d, r) float64: principal directions times their sd (times ``spread``)
    checksum: float  # integer-valued (exact in float32): names ``basis`` in stored records
    scale: float = DEFAULT_SCALE  # logit = scale * (w . p + b) + intercept
    intercept: float = DEFAULT_INTERCEPT

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def from_users(cls, vectors: np.ndarray, rank: int = DEFAULT_RANK, spread: float = 1.0) -> UserPrior:
        """The top ``rank`` principal directions of the served user vectors, scaled by their sd
        and by ``spread`` (a multiple of the population's spread)."""
        vectors = np.asarray(vectors)  # sampled before the float64 copy: a large table is copied once
        if vectors.ndim == 2 and len(vectors) > PRIOR_SAMPLE:
            vectors = vectors[np.linspace(0, len(vectors) - 1, PRIOR_SAMPLE).astype(np.int64)]
        vectors = vectors.astype(np.float64)
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise ValueError(f"vectors: expected (n, d) user vectors, got shape {vectors.shape}")
        dim = vectors.shape[1]
        if not 1 <= rank <= dim:
            raise ValueError(f"rank: expected 1..{dim} (the user space's dimension), got {rank}")
        if record_length(dim, rank) > MAX_RECORD_FLOATS:
            raise ValueError(
                f"rank {rank}: a {dim}-d user's record would take {4 * record_length(dim, rank)} bytes, over "
                f"{4 * MAX_RECORD_FLOATS}; choose a smaller rank"
            )
        if not (np.isfinite(spread) and spread > 0):
            raise ValueError(f"spread: expected a finite number > 0, got {spread}")
        basis = np.zeros((dim, rank))
        if len(vectors) >= 2:
            centred = vectors - vectors.mean(axis=0)
            _, values, directions = np.linalg.svd(centred, full_matrices=False)
            sd = values[:rank] / np.sqrt(len(vectors) - 1)
            # a deterministic sign per direction (an SVD's signs are arbitrary)
            signs = np.where(directions[:rank, np.argmax(np.abs(directions[:rank]), axis=1)].diagonal() < 0, -1.0, 1.0)
            basis[:, : len(sd)] = (directions[:rank] * signs[:, None]).T * sd
        if not np.any(basis):  # no population spread to learn from (< 2 distinct users): an isotropic
            # prior in the first ``rank`` axes at a unit vector's per-axis sd, so clicks still move users
            basis[:rank, :rank] = np.eye(rank) / np.sqrt(dim)
        basis *= spread
        digest = hashlib.sha256(np.ascontiguousarray(basis, dtype="<f4").tobytes()).digest()
        return cls(basis, float(int.from_bytes(digest[:3], "little")))


class UserBelief(NamedTuple):
    """One user's posterior: ``w = mean + basis delta``, ``delta ~ N(0, (factor factor^T)^-1)``."""

    mean: np.ndarray  # (d,) float64
    factor: np.ndarray  # (r, r) lower Cholesky factor of the precision in the basis's coordinates
    count: float = 0.0  # impressions learnt (weighted)


def record_length(dim: int, rank: int) -> int:
    """Floats in a stored record: mean, checksum, count, the packed factor."""
    return dim + 2 + rank * (rank + 1) // 2


def prior_belief(vector: np.ndarray, prior: UserPrior, spread: float = 1.0) -> UserBelief:
    """No evidence online yet: ``vector`` with the prior's covariance times ``spread**2`` (a
    known user's trained vector is surer than the population's spread: ``spread`` < 1)."""
    return UserBelief(np.asarray(vector, dtype=np.float64).copy(), np.eye(prior.rank) / spread)


def belief_from_record(
    record: np.ndarray | None, vector: np.ndarray, prior: UserPrior, spread: float = 1.0
) -> UserBelief:
    """The user's belief from their stored record; ``vector`` (their served vector, or the
    global mean) with ``spread`` (see :func:`prior_belief`) when they have none. An EMA-era
    record (``d`` numbers) or one written under another basis keeps its mean with that
    prior's uncertainty."""
    if record is None:
        return prior_belief(vector, prior, spread)
    record = np.asarray(record, dtype=np.float64)
    dim, rank = prior.dim, prior.rank
    if len(record) != record_length(dim, rank) or record[dim] != prior.checksum:
        if len(record) < dim:
            raise ValueError(f"record: a user record holds at least the {dim}-d mean, got {len(record)} numbers")
        return prior_belief(record[:dim], prior, spread)
    factor = np.zeros((rank, rank))
    factor[np.tril_indices(rank)] = record[dim + 2 :]
    return UserBelief(record[:dim].copy(), factor, float(record[dim + 1]))


def belief_to_record(belief: UserBelief, prior: UserPrior) -> np.ndarray:
    """The float32 vector the online store keeps (see the module docstring)."""
    packed = belief.factor[np.tril_indices(prior.rank)]
    return np.concatenate([belief.mean, [prior.checksum, belief.count], packed]).astype(np.float32)


def draw_spread(belief: UserBelief, prior: UserPrior) -> np.ndarray:
    """``B L^-T`` (d, r): a Thompson draw of the user's vector is ``mean + draw_spread @ z``."""
    inverse_t = solve_triangular(belief.factor, np.eye(prior.rank), lower=True).T  # L^-T
    return prior.basis @ inverse_t


def update_belief(
    belief: UserBelief, prior: UserPrior, ad_vectors: np.ndarray, clicked: np.ndarray, weights: np.ndarray
) -> UserBelief:
    """Fold impressions of stored ad rows ``[p_a, b_a]`` (n, d + 1) with outcomes ``clicked``
    and position weights into the belief (sequential Laplace; see the module docstring)."""
    ad_vectors = np.asarray(ad_vectors, dtype=np.float64)
    clicked = np.asarray(clicked, dtype=np.float64).ravel()
    weights = np.asarray(weights, dtype=np.float64).ravel()
    dim = prior.dim
    if ad_vectors.ndim != 2 or ad_vectors.shape[1] != dim + 1:
        raise ValueError(f"ad_vectors: expected (n, {dim + 1}) rows [p_a, b_a], got shape {ad_vectors.shape}")
    if not len(clicked) == len(weights) == len(ad_vectors):
        raise ValueError(f"clicked ({len(clicked)}) and weights ({len(weights)}) must match {len(ad_vectors)} ads")
    if not (np.all(np.isfinite(ad_vectors)) and np.all(np.isfinite(weights)) and np.all(weights >= 0)):
        raise ValueError("ad_vectors and weights must be finite, weights >= 0")
    if len(ad_vectors) == 0 or not weights.any():
        return belief
    scale = prior.scale
    features = scale * (ad_vectors[:, :dim] @ prior.basis)  # (n, r): d logit / d delta
    base = scale * (ad_vectors[:, :dim] @ belief.mean + ad_vectors[:, dim]) + prior.intercept
    precision = belief.factor @ belief.factor.T
    delta = np.zeros(prior.rank)

    def objective(step: np.ndarray) -> float:
        logits = base + features @ step
        return 0.5 * step @ precision @ step + float(weights @ (np.logaddexp(0.0, logits) - clicked * logits))

    value = objective(delta)
    for _ in range(NEWTON_STEPS):
        probability = expit(base + features @ delta)
        gradient = precision @ delta + features.T @ (weights * (probability - clicked))
        hessian = precision + (features * (weights * probability * (1 - probability))[:, None]).T @ features
        step = cho_solve(cho_factor(hessian, lower=True), gradient)
        size = 1.0
        while size > 1e-3:  # damped: a Newton step on the logistic loss can overshoot
            candidate = delta - size * step
            new_value = objective(candidate)
            if new_value <= value:
                break
            size /= 2
        else:
            break
        delta, value = candidate, new_value
        if np.max(np.abs(size * step)) < 1e-8:
            break
    probability = expit(base + features @ delta)
    hessian = precision + (features * (weights * probability * (1 - probability))[:, None]).T @ features
    factor = np.linalg.cholesky(0.5 * (hessian + hessian.T))
    return UserBelief(belief.mean + prior.basis @ delta, factor, belief.count + float(weights.sum()))
