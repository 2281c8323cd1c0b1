"""Exploration policies over the ad index: greedy, Thompson sampling, epsilon-greedy, random.

Every policy ranks by the shared click model of :mod:`adrec_assets.online.posterior`
(``P(click | examined) = sigmoid(theta . phi(u, a))``, ``phi = [u * p_a, b_a, 1]``), whose prior
mean is today's score ``u . p_a + b_a`` up to a positive scale and a shift: without feedback
every policy ranks exactly as greedy does.

**Fresh ads** (:mod:`adrec_assets.online.fresh_ads`): the shared model has no per-ad
uncertainty, so ads the snapshot learnt from no click get a per-ad random effect on top of
it under Thompson; see :class:`ThompsonPolicy` for how the slate stays exact. The effect's
prior is sized to the spread of the trained candidates' scores for the request, and a slate
gives at most ``ceil(fresh_share * k)`` slots to fresh ads whose evidence has not earned a
place (one of them rotating over those not shown yet), see :class:`_FreshPlan`: a burst of
new ads cannot take the slates, and every one of them is still shown soon.

**Exploratory slots**: ``Slate.explored`` marks the ads the posterior mean's top-k would not
have shown; :class:`~adrec_assets.online.slot_counts.SlotCounts` adds them up per policy with
the slots given to fresh ads (the service's ``/metrics``).

**Folding the draw into the query.** For a draw ``theta~ = [theta~_u, theta~_b, theta~_0]``::

    theta~ . phi(u, a) = (theta~_u * u) . p_a + theta~_b b_a + theta~_0
                       = [theta~_u * u, theta~_b] . [p_a, b_a] + theta~_0

``theta~_0`` is the same for every ad and the sigmoid is monotone, so ONE inner-product search
with ``q~ = [theta~_u * u, theta~_b]`` over the stored ``[p_a, b_a]`` returns the exact
Thompson top-K of the whole catalogue (no retrieve-then-rerank) on an exact (flat) index;
on an approximate one (HNSW) it is as exact as the index's recall for that query.

**Propensities** (``P(policy shows ad a at position j)`` for every served position):

* greedy: 1 (deterministic given the index and the user).
* random: a uniform slate without replacement from ``n`` eligible ads is a uniformly random
  ordered k-sample; by exchangeability the ad at any single position is uniform, so ``1/n``
  (the whole slate has probability ``1 / (n (n-1) ... (n-k+1))``).
* epsilon_greedy (per slot): see :class:`EpsilonGreedyPolicy`; ``1 - rho`` for the greedy ad at
  its position, ``rho / m`` for each of the ``m`` other eligible ads.
* thompson: Monte Carlo, see :class:`ThompsonPolicy` (exact up to MC noise on the top-N
  candidates, ads outside them get no mass).
* any of them with a randomized-order slice: the exact mixture, see
  :class:`RandomizedOrderPolicy`.

**Per request (service).** Build the policy once per posterior/config, e.g.
``make_policy("thompson", posterior=posterior, randomized_share=DEFAULT_RANDOMIZED_SHARE)``
(``posterior.snapshot()`` is taken per request, so a background update is safe), then
``slate = policy.recommend(user, index, k, rng, exclude=seen_slots)`` and log per position
``j``: ``slate.slots[j]`` (mapped to the ad id), ``j``, ``slate.scores[j]``,
``slate.propensities[j]``, ``slate.policy`` and ``slate.randomized``. Run the per-request
NumPy on one BLAS thread (``threadpoolctl.threadpool_limits(1, "blas")``): the matrices are
tiny and threads only add latency. The event batches that follow update the posterior
(:meth:`~adrec_assets.online.posterior.LaplaceLogisticPosterior.update_position_aware`).

Randomness: every random choice comes from the ``np.random.Generator`` passed in; the same
index state, inputs and generator state give the same slate and propensities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from math import comb
from typing import ClassVar, NamedTuple, Protocol

import numpy as np

from adrec_assets.online.fresh_ads import FreshAdEffects, FreshView
from adrec_assets.online.position_bias import DEFAULT_RANDOMIZED_SHARE
from adrec_assets.online.posterior import LaplaceLogisticPosterior
from adrec_assets.settings import SERVE_FRESH_ROTATION, SERVE_FRESH_SHARE

DEFAULT_PROPENSITY_DRAWS = 200
DEFAULT_PROPENSITY_CANDIDATES = 100
DEFAULT_PROPENSITY_FRESH_CANDIDATES = 20
DEFAULT_FRESH_SHARE: float = SERVE_FRESH_SHARE.default
DEFAULT_FRESH_ROTATION: float = SERVE_FRESH_ROTATION.default
#: Largest draw spread (a multiple of the posterior's sd): beyond it the float32 Monte Carlo
#: scores overflow, and no useful exploration lives there.
MAX_EXPLORATION = 1e3


class InnerProductIndex(Protocol):
    """The ad index the policies query (the FAISS one and the tests' brute force)."""

    dim: int  # d; stored vectors have d + 1 columns [p_a, b_a]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, d+1) float32 -> (scores (n, k) float32, slots (n, k) int64), best first; -1 pads."""
        ...

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        """(len(slots), d+1) float32 stored [p_a, b_a]."""
        ...

    def live_slots(self) -> np.ndarray:
        """int64 slots of every servable ad."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Slate:
    """What a policy served: ``slots[j]`` at position ``j`` (0-based).

    ``scores``: today's mean score ``u . p + b`` of each shown ad (for logging).
    ``propensities``: ``P(this policy shows slots[j] at position j)`` for this request.
    ``randomized``: see :class:`RandomizedOrderPolicy`. May be shorter than the requested
    ``k`` when fewer eligible ads exist.
    """

    slots: np.ndarray  # (k,) int64
    scores: np.ndarray  # (k,) float32
    propensities: np.ndarray  # (k,) float64
    policy: str
    randomized: bool = False  # order uniformly permuted (the position-bias slice): log it
    #: ``explored[j]``: the ad at ``j`` is one the posterior mean's top-k would not have shown
    #: (an exploratory slot: a draw's, a replaced epsilon slot, a random one); None: none.
    explored: np.ndarray | None = None


@dataclass(frozen=True)
class PositionDistribution:
    """``probabilities[i, j] = P(slots[i] shown at position j)``; each column sums to 1.

    Exact for greedy, random and epsilon_greedy; a Monte Carlo estimate on the candidates
    for thompson. Meant for checks and off-policy evaluation, not for every request.
    """

    slots: np.ndarray  # (n,) int64
    probabilities: np.ndarray  # (n, k) float64


# ---------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------


def fold_queries(thetas: np.ndarray, user: np.ndarray) -> np.ndarray:
    """Index queries ``[theta_u * u, theta_b]`` (m, d + 1) float32 for parameter rows (m, d + 2).

    ``q . [p_a, b_a] = theta . phi(u, a) - theta_0``: the intercept is the same for every ad,
    so the inner-product order is the order of ``theta . phi``.
    """
    thetas = np.atleast_2d(thetas)
    dim = len(user)
    if thetas.shape[1] != dim + 2:
        raise ValueError(f"thetas: expected {dim + 2} columns for a {dim}-d user, got shape {thetas.shape}")
    return np.hstack([thetas[:, :dim] * user, thetas[:, dim : dim + 1]]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Shared request plumbing
# ---------------------------------------------------------------------------------------


def _check_request(
    user: np.ndarray, index: InnerProductIndex, k: int, exclude: Iterable[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (user float64 (d,), sorted unique excluded slots int64)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: the slate length must be an integer >= 1, got {k!r}")
    user = np.asarray(user, dtype=np.float64)
    if user.shape != (index.dim,):
        raise ValueError(f"user: expected shape ({index.dim},) to match the index, got {user.shape}")
    if not np.all(np.isfinite(user)):
        raise ValueError("user: the user vector must be finite")
    if isinstance(exclude, (set, frozenset)):
        exclude = list(exclude)
    excluded = np.unique(np.asarray(exclude, dtype=np.int64).ravel())
    return user, excluded


def _top_filtered(
    index: InnerProductIndex, queries: np.ndarray, counts: list[int], excluded: np.ndarray
) -> list[np.ndarray]:
    """Row ``i``: the first ``counts[i]`` non-excluded slots of query ``i``, best first.

    Over-fetching ``len(excluded)`` extra results keeps this the exact top of the ads that
    are not excluded: at most that many of the fetched ones can be dropped.
    """
    fetch = min(max(counts) + len(excluded), len(index))
    if fetch == 0:
        return [np.empty(0, dtype=np.int64) for _ in counts]
    _, slots = index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
    rows = []
    for row, count in zip(np.asarray(slots, dtype=np.int64), counts):
        keep = row >= 0
        if len(excluded):
            keep &= ~np.isin(row, excluded)
        rows.append(row[keep][:count])
    return rows


def _todays_scores(vectors: np.ndarray, user: np.ndarray) -> np.ndarray:
    """``u . p + b`` for stored ``[p, b]`` rows, float32 (what the slate logs)."""
    return (vectors[:, :-1] @ user.astype(np.float32) + vectors[:, -1]).astype(np.float32)


def _eligible_live(index: InnerProductIndex, excluded: np.ndarray) -> np.ndarray:
    live = np.asarray(index.live_slots(), dtype=np.int64)
    return live[~np.isin(live, excluded)] if len(excluded) else live


def todays_query(user: np.ndarray) -> np.ndarray:
    """Today's score as an index query: ``[u, 1]`` (d+1,) float32, bit for bit what the
    greedy policy searches with (so an index can pin it, :meth:`AdIndex.pin_query`)."""
    return np.concatenate([np.asarray(user, dtype=np.float64), [1.0]]).astype(np.float32)


def _mean_query(posterior: LaplaceLogisticPosterior | None, user: np.ndarray) -> np.ndarray:
    """Greedy query: the posterior mean folded, or today's ``[u, 1]`` without a posterior."""
    if posterior is None:
        return todays_query(user)[None, :]
    if posterior.dim != len(user):
        raise ValueError(f"posterior: {posterior.dim}-d posterior for a {len(user)}-d index")
    return fold_queries(posterior.mean(), user)


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------


class _Served(NamedTuple):
    """One request's choice: ``slots`` in position order, their stored vectors, and
    ``positions[i, j] = P(the policy shows slots[i] at position j)`` for this request."""

    slots: np.ndarray  # (s,) int64
    vectors: np.ndarray  # (s, d+1) float32
    positions: np.ndarray  # (s, s) float64
    explored: np.ndarray | None = None  # (s,) bool: not in the posterior mean's top-k; None: none


def _nothing_served(index: InnerProductIndex) -> _Served:
    return _Served(np.empty(0, np.int64), np.empty((0, index.dim + 1), np.float32), np.empty((0, 0)))


def _explored_flags(served: _Served) -> np.ndarray:
    if served.explored is None:
        return np.zeros(len(served.slots), dtype=bool)
    return np.asarray(served.explored, dtype=bool)


class Policy(Protocol):
    """What the service calls; ``make_policy`` builds one by name."""

    @property
    def name(self) -> str: ...

    def recommend(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> Slate: ...

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution: ...


class _BasePolicy:
    """``recommend`` for every policy: validate, ``_serve``, log today's scores and the
    propensity of each ad at the position it was served (the diagonal of ``positions``)."""

    name: ClassVar[str]

    def _serve(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, excluded: np.ndarray
    ) -> _Served:
        raise NotImplementedError

    def recommend(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> Slate:
        """The slate for ``user`` (d,): at most ``k`` live ads not in ``exclude`` (slots)."""
        user, excluded = _check_request(user, index, k, exclude)
        served = self._serve(user, index, k, rng, excluded)
        return Slate(
            served.slots, _todays_scores(served.vectors, user), np.diag(served.positions).copy(), self.name,
            explored=_explored_flags(served),
        )  # fmt: skip


@dataclass(frozen=True)
class GreedyPolicy(_BasePolicy):
    """Top-k by the posterior mean (or by today's ``u . p + b`` when ``posterior`` is None)."""

    name: ClassVar[str] = "greedy"
    posterior: LaplaceLogisticPosterior | None = None

    def greedy_slots(self, user: np.ndarray, index: InnerProductIndex, k: int, excluded: np.ndarray) -> np.ndarray:
        return _top_filtered(index, _mean_query(self.posterior, user), [k], excluded)[0]

    def _serve(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, excluded: np.ndarray
    ) -> _Served:
        slots = self.greedy_slots(user, index, k, excluded)
        if len(slots) == 0:
            return _nothing_served(index)
        return _Served(slots, np.asarray(index.vectors(slots)), np.eye(len(slots)))

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution:
        user, excluded = _check_request(user, index, k, exclude)
        slots = self.greedy_slots(user, index, k, excluded)
        return PositionDistribution(slots, np.eye(len(slots)))


@dataclass(frozen=True)
class RandomPolicy(_BasePolicy):
    """A uniformly random slate (without replacement) of the live, non-excluded ads."""

    name: ClassVar[str] = "random"

    def _serve(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, excluded: np.ndarray
    ) -> _Served:
        eligible = _eligible_live(index, excluded)
        if len(eligible) == 0:
            return _nothing_served(index)
        slots = eligible[rng.choice(len(eligible), size=min(k, len(eligible)), replace=False)]
        positions = np.full((len(slots), len(slots)), 1.0 / len(eligible))
        greedy = _top_filtered(index, _mean_query(None, user), [k], excluded)[0]  # a reference policy: one more search
        return _Served(slots, np.asarray(index.vectors(slots)), positions, ~np.isin(slots, greedy))

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution:
        user, excluded = _check_request(user, index, k, exclude)
        eligible = _eligible_live(index, excluded)
        width = min(k, len(eligible))
        return PositionDistribution(eligible, np.full((len(eligible), width), 1.0 / max(len(eligible), 1)))


def _replacement_probability(epsilon: float, slate_length: int, pool_size: int) -> float:
    """``rho = P(a given position shows an explored ad)`` for the per-slot epsilon-greedy.

    Each of the ``k`` positions flips an epsilon coin; if more coins come up than the pool has
    ads (``m``), a uniformly random ``m`` of them are filled. With ``R'`` ~ Binomial(k - 1, eps)
    other heads: ``rho = eps * E[min(1, m / (1 + R'))]`` (just ``eps`` when ``m >= k``).
    """
    if pool_size == 0 or epsilon == 0:
        return 0.0
    if pool_size >= slate_length:
        return float(epsilon)
    return epsilon * sum(
        comb(slate_length - 1, others) * epsilon**others * (1 - epsilon) ** (slate_length - 1 - others)
        * min(1.0, pool_size / (1 + others))
        for others in range(slate_length)
    )  # fmt: skip


@dataclass(frozen=True)
class EpsilonGreedyPolicy(_BasePolicy):
    """Greedy, but each slot is replaced with probability ``epsilon`` by a random ad.

    Per slot (not per slate) so an exploring request still shows mostly relevant ads. The
    replacements are a uniformly random ordered sample, without replacement, from the ``m``
    eligible ads outside the greedy slate (so a swapped-out greedy ad never reappears
    elsewhere). Propensities, with ``rho`` from :func:`_replacement_probability`: the greedy
    ad at its own position ``1 - rho``; any of the ``m`` other ads at any position ``rho / m``
    (given a replaced position, its ad is uniform over the pool by exchangeability).
    """

    name: ClassVar[str] = "epsilon_greedy"
    epsilon: float = 0.05
    posterior: LaplaceLogisticPosterior | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon: the per-slot exploration probability must lie in [0, 1], got {self.epsilon}")

    def _greedy_and_pool_size(
        self, user: np.ndarray, index: InnerProductIndex, k: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, int]:
        greedy = GreedyPolicy(self.posterior).greedy_slots(user, index, k, excluded)
        n_excluded_live = int(np.isin(excluded, index.live_slots()).sum()) if len(excluded) else 0
        return greedy, len(index) - n_excluded_live - len(greedy)

    def _serve(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, excluded: np.ndarray
    ) -> _Served:
        greedy, pool_size = self._greedy_and_pool_size(user, index, k, excluded)
        if len(greedy) == 0:
            return _nothing_served(index)
        rho = _replacement_probability(self.epsilon, len(greedy), pool_size)
        replaced = np.flatnonzero(rng.random(len(greedy)) < self.epsilon)
        if pool_size == 0:
            replaced = replaced[:0]
        elif len(replaced) > pool_size:
            replaced = np.sort(rng.choice(replaced, size=pool_size, replace=False))
        slots = greedy.copy()
        if len(replaced):
            slots[replaced] = _distinct_uniform(index, np.union1d(excluded, greedy), pool_size, len(replaced), rng)
        positions = (1.0 - rho) * np.eye(len(slots))
        positions[replaced] = rho / max(pool_size, 1)  # an explored ad: any position equally
        explored = np.zeros(len(slots), dtype=bool)
        explored[replaced] = True  # the pool is the ads outside the greedy slate
        return _Served(slots, np.asarray(index.vectors(slots)), positions, explored)

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution:
        user, excluded = _check_request(user, index, k, exclude)
        greedy, pool_size = self._greedy_and_pool_size(user, index, k, excluded)
        rho = _replacement_probability(self.epsilon, len(greedy), pool_size)
        pool = _eligible_live(index, np.union1d(excluded, greedy))
        explored = np.full((len(pool), len(greedy)), rho / max(pool_size, 1))
        probabilities = np.vstack([(1.0 - rho) * np.eye(len(greedy)), explored])
        return PositionDistribution(np.concatenate([greedy, pool]), probabilities)


def _distinct_uniform(
    index: InnerProductIndex, forbidden: np.ndarray, pool_size: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """A uniformly random ordered sample of ``count`` distinct live slots not in ``forbidden``.

    Rejection sampling from the live slots while the pool is most of the catalogue (a few
    draws instead of an O(n) set difference per request); the explicit pool otherwise.
    """
    live = np.asarray(index.live_slots(), dtype=np.int64)
    if pool_size >= len(live) // 2:
        chosen: list[int] = []
        taken = set(forbidden.tolist())
        while len(chosen) < count:
            for slot in live[rng.integers(len(live), size=2 * (count - len(chosen)) + 4)].tolist():
                if slot not in taken:
                    taken.add(slot)
                    chosen.append(slot)
                    if len(chosen) == count:
                        break
        return np.asarray(chosen, dtype=np.int64)
    pool = live[~np.isin(live, forbidden)]
    return pool[rng.choice(len(pool), size=count, replace=False)]


@dataclass(frozen=True)
class ThompsonPolicy(_BasePolicy):
    """Contextual Thompson sampling: one posterior draw per request, folded into the query.

    ``recommend`` draws ``theta~`` first (``posterior.sample(rng, exploration_scale * shared_scale)``), then
    searches ``[fold(theta~), fold(mean)]`` in ONE index call: row 0 is the served slate, row
    1 the ``propensity_candidates`` (N) best ads under the mean. Propensities: M =
    ``propensity_draws`` more draws, scored on the N' = N + served candidates with one
    float32 product (:meth:`LaplaceLogisticPosterior.sample_scores`: the draws enter as
    ``(N', d+2) @ (d+2, M)``, the same numbers as ``(M, d+1) @ (d+1, N')`` on folded draws),
    each served ad's share of draws in which it ranks exactly at its served position among
    the candidates. Approximation: ads outside the candidates get no mass (their would-be
    share goes to the candidates); the MC error is ``sqrt(p (1 - p) / M)``; a served ad no
    draw puts there is floored at ``1 / (M + 1)`` (it *was* shown, so its propensity is
    positive). ``exploration_scale`` multiplies the posterior's spread (0: the mean, i.e.
    greedy); ``shared_scale`` multiplies the shared model's spread only (0: every draw uses
    its mean, and only the fresh ads' own effects explore: uncertainty per entity, not over
    the few shared parameters greedy learns anyway).

    ``fresh`` (:class:`~adrec_assets.online.fresh_ads.FreshAdEffects`): ads without training
    clicks carry their own logit offset ``r_a``, drawn per request. The index then returns
    the draw's top-k among the trained ads (searched deeper while fresh ads fill its
    results), every fresh ad is scored exactly (``q~ . [p_a, b_a] + r~_a``, one small
    product), and the slate is the top-k of the union: still the exact Thompson top-k. The
    propensity candidates add the fresh ads' top ``propensity_fresh_candidates`` by an
    optimistic score (mean effect plus two standard deviations), each drawing its own effect
    in every Monte Carlo draw.

    ``fresh_spread_prior`` (default on): each effect's prior sd is ``fresh.prior_sd`` times
    the spread (sd) of the posterior mean's scores over the trained candidates of this
    request, the evidence of its impressions kept: the exploration a fresh ad gets is sized
    to the scores it competes with, whatever scale the model has learnt. ``fresh_share``
    (default 0.2; 1: no cap): at most ``ceil(fresh_share * k)`` slots per slate go to
    *unearned* fresh ads (no evidence yet, or a posterior mean score below the k-th trained
    one); fresh ads whose clicks lifted them above it are not held. With probability
    ``min(1, fresh_share * k)`` one of the capped slots, the last position, shows a fresh ad
    never shown yet, drawn uniformly (:class:`_FreshPlan`). The Monte Carlo draws apply the
    same cap and rotation, so logged propensities stay those of the capped policy.
    """

    name: ClassVar[str] = "thompson"
    posterior: LaplaceLogisticPosterior | None = None
    exploration_scale: float = 1.0
    propensity_draws: int = DEFAULT_PROPENSITY_DRAWS
    propensity_candidates: int = DEFAULT_PROPENSITY_CANDIDATES
    fresh: FreshAdEffects | None = None
    propensity_fresh_candidates: int = DEFAULT_PROPENSITY_FRESH_CANDIDATES
    fresh_share: float = DEFAULT_FRESH_SHARE
    fresh_spread_prior: bool = True
    #: a fresh ad never shown waits on average this many requests for its first impression
    #: (exponentially): a slate rotates one in with probability ``min(fresh_share * k, unshown /
    #: fresh_rotation, 1)``, a uniform pick among them
    fresh_rotation: float = DEFAULT_FRESH_ROTATION
    shared_scale: float = 1.0
    #: ``B L^-T`` (d, r) of the user's own posterior (:mod:`~adrec_assets.online.user_posterior`):
    #: each draw's user vector is ``user + user_spread @ z``; None: the user vector is fixed.
    user_spread: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.user_spread is not None:
            spread = np.asarray(self.user_spread)
            if spread.ndim != 2 or not np.all(np.isfinite(spread)):
                raise ValueError(f"user_spread: expected a finite (d, r) matrix, got shape {spread.shape}")
        if not isinstance(self.posterior, LaplaceLogisticPosterior):
            raise ValueError(
                "posterior: thompson needs a LaplaceLogisticPosterior "
                "(LaplaceLogisticPosterior.prior(dim) before any feedback)"
            )
        if not (np.isfinite(self.exploration_scale) and self.exploration_scale >= 0):
            raise ValueError(f"exploration_scale: must be a finite number >= 0, got {self.exploration_scale}")
        if not (np.isfinite(self.shared_scale) and 0 <= self.shared_scale <= MAX_EXPLORATION):
            raise ValueError(
                f"shared_scale (ADREC_SERVE_SHARED_EXPLORATION): must be a number in [0, {MAX_EXPLORATION:g}], "
                f"got {self.shared_scale}"
            )
        if not (np.isfinite(self.fresh_rotation) and self.fresh_rotation >= 1):
            raise ValueError(
                f"fresh_rotation (ADREC_SERVE_FRESH_ROTATION): must be a number of requests >= 1, got "
                f"{self.fresh_rotation}"
            )
        if not (np.isfinite(self.fresh_share) and 0 <= self.fresh_share <= 1):
            raise ValueError(
                f"fresh_share (ADREC_SERVE_FRESH_SHARE): must be a share in [0, 1], got {self.fresh_share}"
            )
        for name in ("propensity_draws", "propensity_candidates", "propensity_fresh_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")

    @property
    def _shared_spread(self) -> float:
        """The shared model's draw spread: ``exploration_scale`` x ``shared_scale``."""
        return self.exploration_scale * self.shared_scale

    def _check_dim(self, user: np.ndarray) -> LaplaceLogisticPosterior:
        assert self.posterior is not None
        posterior = self.posterior.snapshot()
        if posterior.dim != len(user):
            raise ValueError(f"posterior: {posterior.dim}-d posterior for a {len(user)}-d index")
        if self.user_spread is not None and self.user_spread.shape[0] != len(user):
            raise ValueError(f"user_spread: {self.user_spread.shape[0]} rows for a {len(user)}-d user")
        return posterior

    def _user_draws(self, user: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray | None:
        """(count, d) draws of the user's vector from their own posterior; None without one."""
        if self.user_spread is None:
            return None
        spread = np.asarray(self.user_spread, dtype=np.float64)
        return user + self.exploration_scale * (rng.standard_normal((count, spread.shape[1])) @ spread.T)

    def _sampled_scores(
        self,
        posterior: LaplaceLogisticPosterior,
        user: np.ndarray,
        candidate_vectors: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """(N', M) sampled logits of the candidates under M fresh posterior draws.

        ``phi`` is built in float32 without :func:`ad_features`' checks: the vectors come from
        the index and the user was validated (this is the hot path of every request)."""
        dim = len(user)
        users = self._user_draws(user, rng, self.propensity_draws)
        if users is not None:  # each draw has its own user vector: (N', d) @ (d, M) on theta~_u * w~
            thetas = posterior.sample_many(rng, self.propensity_draws, self._shared_spread).astype(np.float32)
            vectors = np.asarray(candidate_vectors, dtype=np.float32)
            loadings = (thetas[:, :dim] * users.astype(np.float32)).T
            return vectors[:, :dim] @ loadings + vectors[:, dim : dim + 1] * thetas[:, dim] + thetas[:, dim + 1]
        features = np.empty((len(candidate_vectors), dim + 2), dtype=np.float32)
        features[:, :dim] = candidate_vectors[:, :dim] * user.astype(np.float32)
        features[:, dim] = candidate_vectors[:, dim]
        features[:, dim + 1] = 1.0
        return posterior.sample_scores(rng, features, self.propensity_draws, self._shared_spread)

    def _serve(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, excluded: np.ndarray
    ) -> _Served:
        posterior = self._check_dim(user)
        draw = posterior.sample(rng, self._shared_spread)
        user_draw = self._user_draws(user, rng, 1)
        drawn_user = user if user_draw is None else user_draw[0]
        queries = np.vstack([fold_queries(draw, drawn_user), fold_queries(posterior.mean(), user)])
        fresh = self._fresh_view(excluded)
        mean_depth = max(self.propensity_candidates, k)  # the mean's top-k names the exploratory slots
        plan = None
        if fresh is None:
            slots, mean_top = _top_filtered(index, queries, [k, mean_depth], excluded)
            mean_top_k = mean_top[:k]
        else:
            slots, mean_top, plan = self._top_with_fresh(index, queries, k, excluded, fresh, rng)
            mean_top_k = plan.mean_top_k
        if len(slots) == 0:
            return _nothing_served(index)
        candidates = np.concatenate([slots, _not_in(mean_top, slots)])  # the served ads first: rows 0..k-1
        if plan is not None:
            candidates = np.concatenate([candidates, _not_in(self._fresh_candidates(plan, queries[1]), candidates)])
        vectors = np.asarray(index.vectors(candidates))
        sampled = self._candidate_scores(posterior, user, candidates, vectors, plan, rng)
        if plan is None or not plan.capped:
            positions = _served_position_shares(sampled, len(slots))
        else:
            positions = plan.position_shares(candidates, sampled, len(slots))[: len(slots)]
        served = np.arange(len(slots))
        positions[served, served] = np.maximum(positions[served, served], 1.0 / (self.propensity_draws + 1))
        return _Served(slots, vectors[: len(slots)], positions, ~np.isin(slots, mean_top_k))

    def _fresh_view(self, excluded: np.ndarray) -> FreshView | None:
        """The fresh ads' effects without the excluded ones; None when there are none."""
        if self.fresh is None:
            return None
        view = self.fresh.view()
        if len(excluded) and view.count:
            view = view.without(excluded)
        return view if view.count else None

    def _top_with_fresh(
        self, index: InnerProductIndex, queries: np.ndarray, k: int, excluded: np.ndarray, fresh: FreshView,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, _FreshPlan]:  # fmt: skip
        """(Thompson slate, the mean's top-N, the request's fresh plan) when fresh ads carry a
        random effect.

        Trained ads: the folded draw's top-k among them from the index (fetched deeper until
        k of the results are trained ads, so fresh ads in the results never crowd one out).
        Fresh ads: every one scored exactly, ``q~ . [p_a, b_a] + r~_a`` with ``r~_a`` drawn
        per request from the effect sized for this query (:meth:`_fresh_plan`). Uncapped
        (``fresh_share`` 1), the top-k of the union is the exact Thompson top-k of the
        catalogue; capped, it is that ranking walked under the cap (:func:`_capped_slate`)."""
        depth = 2 * k
        mean_depth = max(self.propensity_candidates, k)
        while True:
            row, mean_top = _top_filtered(index, queries, [depth, mean_depth], excluded)
            trained = row[fresh.rows_of(row) < 0]
            if len(trained) >= k or len(row) < depth:
                break
            depth *= 4
        trained = trained[:k]
        draw_query = queries[0]
        plan = self._fresh_plan(index, queries[1], mean_top, k, fresh)
        effects = plan.mean + self.exploration_scale * plan.sd * rng.standard_normal(fresh.count)
        scores = np.concatenate([
            np.asarray(index.vectors(trained)) @ draw_query, fresh.vectors @ draw_query + effects.astype(np.float32),
        ])  # fmt: skip
        pooled = np.concatenate([trained, fresh.slots])
        if not plan.capped:
            return pooled[np.argsort(-scores, kind="stable")[:k]], mean_top, plan
        untrained = np.zeros(len(trained), dtype=bool)
        unearned = np.concatenate([untrained, plan.unearned])
        rotation = np.concatenate([untrained, plan.rotation]) if rng.random() < plan.rotate else None
        return pooled[_capped_slate(scores, k, unearned, plan.cap, rotation, rng)], mean_top, plan

    def _fresh_plan(
        self, index: InnerProductIndex, mean_query: np.ndarray, mean_top: np.ndarray, k: int, fresh: FreshView
    ) -> _FreshPlan:
        """The fresh ads' effects sized for this query, which of them are held to the cap, and
        the posterior mean's top-k (see :class:`_FreshPlan`)."""
        trained = mean_top[fresh.rows_of(mean_top) < 0]
        trained_scores = (np.asarray(index.vectors(trained)) @ mean_query).astype(np.float64)
        evidence = np.maximum(fresh.precision - fresh.prior_precision, 0.0)  # what impressions added
        spread = float(np.std(trained_scores)) if len(trained_scores) >= 2 else 0.0
        assert self.fresh is not None
        if self.fresh_spread_prior and spread > 0:
            # the stored effect re-based on this query's prior N(0, (prior_sd * spread)^2): the
            # evidence (precision h - h0, natural mean h m) is kept, the prior replaced
            precision = 1.0 / (self.fresh.prior_sd * spread) ** 2 + evidence
            mean = fresh.precision * fresh.mean / precision
        else:
            precision, mean = fresh.precision, fresh.mean
        fresh_scores = (fresh.vectors @ mean_query).astype(np.float64) + mean
        threshold = trained_scores[min(k, len(trained_scores)) - 1] if len(trained_scores) else -np.inf
        unearned = ~((evidence > 0) & (fresh_scores >= threshold))  # no evidence yet, or it keeps the ad out
        capped = self.fresh_share < 1
        cap = math.ceil(self.fresh_share * k - 1e-9) if capped else k
        pooled_scores = np.concatenate([trained_scores, fresh_scores])
        top = _best(pooled_scores, np.arange(len(pooled_scores)), k)
        rotation = unearned & (evidence == 0)
        return _FreshPlan(
            view=fresh, mean=mean, sd=1.0 / np.sqrt(precision), unearned=unearned, rotation=rotation,
            cap=cap, rotate=self._rotation_rate(k, rotation) if capped and cap >= 1 else 0.0, capped=capped,
            mean_top_k=np.concatenate([trained, fresh.slots])[top],
        )  # fmt: skip

    def _rotation_rate(self, k: int, rotation: np.ndarray) -> float:
        """How often a slate rotates in a fresh ad never shown: enough that each waits about
        ``fresh_rotation`` requests on average, never above ``fresh_share * k`` (or 1)."""
        return min(1.0, self.fresh_share * k, float(rotation.sum()) / self.fresh_rotation)

    def _fresh_candidates(self, plan: _FreshPlan, mean_query: np.ndarray) -> np.ndarray:
        """The fresh ads most likely to reach a slate: the top ``propensity_fresh_candidates``
        by an optimistic mean score (two standard deviations of their effect above its mean)."""
        fresh = plan.view
        optimistic = fresh.vectors @ mean_query + plan.mean + 2 * self.exploration_scale * plan.sd
        count = min(self.propensity_fresh_candidates, fresh.count)
        return fresh.slots[np.argpartition(-optimistic, count - 1)[:count]]

    def _candidate_scores(
        self, posterior: LaplaceLogisticPosterior, user: np.ndarray, candidates: np.ndarray, vectors: np.ndarray,
        plan: _FreshPlan | None, rng: np.random.Generator,
    ) -> np.ndarray:  # fmt: skip
        """(N', M) sampled logits of the candidates: the shared draws, plus each fresh
        candidate's own random effect drawn independently per draw."""
        sampled = self._sampled_scores(posterior, user, vectors, rng)
        if plan is None:
            return sampled
        found = plan.view.rows_of(candidates)
        rows = np.flatnonzero(found >= 0)
        if len(rows):
            effect = found[rows]
            noise = rng.standard_normal((len(rows), sampled.shape[1]), dtype=np.float32)
            sd = (self.exploration_scale * plan.sd[effect]).astype(np.float32)
            sampled[rows] += plan.mean[effect].astype(np.float32)[:, None] + sd[:, None] * noise
        return sampled

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution:
        """MC distribution over the mean's top-N candidates (and the fresh ads' top N by an
        optimistic score); columns sum to 1 when there are at least k candidates (under the
        cap, up to the rotation's mass on fresh ads outside the candidates)."""
        user, excluded = _check_request(user, index, k, exclude)
        posterior = self._check_dim(user)
        mean_query = fold_queries(posterior.mean(), user)
        candidates = _top_filtered(index, mean_query, [max(self.propensity_candidates, k)], excluded)[0]
        fresh = self._fresh_view(excluded)
        plan = None
        if fresh is not None:
            plan = self._fresh_plan(index, mean_query[0], candidates, k, fresh)
            candidates = np.concatenate([candidates, _not_in(self._fresh_candidates(plan, mean_query[0]), candidates)])
        width = min(k, len(candidates))
        if width == 0:
            return PositionDistribution(candidates, np.zeros((len(candidates), 0)))
        vectors = np.asarray(index.vectors(candidates))
        sampled = self._candidate_scores(posterior, user, candidates, vectors, plan, rng)
        if plan is not None and plan.capped:
            return PositionDistribution(candidates, plan.position_shares(candidates, sampled, width))
        order = np.argsort(-sampled, axis=0, kind="stable")[:width]  # (width, M): candidate at position j
        counts = np.zeros((len(candidates), width))
        np.add.at(counts, (order, np.broadcast_to(np.arange(width)[:, None], order.shape)), 1.0)
        return PositionDistribution(candidates, counts / self.propensity_draws)


class _FreshPlan(NamedTuple):
    """One request's fresh ads (rows of ``view``), sized and capped for this query.

    ``mean``/``sd``: each effect under the prior ``N(0, (prior_sd * spread)^2)``, ``spread``
    the sd of the posterior mean's scores over the trained candidates (the mean's top-N), with
    the evidence of the ad's impressions kept (or the stored effect, ``fresh_spread_prior``
    off). ``unearned``: held to the cap: no evidence yet, or a posterior mean score below the
    k-th trained one. ``rotation``: unearned and never shown; with probability ``rotate`` a
    slate gives one capped slot, its last position, to one of them drawn uniformly (among
    those the rest of the slate left out), so every fresh ad is reached however poor its
    projected score. ``mean_top_k``: the posterior mean's top-k, fresh ads at their mean effect.
    """

    view: FreshView
    mean: np.ndarray  # (F,) float64
    sd: np.ndarray  # (F,) float64, before exploration_scale
    unearned: np.ndarray  # (F,) bool
    rotation: np.ndarray  # (F,) bool
    cap: int  # at most this many unearned fresh ads per slate
    rotate: float
    capped: bool
    mean_top_k: np.ndarray  # (<= k,) int64

    def position_shares(self, candidates: np.ndarray, sampled: np.ndarray, width: int) -> np.ndarray:
        """(N', width) P(candidate at position j) over the draws (columns of ``sampled``),
        each draw's slate chosen as :func:`_capped_slate` chooses the served one."""
        found = self.view.rows_of(candidates)
        fresh = found >= 0
        unearned = np.zeros(len(candidates), dtype=bool)
        rotation = np.zeros(len(candidates), dtype=bool)
        unearned[fresh], rotation[fresh] = self.unearned[found[fresh]], self.rotation[found[fresh]]
        rotation_total = int(self.rotation.sum())
        rotate = self.rotate if rotation_total else 0.0
        return _capped_position_shares(sampled, width, unearned, self.cap, rotate, rotation, rotation_total)


def _best(scores: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """The (at most) ``count`` of ``rows`` with the highest ``scores``, in no order."""
    if count <= 0 or len(rows) == 0:
        return rows[:0]
    if count >= len(rows):
        return rows
    return rows[np.argpartition(-scores[rows], count - 1)[:count]]


def _capped_top(scores: np.ndarray, length: int, unearned: np.ndarray, cap: int) -> np.ndarray:
    """The first ``length`` indices of ``scores`` ranked best first, taking at most ``cap`` of
    the ``unearned`` (the rest skipped): the best ``length`` of the best ``length`` others and
    the best ``cap`` unearned, so two partial selections instead of a sort of every score."""
    picked = np.concatenate([
        _best(scores, np.flatnonzero(~unearned), length), _best(scores, np.flatnonzero(unearned), min(cap, length)),
    ])  # fmt: skip
    return picked[np.argsort(-scores[picked], kind="stable")][:length]


def _capped_slate(
    scores: np.ndarray, k: int, unearned: np.ndarray, cap: int, rotation: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``scores`` for one slate: best first, at most ``cap`` of the ``unearned``.

    With ``rotation`` (a rotating slate, ``cap`` >= 1): the first ``length - 1`` positions
    take at most ``cap - 1`` unearned entries, and the last goes to a uniformly drawn
    ``rotation`` entry the rest left out (or, when none is left, to the walk's next one)."""
    length = min(k, len(scores))
    if rotation is None or cap < 1 or not rotation.any():
        return _capped_top(scores, length, unearned, cap)
    top = _capped_top(scores, length - 1, unearned, cap - 1)
    left = np.flatnonzero(rotation)
    left = left[~np.isin(left, top)]
    if len(left) == 0:
        return _capped_top(scores, length, unearned, cap - 1)
    return np.append(top, left[rng.integers(len(left))])


def _ranked_top(scores: np.ndarray, depth: int) -> np.ndarray:
    """(M, depth) column indices of each row's ``depth`` highest scores, best first.

    A sort of the values (vectorized, several times cheaper than an argsort or a row-wise
    argpartition) gives each row's depth-th score; the entries at or above it are then ranked
    among themselves. Rows with ties at that score take a full argsort instead."""
    depth = min(depth, scores.shape[1])
    if depth == scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")
    threshold = np.sort(scores, axis=1)[:, scores.shape[1] - depth]
    above = scores >= threshold[:, None]
    if np.count_nonzero(above) != above.shape[0] * depth:  # ties at some row's threshold
        return np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    top = np.nonzero(above)[1].reshape(-1, depth)  # row-major: each row's depth entries, by index
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), axis=1)


def _capped_position_shares(
    sampled: np.ndarray, width: int, unearned: np.ndarray, cap: int, rotate: float, rotation: np.ndarray,
    rotation_total: int,
) -> np.ndarray:  # fmt: skip
    """(N', width): the share of draws (columns of ``sampled``) whose capped slate
    (:func:`_capped_slate`) puts candidate i at position j.

    Each draw walks its ranking best first, skipping the unearned past the cap; ``width``
    kept entries lie within the first ``width`` + (number of unearned candidates), so only
    that many are walked (:func:`_ranked_top`). The
    rotating slates (probability ``rotate``) are averaged over their uniform pick in closed
    form: in a draw whose first ``width - 1`` positions hold ``t`` of the ``rotation_total``
    rotation ads, each other candidate rotation ad gets ``1 / (total - t)`` of the last
    position (the rest goes to rotation ads outside the candidates)."""
    count, draws = sampled.shape
    scores = np.ascontiguousarray(sampled.T)  # (M, N'): one draw per row
    order = _ranked_top(scores, width + int(np.count_nonzero(unearned)))  # (M, depth): ranked r in draw m
    held = unearned[order]
    taken = np.cumsum(held, axis=1)
    shares = np.zeros(count * width)

    def walk(limit: int) -> np.ndarray:  # (M, depth): each ranked entry's position in the walk, -1 if skipped
        keep = ~held | (taken <= limit)
        return np.where(keep, np.cumsum(keep, axis=1) - 1, -1)

    def add(position: np.ndarray, below: int, weight: float | np.ndarray) -> None:
        chosen = (position >= 0) & (position < below)
        weights = np.broadcast_to(weight, position.shape)[chosen]
        shares[:] += np.bincount(order[chosen] * width + position[chosen], weights, count * width)

    if rotate < 1:
        add(walk(cap), width, (1 - rotate) / draws)
    if rotate > 0:
        position = walk(cap - 1)
        in_top = (position >= 0) & (position < width - 1)
        add(position, width - 1, rotate / draws)
        left = rotation_total - (in_top & rotation[order]).sum(axis=1)  # (M,) rotation ads the top left out
        each = np.where(left > 0, 1.0 / np.maximum(left, 1), 0.0)  # (M,) an eligible one's chance in draw m
        in_top_mass = np.bincount(order[in_top], np.broadcast_to(each[:, None], in_top.shape)[in_top], count)
        shares.reshape(count, width)[:, width - 1] += rotate / draws * rotation * (each.sum() - in_top_mass)
        add(np.where(position == width - 1, position, -1), width, np.where(left == 0, rotate / draws, 0.0)[:, None])
    return shares.reshape(count, width)


def _not_in(slots: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``slots`` without those in ``others``, order kept (a binary search each in the sorted
    ``others``: several times faster than ``np.isin``, which sorts both)."""
    if not len(others) or not len(slots):
        return slots
    ordered = np.sort(others)
    found = ordered[np.minimum(np.searchsorted(ordered, slots), len(ordered) - 1)]
    return slots[found != slots]


def _served_position_shares(sampled: np.ndarray, served: int) -> np.ndarray:
    """(served, served): share of draws (columns of ``sampled``) putting candidate i at position j.

    Rank = number of candidates scoring strictly higher (a (N', served, M) comparison summed
    in uint8/uint32, the cheapest layout). Exact duplicates tie in every draw; when the
    candidates hold any, a tie group of size t spreads its positions uniformly (1/t each).
    """
    count_type = np.uint8 if len(sampled) < 256 else np.uint32
    above = (sampled[:, None, :] > sampled[None, :served, :]).view(np.uint8).sum(axis=0, dtype=count_type)
    draws = sampled.shape[1]
    if len(np.unique(sampled[:, 0])) == len(sampled):
        within = above < served  # cell (i, above[i, m]) gets one count per draw
        cells = (np.arange(served)[:, None] * served + above)[within]
        return np.bincount(cells, minlength=served * served).reshape(served, served) / draws
    positions = np.arange(served)[None, :, None]  # (1, served, 1) against (served, 1, M)
    tied = (sampled[:, None, :] == sampled[None, :served, :]).view(np.uint8).sum(axis=0, dtype=count_type)
    above, tied = above.astype(np.int64)[:, None, :], tied.astype(np.int64)[:, None, :]
    return np.where((above <= positions) & (positions < above + tied), 1.0 / tied, 0.0).mean(axis=2)


@dataclass(frozen=True)
class RandomizedOrderPolicy:
    """``base``, with the order of a ``share`` of its slates uniformly permuted.

    The randomized slice :func:`~adrec_assets.online.position_bias.estimate_from_randomized`
    needs (log ``slate.randomized`` as the ``randomized`` column). The logging policy is then
    a mixture, so every slate's propensities (permuted or not) are the exact mixture:
    ``P(a at j) = (1 - share) P_base(a at j) + share P_base(a in slate) / s`` for a slate
    of length ``s``, with ``P_base(a in slate) = sum_j P_base(a at j)`` (Monte Carlo for
    thompson, like its propensities). ``rng.random()`` is drawn after the base policy's
    choices, the permutation only when randomized.
    """

    base: _BasePolicy
    share: float = DEFAULT_RANDOMIZED_SHARE

    def __post_init__(self) -> None:
        if not isinstance(self.base, _BasePolicy):
            raise ValueError(f"base: expected one of the policies of make_policy, got {type(self.base).__name__}")
        if not 0 <= self.share <= 1:
            raise ValueError(f"randomized_share: must lie in [0, 1], got {self.share}")

    @property
    def name(self) -> str:
        return self.base.name

    def recommend(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> Slate:
        user, excluded = _check_request(user, index, k, exclude)
        served = self.base._serve(user, index, k, rng, excluded)
        length = len(served.slots)
        randomized = bool(rng.random() < self.share)
        if length == 0:
            return Slate(served.slots, np.empty(0, np.float32), np.empty(0), self.name, randomized, np.zeros(0, bool))
        order = rng.permutation(length) if randomized else np.arange(length)  # order[j]: shown at j
        inclusion = np.minimum(served.positions.sum(axis=1), 1.0)  # the MC floor may push it over 1
        at_position = served.positions[order, np.arange(length)]
        propensities = (1 - self.share) * at_position + self.share * inclusion[order] / length
        scores = _todays_scores(served.vectors[order], user)
        return Slate(served.slots[order], scores, propensities, self.name, randomized, _explored_flags(served)[order])

    def position_distribution(
        self, user: np.ndarray, index: InnerProductIndex, k: int, rng: np.random.Generator, exclude: Iterable[int] = ()
    ) -> PositionDistribution:
        base = self.base.position_distribution(user, index, k, rng, exclude)
        width = base.probabilities.shape[1]
        inclusion = base.probabilities.sum(axis=1, keepdims=True)
        mixed = (1 - self.share) * base.probabilities + self.share * inclusion / max(width, 1)
        return PositionDistribution(base.slots, mixed)


#: The policies by name, in the order the service lists them (``?policy=``, the demo page)
#: and the bandit simulator numbers its seed streams (``benchmarks/bandit_sim.py``): append a
#: new one, never reorder them.
_POLICY_CLASSES: dict[str, type[_BasePolicy]] = {
    policy.name: policy for policy in (GreedyPolicy, EpsilonGreedyPolicy, ThompsonPolicy, RandomPolicy)
}
POLICIES: tuple[str, ...] = tuple(_POLICY_CLASSES)


def make_policy(name: str, *, randomized_share: float = 0.0, **config: object) -> Policy:
    """A policy by name (:data:`POLICIES`): ``greedy``, ``epsilon_greedy``, ``thompson`` or ``random``.

    ``config``: the policy's fields, e.g. ``make_policy("thompson", posterior=p,
    propensity_draws=200)`` or ``make_policy("epsilon_greedy", epsilon=0.05)``.
    ``randomized_share`` > 0 (the service: ``DEFAULT_RANDOMIZED_SHARE``, 2%) wraps it in
    :class:`RandomizedOrderPolicy` for the position-bias slice.
    """
    if name not in _POLICY_CLASSES:
        raise ValueError(f"name: unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    policy_class = _POLICY_CLASSES[name]
    accepted = {field.name for field in fields(policy_class)}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"config: {name} does not take {unknown}; it accepts {sorted(accepted) or 'no options'}")
    policy = policy_class(**config)
    if randomized_share == 0:
        return policy
    return RandomizedOrderPolicy(policy, randomized_share)
