"""Exploration policies through the online service in a semi-synthetic world: regret, new ads,
position bias.

A *world* fixes a hidden truth: every (user, ad) pair has a click probability given
examination ``P(click | examined) = sigmoid(a <u*, p*_a> + b)``, and position ``j`` of a
slate is examined with a known ``theta_j``. The service starts from what the pipeline learnt
(its own user vectors and projected ads, trained on part of the data, published as a
snapshot), never from the truth, so there is something to learn and greedy can be wrong.

Each round a user drawn uniformly asks ``RecommendationService.recommend(user, k, policy)``
for a slate; the simulator draws examination by ``theta`` and clicks by the truth, posts the
impressions and clicks with ``record_events`` (the service's EMA user update, served-request
checks, event log and posterior learning), calls ``settle(now=...)`` on a simulated clock so
impressions teach the Thompson posterior, flushes the event log into the run's folder, and
adds new ads during the run with ``add_ad`` (the path of ``POST /v1/ads``, handed the ad's
cached content vector instead of encoding it again). Store: :class:`MemoryStore`.

Per round, regret = expected clicks of the best slate under the truth (the ``k`` live ads
with the highest true click probability, best at the top) minus the expected clicks of the
served slate, both ``sum_j theta_j P(click | examined)``. Position bias
(:mod:`adrec_assets.online.position_bias`): the ratio estimator on the randomized slices (the
service's ``randomized_share``) of a seed's runs pooled, regression-EM on each greedy or
exploring policy's own log.

The MovieLens world (``--source``, ml-latest-small converted by
``python -m adrec_assets.sources.movielens``): truth = EASE (Steck 2019) fitted on ALL clicks,
a model class no learner here uses (``--truth als``: implicit-ALS factors, the old truth);
``a`` and ``b`` calibrated so the mean over users of their best 5 ads' click probability is
``--best-ctr`` and the catalogue-wide mean ``--mean-ctr`` (realistic rates: 5% and 0.5%). Per
seed, 20% of the ads (stratified by popularity) lose every click and ``--new-user-share`` of
the users lose theirs (they arrive as new users) before the pipeline's training code learns
the service's model from the rest; ``--new-ads`` of the held-out ads are left out of the
snapshot and arrive during the run. Static references are scored on the same rounds:
``popularity`` (training click counts) and ``als`` (implicit ALS trained on the same training
clicks; popularity for new users), neither learning online. Every policy of a seed meets the
same users in the same order (common random numbers); the report gives each policy's share of
the oracle's gain over random (overall, known and new users) and paired ratios of its regret
to the static references with t intervals over seeds. Encodings, truth and trained snapshots
are cached under ``--work``.

    .venv/bin/python benchmarks/bandit_sim.py --source data/sources/ml-latest-small
    .venv/bin/python benchmarks/bandit_sim.py --source data/sources/ml-latest-small \\
        --rounds 20000 --seeds 0 --policies greedy thompson --jobs 2
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.special import expit  # noqa: E402

from adrec_assets.online.config import ServingConfig  # noqa: E402
from adrec_assets.online.events import impressions_with_outcomes, read_event_log  # noqa: E402
from adrec_assets.online.fresh_ads import DEFAULT_FRESH_PRIOR_SD  # noqa: E402
from adrec_assets.online.policy import DEFAULT_FRESH_SHARE  # noqa: E402
from adrec_assets.online.policy import POLICIES as SERVICE_POLICIES  # noqa: E402 - its order numbers the seed streams
from adrec_assets.online.position_bias import (  # noqa: E402
    PositionBias,
    estimate_from_randomized,
    estimate_regression_em,
    theta_given_relevance,
)
from adrec_assets.online.service import RecommendationService  # noqa: E402
from adrec_assets.online.store import MemoryStore  # noqa: E402

#: Pseudonym key of the simulated users (they are not people; the value is not a secret).
SIM_ID_KEY = "adrec-bandit-simulation-key-not-a-secret"
DEFAULT_THETA = (1.0, 0.6, 0.45, 0.35, 0.3)
ORACLE = "oracle"  # the truth's best slate, served by the simulator itself (checks the regret bookkeeping)
#: Static reference policies, served by the simulator from scores fitted once on the training clicks.
STATIC_POLICIES = ("popularity", "als")
#: The service's greedy with the click-only EMA user update (ADREC_SERVE_USER_UPDATE=ema): the
#: user update the per-user posterior replaced, kept as a reference.
GREEDY_EMA = "greedy_ema"
ALL_POLICIES = (*SERVICE_POLICIES, ORACLE, *STATIC_POLICIES, GREEDY_EMA)
#: New users' regret is reported over their first this many impressions (slates of k).
NEW_USER_IMPRESSIONS = 20
#: The static ALS reference's settings: the most frequent tuned choice of the warm protocol on
#: ml-latest-small (benchmarks/README.md, warm table).
STATIC_ALS = {"factors": 32, "regularization": 10.0, "alpha": 10.0}
SIM_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the simulated clock's round 0
#: Regression-EM's relevance features: the logged score, as the position_bias asset uses.
EM_FEATURES = ("score",)
EM_IMPRESSIONS = 100_000  # the target: theta within 10% at 10^5 impressions


# ---------------------------------------------------------------------------------- world
@dataclass(frozen=True)
class NewAd:
    """An ad absent from the snapshot that the simulator adds at round ``arrival``."""

    index: int  # column of the world's probability matrix
    ad_id: str
    text: str
    content: np.ndarray  # (content_dim,) float32: the snapshot encoder's vector of the ad
    arrival: int


@dataclass
class World:
    """A truth and the snapshot the service starts from (published under ``artifacts_root``)."""

    name: str
    source: str  # snapshot source name (the service's partition)
    artifacts_root: Path
    user_ids: list[str]  # raw ids a client sends, row i of ``probability``
    ad_ids: np.ndarray  # (n_ads,) every ad of the world: snapshot catalogue and new ads
    probability: np.ndarray  # (n_users, n_ads) float32, P(click | examined)
    theta: np.ndarray  # (k,) examination probability per position, theta[0] == 1
    unseen: np.ndarray  # (n_ads,) bool: no click of the ad reached the training data
    new_ads: list[NewAd]  # sorted by arrival
    user_dim: int
    content_dim: int
    id_key: str = SIM_ID_KEY
    facts: dict[str, Any] = field(default_factory=dict)  # printed with the results
    known: np.ndarray | None = None  # (n_users,) bool: the user's clicks reached training (default: all)
    static_scores: dict[str, np.ndarray] = field(default_factory=dict)  # policy -> (n_users, n_ads) float32

    def __post_init__(self) -> None:
        n_users, n_ads = self.probability.shape
        if len(self.user_ids) != n_users or len(self.ad_ids) != n_ads or len(self.unseen) != n_ads:
            raise ValueError(
                f"world {self.name!r}: probability {self.probability.shape} does not match "
                f"{len(self.user_ids)} users / {len(self.ad_ids)} ads / {len(self.unseen)} unseen flags"
            )
        if not (np.all(np.isfinite(self.probability)) and self.probability.min() >= 0 and self.probability.max() <= 1):
            raise ValueError(f"world {self.name!r}: click probabilities must lie in [0, 1]")
        theta = np.asarray(self.theta, dtype=np.float64)
        if theta.ndim != 1 or len(theta) == 0 or theta[0] != 1 or np.any(theta <= 0) or np.any(theta > 1):
            raise ValueError(
                f"theta: expected examination probabilities in (0, 1] with theta[0] == 1, got {self.theta}"
            )
        self.theta = theta
        if any(later.arrival < earlier.arrival for earlier, later in zip(self.new_ads, self.new_ads[1:])):
            raise ValueError(f"world {self.name!r}: new_ads must be sorted by arrival")
        if self.known is None:
            self.known = np.ones(n_users, dtype=bool)

    @property
    def is_new(self) -> np.ndarray:
        flags = np.zeros(len(self.ad_ids), dtype=bool)
        flags[[ad.index for ad in self.new_ads]] = True
        return flags


def slate_value(theta: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected clicks of a slate: ``sum_j theta_j P(click | examined)`` in position order.
    The one formula for served and best slates, so a perfect policy has regret exactly 0."""
    return float(np.dot(theta[: len(probabilities)], probabilities))


class BestSlates:
    """Per user, the ``k`` live ads with the highest true click probability (maintained as ads
    arrive, without re-sorting the catalogue) and their expected clicks in position order."""

    def __init__(self, probability: np.ndarray, live: np.ndarray, theta: np.ndarray, k: int) -> None:
        self.probability, self.theta, self.k = probability, theta, k
        columns = np.flatnonzero(live)
        if len(columns) < k:
            raise ValueError(f"the world starts with {len(columns)} live ads, fewer than the slate length {k}")
        part = np.argpartition(-probability[:, columns], k - 1, axis=1)[:, :k]
        self.ads = columns[part]
        self._sort()

    def _sort(self, rows: np.ndarray | None = None) -> None:
        rows = np.arange(len(self.ads)) if rows is None else rows
        values = np.take_along_axis(self.probability[rows], self.ads[rows], axis=1)
        order = np.lexsort((self.ads[rows], -values), axis=1)
        self.ads[rows] = np.take_along_axis(self.ads[rows], order, axis=1)
        self.top = np.take_along_axis(self.probability, self.ads, axis=1)
        self.value = np.array([slate_value(self.theta, row) for row in self.top])

    def add(self, ad: int) -> None:
        """A new ad went live: users who like it more than their k-th best take it in."""
        column = self.probability[:, ad]
        better = np.flatnonzero(column > self.top[:, -1])
        if len(better):
            self.ads[better, -1] = ad
            self._sort(better)


def oracle_slate(probability_row: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """The truth's best ``k`` live ads by a full sort (independent of :class:`BestSlates`); the
    static references rank their own scores the same way."""
    candidates = np.flatnonzero(live)
    order = np.lexsort((candidates, -probability_row[candidates]))
    return candidates[order[:k]]


# ------------------------------------------------------------------------------ simulation
@dataclass(frozen=True)
class SimSettings:
    """One run: a policy, a seed and how the service is driven."""

    policy: str
    seed: int
    rounds: int
    k: int = 5
    randomized_share: float = 0.05  # service config: share of slates served in random order
    settle_every: int = 500  # rounds between settle(now=...) + flush of the event log
    round_seconds: float = 1.0  # simulated seconds per round
    settle_seconds: float = 60.0  # service config: impressions wait this long for their click
    fresh_prior_sd: float = DEFAULT_FRESH_PRIOR_SD  # service config: thompson's fresh-ad effects (0: none)
    fresh_scope: str = "live"  # service config: which ads carry one ("live" or "untrained")
    fresh_share: float = DEFAULT_FRESH_SHARE  # service config: thompson's cap on unearned fresh ads' slots (1: none)
    shared_exploration: float = 1.0  # service config: thompson's draw spread of the shared model (0: its mean)
    shared_model: str = "prior"  # service config: thompson ranks with the shared model's "prior" or "online" posterior
    user_update: str = "posterior"  # service config ("ema" for GREEDY_EMA whatever this says)
    user_prior_spread: float = ServingConfig.user_prior_spread  # service config: the per-user posterior's prior spread
    user_exploration: float = (
        ServingConfig.user_exploration
    )  # service config: thompson's draw spread of the user's vector
    fresh_rotation: float = (
        ServingConfig.fresh_rotation
    )  # service config: requests within which each fresh ad is shown once
    known_user_spread: float = (
        ServingConfig.known_user_spread
    )  # service config: a known user's prior spread (x the population's)
    activity: str = "uniform"  # who asks: "uniform", or "pareto" (heavy-tailed activity per user)
    burst_lifetime: int = 0  # > 0: each new ad retires about this many rounds after it arrives
    drift_at: int = -1  # >= 0: at this round drift_share of the users take another user's tastes
    drift_share: float = 0.5
    click_delay: int = 0  # rounds between a slate and its clicks' events (impressions are posted at once)

    def __post_init__(self) -> None:
        if self.policy not in ALL_POLICIES:
            raise ValueError(f"policy: unknown {self.policy!r}; choose from {list(ALL_POLICIES)}")
        if self.rounds < 1 or self.k < 1 or self.settle_every < 1:
            raise ValueError(
                f"rounds, k and settle_every must be >= 1, got {self.rounds}, {self.k}, {self.settle_every}"
            )
        if not 0 <= self.randomized_share <= 1:
            raise ValueError(f"randomized_share must lie in [0, 1], got {self.randomized_share}")


@dataclass
class RunResult:
    """What one run measured. ``first_shown[i]``: rounds from new ad i's arrival to its first
    impression (-1: never shown); ``impressions``: the event log, one row per shown ad."""

    policy: str
    seed: int
    rounds: int
    regret: np.ndarray  # (rounds,) float64 expected regret per round
    expected_clicks: float
    best_expected_clicks: float
    clicks: int
    n_impressions: int
    new_ad_impressions: int
    unseen_impressions: int
    best_new_ad_slots: int  # slots of the best slates held by new ads (the truth's own share)
    arrival: np.ndarray  # (n_new,) round each new ad went live
    first_shown: np.ndarray  # (n_new,) int64
    first_best: np.ndarray  # (n_new,) int64: rounds until the served user's best slate held it (-1: never)
    impressions: pd.DataFrame | None
    seconds: float
    service_seconds: float  # inside recommend / record_events / settle / flush / add_ad
    known: np.ndarray | None = None  # (rounds,) bool: the round's user was in the training clicks
    #: (rounds,) bool: a new user's round within their first NEW_USER_IMPRESSIONS impressions
    new_early: np.ndarray | None = None
    #: (rounds,) bool: such a round after the user's first click (an upper bound on what learning
    #: from clicks can save: the regret of the other early rounds, were these served perfectly)
    new_early_after_click: np.ndarray | None = None
    new_users_seen: int = 0  # new users who asked at least once
    #: (rounds,) int: slots given to ads added during the run (the burst), and all ads served
    new_ad_slots: np.ndarray | None = None

    @property
    def cumulative_regret(self) -> float:
        return float(self.regret.sum())


class SimClock:
    """The service's and the store's clock: the simulator sets the time, nothing else moves it."""

    def __init__(self, now: float = SIM_EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def start_service(
    world: World, settings: SimSettings, folder: Path, clock: SimClock, service_seed: int
) -> RecommendationService:
    """A service over the world's published snapshot, as ``serve`` builds one, with an
    in-memory store and the simulated clock; no background threads (the simulator settles and
    flushes at its own times)."""
    config = ServingConfig(
        source=world.source,
        artifacts_root=world.artifacts_root,
        sources_root=folder / "sources",
        randomized_share=settings.randomized_share,
        fresh_prior_sd=settings.fresh_prior_sd,
        fresh_scope=settings.fresh_scope,
        fresh_share=settings.fresh_share,
        shared_exploration=settings.shared_exploration,
        shared_model=settings.shared_model,
        user_update="ema" if settings.policy == GREEDY_EMA else settings.user_update,
        user_prior_spread=settings.user_prior_spread,
        user_exploration=settings.user_exploration,
        fresh_rotation=settings.fresh_rotation,
        known_user_spread=settings.known_user_spread,
        settle_seconds=settings.settle_seconds,
        flush_batch=1_000_000,
        load_encoder=False,  # new ads arrive with their content vectors (add_ad(content=...))
        seed=service_seed,
    )
    config.validate()
    store = MemoryStore(world.source, user_dim=world.user_dim, content_dim=world.content_dim, clock=clock)
    service = RecommendationService(config, store, clock=clock, id_key=world.id_key)
    service.start(background=False)
    return service


def _mark_first(first: np.ndarray, numbers: np.ndarray, t: int, arrival: np.ndarray) -> int:
    """Note round ``t`` (counted from arrival) for the new ads among ``numbers`` (their new-ad
    numbers; -1 = not a new ad) not noted before; returns how many new ads are there."""
    numbers = numbers[numbers >= 0]
    fresh = numbers[first[numbers] < 0]
    first[fresh] = t - arrival[fresh]
    return len(numbers)


def simulate(world: World, settings: SimSettings, folder: Path) -> RunResult:
    """Run ``settings.rounds`` rounds of one policy; see the module docstring.

    Randomness (common random numbers): the sequence of users and the examination and click
    uniforms at each (round, position) come from ``settings.seed`` alone, so every policy of a
    seed meets the same users and a slot is examined / clicked under the same draw; only the
    service's own draws (its ``seed`` config: request ids, Thompson draws, which slates are
    randomized) come from ``(seed, policy)``. Paired ratios over seeds then measure the
    policies' difference, not the noise of the clicks.
    """
    started = time.perf_counter()
    service_seconds = 0.0
    k, theta = settings.k, world.theta
    if len(theta) < k:
        raise ValueError(f"theta covers {len(theta)} positions; the slate has {k}")
    theta = theta[:k]
    n_users = len(world.user_ids)
    if settings.activity == "pareto":  # heavy-tailed: a few users ask most of the time
        activity = np.random.default_rng([settings.seed, 14]).pareto(1.2, n_users) + 1.0
        users = np.random.default_rng([settings.seed, 1]).choice(n_users, settings.rounds, p=activity / activity.sum())
    else:
        users = np.random.default_rng([settings.seed, 1]).integers(n_users, size=settings.rounds)
    policy_number = ALL_POLICIES.index(settings.policy)
    # common random numbers: every policy of a seed meets the same examination and click draws
    # at each (round, position)
    uniforms = np.random.default_rng([settings.seed, 2]).random((settings.rounds, 2, k))
    is_new = world.is_new
    live = ~is_new
    probability_matrix = world.probability
    best = BestSlates(probability_matrix, live, theta, k)
    retire_at = {}  # round -> new ads retiring then (batched at multiples of 500 rounds)
    if settings.burst_lifetime > 0:
        lifetimes = np.random.default_rng([settings.seed, 15]).uniform(0.5, 1.5, len(world.new_ads))
        for ad, life in zip(world.new_ads, lifetimes):
            due = int(np.ceil((ad.arrival + life * settings.burst_lifetime) / 500) * 500)
            retire_at.setdefault(due, []).append(ad)
    early = np.zeros(settings.rounds, dtype=bool)
    early_after_click = np.zeros(settings.rounds, dtype=bool)
    has_clicked = np.zeros(n_users, dtype=bool)
    slates_seen = np.zeros(n_users, dtype=np.int64)
    new_ad_slots = np.zeros(settings.rounds, dtype=np.int64)
    delayed: dict[int, list[dict[str, Any]]] = {}
    column_of = {ad: column for column, ad in enumerate(world.ad_ids.tolist())}
    new_number = np.full(len(world.ad_ids), -1, dtype=np.int64)
    new_number[[ad.index for ad in world.new_ads]] = np.arange(len(world.new_ads))
    arrival = np.array([ad.arrival for ad in world.new_ads], dtype=np.int64)
    first_shown = np.full(len(world.new_ads), -1, dtype=np.int64)
    first_best = np.full(len(world.new_ads), -1, dtype=np.int64)  # first round a best slate holds it
    regret = np.zeros(settings.rounds)
    expected = best_expected = 0.0
    clicks = impressions = new_impressions = unseen_impressions = best_new_slots = 0
    clock = SimClock()
    service = None
    if settings.policy in SERVICE_POLICIES or settings.policy == GREEDY_EMA:
        service = start_service(world, settings, folder, clock, service_seed=1000 * settings.seed + policy_number)
    served_policy = "greedy" if settings.policy == GREEDY_EMA else settings.policy
    pending = list(world.new_ads)
    for t in range(settings.rounds):
        clock.now = SIM_EPOCH + t * settings.round_seconds
        if t == settings.drift_at:  # tastes drift: a share of users take another user's truth row
            rng = np.random.default_rng([settings.seed, 13])
            movers = rng.choice(n_users, int(round(settings.drift_share * n_users)), replace=False)
            probability_matrix = probability_matrix.copy()
            probability_matrix[movers] = probability_matrix[rng.permutation(movers)]
            best = BestSlates(probability_matrix, live, theta, k)
        if t in retire_at:
            for ad in retire_at.pop(t):
                if service is not None:
                    service.retire_ad(ad.ad_id)
                live[ad.index] = False
            best = BestSlates(probability_matrix, live, theta, k)  # once per batch: 0.15 s a rebuild
        if service is not None and t in delayed:
            service.record_events(delayed.pop(t))
        while pending and pending[0].arrival <= t:
            ad = pending.pop(0)
            if service is not None:
                began = time.perf_counter()
                service.add_ad(ad.ad_id, ad.text, None, content=ad.content)
                service_seconds += time.perf_counter() - began
            live[ad.index] = True
            best.add(ad.index)
        user = int(users[t])
        if not world.known[user]:
            early[t] = slates_seen[user] * k < NEW_USER_IMPRESSIONS
            early_after_click[t] = early[t] and has_clicked[user]
        slates_seen[user] += 1
        if settings.policy in STATIC_POLICIES:
            slate = oracle_slate(world.static_scores[settings.policy][user], live, k)
        elif service is None:
            slate = oracle_slate(probability_matrix[user], live, k)
        else:
            began = time.perf_counter()
            served = service.recommend(world.user_ids[user], k, policy=served_policy)
            service_seconds += time.perf_counter() - began
            slate = np.array([column_of[item["ad_id"]] for item in served["items"]], dtype=np.int64)
        shown = len(slate)
        probability = probability_matrix[user, slate].astype(np.float64)
        value = slate_value(theta, probability)
        regret[t] = best.value[user] - value
        expected += value
        best_expected += best.value[user]
        clicked = (uniforms[t, 0, :shown] < theta[:shown]) & (uniforms[t, 1, :shown] < probability)
        clicks += int(clicked.sum())
        has_clicked[user] |= bool(clicked.any())
        impressions += shown
        unseen_impressions += int(world.unseen[slate].sum())
        best_new_slots += _mark_first(first_best, new_number[best.ads[user]], t, arrival)
        new_ad_slots[t] = _mark_first(first_shown, new_number[slate], t, arrival)
        new_impressions += int(new_ad_slots[t])
        if service is not None:
            stamp = clock.now + 0.5 * settings.round_seconds  # the user looks and clicks after the slate is served
            base = {"request_id": served["request_id"], "user_id": world.user_ids[user], "timestamp": stamp}
            events = [{**base, "ad_id": item["ad_id"], "position": item["position"], "type": "impression"}
                      for item in served["items"]]  # fmt: skip
            clicks_of = [{**base, "ad_id": served["items"][j]["ad_id"], "position": j, "type": "click"}
                         for j in np.flatnonzero(clicked).tolist()]  # fmt: skip
            if settings.click_delay > 0 and clicks_of:
                delayed.setdefault(t + settings.click_delay, []).extend(
                    {**c, "timestamp": c["timestamp"] + settings.click_delay * settings.round_seconds}
                    for c in clicks_of
                )
            else:
                events += clicks_of
            began = time.perf_counter()
            service.record_events(events)
            if (t + 1) % settings.settle_every == 0:
                service.settle(now=clock.now)
                while service.flusher.flush(service.config.flush_batch, known_ads=frozenset()):
                    pass
            service_seconds += time.perf_counter() - began
    logged = None
    if service is not None:
        began = time.perf_counter()
        service.settle(now=clock.now + settings.settle_seconds + settings.round_seconds)
        while service.flusher.flush(service.config.flush_batch, known_ads=frozenset()):
            pass
        service_seconds += time.perf_counter() - began
        log = impressions_with_outcomes(read_event_log(folder / "sources" / world.source))
        # What the estimators read, in compact dtypes: twelve 500k-row logs must fit in memory.
        logged = pd.DataFrame({
            "position": log["position"].to_numpy(np.int64), "clicked": log["clicked"].to_numpy(np.int8),
            "randomized": log["randomized"].to_numpy(bool), "score": log["score"].to_numpy(np.float64),
            "ad_id": pd.Categorical(log["ad_id"]), "policy": pd.Categorical(log["policy"]),
            "user_pseudonym": pd.Categorical(log["user_pseudonym"]),
        })  # fmt: skip
        service.online.close()
    return RunResult(
        policy=settings.policy, seed=settings.seed, rounds=settings.rounds, regret=regret, expected_clicks=expected,
        best_expected_clicks=best_expected, clicks=clicks, n_impressions=impressions,
        new_ad_impressions=new_impressions, unseen_impressions=unseen_impressions, best_new_ad_slots=best_new_slots,
        arrival=arrival, first_shown=first_shown, first_best=first_best, impressions=logged,
        seconds=time.perf_counter() - started, service_seconds=service_seconds, known=world.known[users],
        new_early=early, new_early_after_click=early_after_click, new_users_seen=int(((slates_seen > 0) & ~world.known).sum()), new_ad_slots=new_ad_slots,
    )  # fmt: skip


# ------------------------------------------------------------------------- position bias
@dataclass(frozen=True)
class ThetaEstimate:
    """One estimator's theta on one log, with the rows it used."""

    method: str
    log: str  # which log: "pooled randomized slice", "thompson", ...
    n_impressions: int
    estimate: PositionBias
    at_target: bool = True  # the size (10^5 impressions, or all there is below that)

    def relative_errors(self, theta: np.ndarray) -> np.ndarray:
        width = min(len(theta), len(self.estimate.theta))
        return self.estimate.theta[:width] / theta[:width] - 1.0


def true_relevance(world: World) -> Callable[[pd.DataFrame], np.ndarray]:
    """Each logged impression's P(click | examined) under the world's truth."""
    from adrec_assets.privacy import pseudonymize

    key = world.id_key.encode()
    user_row = {pseudonymize(u, key): row for row, u in enumerate(world.user_ids)}
    ad_column = {ad: column for column, ad in enumerate(world.ad_ids.tolist())}

    def lookup(frame: pd.DataFrame) -> np.ndarray:
        rows = np.fromiter((user_row[u] for u in frame["user_pseudonym"].astype(str)), np.int64, count=len(frame))
        columns = np.fromiter((ad_column[a] for a in frame["ad_id"].astype(str)), np.int64, count=len(frame))
        return world.probability[rows, columns].astype(np.float64)

    return lookup


def estimate_theta(
    results: Sequence[RunResult], relevance: Callable[[pd.DataFrame], np.ndarray] | None = None,
    limit: int = EM_IMPRESSIONS,
) -> list[ThetaEstimate]:  # fmt: skip
    """Both estimators on one seed's logs. The ratio on the randomized slices of every run's
    log pooled (each run randomizes its own slates; their click uniforms are shared, common
    random numbers, which biases neither estimator; at the defaults they hold about ``limit``
    impressions). Regression-EM on each greedy or exploring policy's log as the
    ``position_bias`` asset reads one (every row, randomized or not): its first ``limit``
    impressions, and the whole log, which separates noise (shrinks) from bias (stays). With
    the world's ``relevance``, the floor on each of those logs too: theta's MLE given every
    impression's true relevance, which no estimator from clicks beats (``known_relevance``)."""
    logs = [r for r in results if r.impressions is not None and len(r.impressions)]
    out: list[ThetaEstimate] = []
    if not logs:
        return out
    pooled = pd.concat([r.impressions for r in logs], ignore_index=True)
    randomized = pooled[pooled["randomized"]]
    try:
        estimate = estimate_from_randomized(randomized.assign(clicked=randomized["clicked"].astype(int)))
        out.append(ThetaEstimate("ratio", f"randomized slices, {len(logs)} runs", len(randomized), estimate))
    except ValueError as exc:
        print(f"  ratio estimator: {exc}")
    for result in logs:
        if result.policy == "random":
            continue  # a uniformly random slate is its own randomized slice: nothing for EM to untangle
        for frame in {len(r): r for r in (result.impressions.iloc[:limit], result.impressions)}.values():
            try:
                estimate = estimate_regression_em(frame.assign(clicked=frame["clicked"].astype(int)), list(EM_FEATURES))
            except ValueError as exc:
                print(f"  regression-EM on {result.policy}: {exc}")
                continue
            scope = "whole log" if len(frame) == len(result.impressions) else f"first {len(frame):,}"
            out.append(
                ThetaEstimate(
                    "regression_em", f"{result.policy}, {scope}", len(frame), estimate, at_target=len(frame) <= limit
                )
            )
            if relevance is not None:
                floor = theta_given_relevance(frame.assign(clicked=frame["clicked"].astype(int)), relevance(frame))
                out.append(
                    ThetaEstimate(
                        "known_relevance", f"{result.policy}, {scope}", len(frame), floor, at_target=len(frame) <= limit
                    )
                )
    return out


@dataclass(frozen=True)
class Ceiling:
    """Regret per round of ranking without exploration, each user with the snapshot's vector
    (no online updates), over the snapshot's ads: by today's score ``u . p + b``, by the
    contextual model's best parameters (``[u * p, b, 1]``, fitted to the truth itself), and by
    those plus each ad's own best intercept (a per-ad effect, also fitted to the truth): what a
    hybrid model with per-ad terms could reach at best; and by each user's own best vector
    (the snapshot's ads fixed, also fitted to the truth): what learning each user's vector
    perfectly could reach."""

    best: float  # expected clicks per round of the best slates
    greedy: float  # regret per round
    fitted: float  # regret per round
    per_ad: float = float("nan")  # regret per round
    per_user: float = float("nan")  # regret per round

    @property
    def ratio(self) -> float:
        return self.fitted / self.greedy


def model_class_ceiling(world: World, pairs_per_user: int = 200, k: int = 5) -> Ceiling:
    """How far the Thompson posterior could take the service even if it learnt its parameters
    perfectly: it only re-weights user-space dimensions and the popularity term. The fit is
    the posterior's own logistic update on soft labels (each pair twice: clicked with weight
    ``P(click | examined)``, skipped with the rest), on each user's ``pairs_per_user`` best
    ads by today's score plus as many random ones."""
    from adrec_assets.online.posterior import LaplaceLogisticPosterior
    from adrec_assets.privacy import pseudonymize
    from adrec_assets.snapshots import SnapshotStore

    store = SnapshotStore(world.artifacts_root, world.source)
    users, projected, prior = (store.load(a) for a in ("served_users", "served_ads", "global_mean"))
    key = world.id_key.encode()
    rows = [users.row_of(pseudonymize(u, key)) for u in world.user_ids]
    vectors = np.array([prior.vector if r is None else users.vectors[r] for r in rows], dtype=np.float64)
    column = {ad: c for c, ad in enumerate(world.ad_ids.tolist())}
    truth = world.probability[:, [column[ad] for ad in projected.ids.tolist()]].astype(np.float64)
    ads = np.hstack([projected.vectors, projected.score_bias[:, None]]).astype(np.float64)
    theta = world.theta[:k]
    best_values = -np.sort(np.partition(-truth, k - 1, axis=1)[:, :k], axis=1)  # each user's k best, descending
    best = float((best_values * theta).sum(axis=1).mean())

    def regret(scores: np.ndarray) -> float:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
        return best - float((np.take_along_axis(truth, top, axis=1) * theta).sum(axis=1).mean())

    today = vectors @ ads[:, :-1].T + ads[:, -1]
    rng = np.random.default_rng(0)
    candidates = np.hstack([np.argpartition(-today, pairs_per_user, axis=1)[:, :pairs_per_user],
                            rng.integers(len(ads), size=(len(vectors), pairs_per_user))])  # fmt: skip
    user_rows = np.repeat(np.arange(len(vectors)), candidates.shape[1])
    target = truth[user_rows, candidates.ravel()]
    posterior = LaplaceLogisticPosterior.prior(vectors.shape[1])
    posterior.update(
        np.vstack([vectors[user_rows]] * 2), np.vstack([ads[candidates.ravel()]] * 2),
        np.concatenate([np.ones(len(target)), np.zeros(len(target))]), np.concatenate([target, 1 - target]),
    )  # fmt: skip
    mean = posterior.mean()
    fitted = (vectors * mean[:-2]) @ ads[:, :-1].T + mean[-2] * ads[:, -1] + mean[-1]
    ads_of_pairs = candidates.ravel()
    intercept = np.zeros(len(ads))
    for _ in range(30):  # per-ad Newton steps on the same soft labels, ridge 1, the shared part fixed
        p = expit(fitted[user_rows, ads_of_pairs] + intercept[ads_of_pairs])
        gradient = np.bincount(ads_of_pairs, weights=p - target, minlength=len(ads)) + intercept
        intercept -= gradient / (np.bincount(ads_of_pairs, weights=p * (1 - p), minlength=len(ads)) + 1.0)
    return Ceiling(best, regret(today), regret(fitted), regret(fitted + intercept),
                   regret(_per_user_refit(vectors, ads, truth, today, rng)))  # fmt: skip


def _per_user_refit(
    vectors: np.ndarray, ads: np.ndarray, truth: np.ndarray, today: np.ndarray, rng: np.random.Generator,
    pairs: int = 1000, ridge: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """Each user's logits by their own best ``[u, popularity weight, intercept]``: a logistic
    fit (Newton, ridge toward the prior's start ``scale * (u . p + b) + intercept``) to the
    truth's ``P(click | examined)`` of the user's ``pairs`` best ads by today's score plus as
    many random ones; the ads' ``[p, b]`` stay the snapshot's."""
    from adrec_assets.online.posterior import DEFAULT_INTERCEPT, DEFAULT_SCALE

    features = np.hstack([DEFAULT_SCALE * ads, np.ones((len(ads), 1))])
    pairs = min(pairs, len(ads) - 1)
    logits = np.empty_like(today)
    for user, vector in enumerate(vectors):
        rows = np.concatenate([np.argpartition(-today[user], pairs)[:pairs], rng.integers(len(ads), size=pairs)])
        x, target = features[rows], truth[user, rows]
        start = np.concatenate([vector, [1.0, DEFAULT_INTERCEPT]])
        weights = start.copy()
        for _ in range(15):
            p = expit(x @ weights)
            gradient = x.T @ (p - target) + ridge * (weights - start)
            step = np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(weights)), gradient)
            weights -= step
            if np.max(np.abs(step)) < 1e-8:
                break
        logits[user] = features @ weights
    return logits


# ------------------------------------------------------------------------- MovieLens world
def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_source(source_dir: Path) -> tuple[Any, Any]:
    """(catalogue, click graph with raw user ids) read with the pipeline's file reader."""
    from adrec_assets.ml.types import ClickGraph
    from adrec_assets.sources.files import FileSource

    if not source_dir.is_dir():
        raise SystemExit(
            f"--source {source_dir} is not a folder; convert MovieLens first: python -m adrec_assets.sources.movielens "
            f"../shared/datasets/ml-latest-small {source_dir}"
        )
    source = FileSource(source_dir, source_dir.name)
    catalog = source.read_ads()
    clicks, _ = source.read_clicks(catalog.ad_ids)
    graph = ClickGraph.from_codes(
        clicks.user_vocab, clicks.user_codes, clicks.ad_vocab, clicks.ad_codes, clicks.weights
    )
    return catalog, graph


def _content(catalog: Any, work: Path) -> Any:
    """The catalogue through the offline encoder, cached as a ``ContentEmbeddings`` file (and in
    the pipeline's encoding cache, so an edited catalogue re-encodes only what changed)."""
    from adrec_assets.artifacts import load_file, write_file
    from adrec_assets.ml.types import ContentEmbeddings

    path = work / "content.npz"
    if path.exists():
        stored = load_file(path)
        if len(stored.ids) == len(catalog.ad_ids) and (stored.ids == catalog.ad_ids).all():
            return stored
    from adrec_assets.ml.encoders import build_encoder
    from adrec_assets.ml.encoders.cache import EncodingCache, encode_with_cache

    began = time.perf_counter()
    encoder = build_encoder("offline")
    encoded = encode_with_cache(
        encoder, list(catalog.texts), [p or None for p in catalog.image_paths], EncodingCache(work / "encoder_cache"),
        image_root=catalog.image_root or None,
    )  # fmt: skip
    content = ContentEmbeddings(catalog.ad_ids, encoded.result.vectors, encoder.encoder_id, encoded.result.has_image)
    write_file(path, content)
    print(
        f"encoded {len(catalog.ad_ids)} ads in {time.perf_counter() - began:.0f} s ({encoder.encoder_id})", flush=True
    )
    return content


TRUTH_EASE_L2 = 200.0  # EASE's L2 for the truth: its tuned value on ml-latest-small (warm protocol)


def _truth_scores(graph: Any, work: Path, kind: str = "ease") -> np.ndarray:
    """(n_users, n_ads) truth scores fitted on ALL clicks: EASE (``x_u B``, closed form) or
    implicit-ALS factors (the library defaults of ``adrec_assets.ml.als``); cached."""
    from adrec_assets.ml.als import AlsParams, fit_als
    from adrec_assets.ml.warm_evaluation import ease_scorer

    params = AlsParams(threads=2)
    key = _fingerprint({"kind": kind, "params": asdict(params), "l2": TRUTH_EASE_L2, "users": graph.user_ids.tolist(),
                        "ads": graph.ad_ids.tolist(),
                        "clicks": hashlib.sha256(graph.indices.tobytes() + graph.indptr.tobytes()).hexdigest()})  # fmt: skip
    path = work / f"truth_{kind}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                return stored["scores"]
    if kind == "ease":
        scores = ease_scorer(graph, TRUTH_EASE_L2, graph.n_ads)(np.arange(graph.n_users)).astype(np.float32)
    elif kind == "als":
        factors = fit_als(graph, params)
        scores = (factors.users @ factors.ads.T).astype(np.float32)
    else:
        raise ValueError(f"truth: unknown kind {kind!r}; choose ease or als")
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.asarray(key), scores=scores)
    return scores


def static_scores(graph: Any, train_keep: np.ndarray, known: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The static references' (n_users, n_ads) scores from the training clicks (``train_keep``
    of the graph's clicks): popularity, and implicit ALS (``STATIC_ALS``) whose users without a
    training click fall back to popularity."""
    from adrec_assets.ml.als import AlsParams, fit_als

    train = graph.keep_clicks(train_keep)
    popularity = train.ad_degrees().astype(np.float32)
    factors = fit_als(train, AlsParams(**STATIC_ALS, seed=seed, threads=2))
    als = (factors.users @ factors.ads.T).astype(np.float32)
    als[~known] = popularity
    return {"popularity": np.broadcast_to(popularity, als.shape), "als": als}


def calibrate(scores: np.ndarray, k: int, best_ctr: float, mean_ctr: float, seed: int = 0) -> tuple[float, float]:
    """``(a, b)`` with ``mean_u mean(top-k sigmoid(a s + b)) = best_ctr`` and the mean over all
    pairs ``= mean_ctr`` (a 200k-pair sample; nested bisection, both are monotone)."""
    if not 0 < mean_ctr < best_ctr < 1:
        raise ValueError(f"need 0 < mean_ctr < best_ctr < 1, got {mean_ctr}, {best_ctr}")
    top = -np.partition(-scores, k - 1, axis=1)[:, :k]  # each user's k best scores
    rng = np.random.default_rng(seed)
    sample = scores[rng.integers(len(scores), size=200_000), rng.integers(scores.shape[1], size=200_000)]

    def intercept(a: float) -> float:
        low, high = -30.0, 10.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if expit(a * sample + middle).mean() < mean_ctr else (low, middle)
        return (low + high) / 2

    low, high = 0.0, 200.0
    for _ in range(50):
        a = (low + high) / 2
        low, high = (a, high) if expit(a * top + intercept(a)).mean() < best_ctr else (low, a)
    a = (low + high) / 2
    return a, intercept(a)


def _publish_snapshot(root: Path, source: str, artifacts: dict[str, Any]) -> str:
    """Stage and publish ``artifacts`` exactly as the pipeline's IO manager and ``snapshot``
    asset do (consistency checks included); returns the snapshot id."""
    from adrec_assets.snapshots import SnapshotStore, check_consistency

    store = SnapshotStore(root, source)
    run_id = f"bandit-sim-{_fingerprint({'assets': sorted(artifacts), 'time': time.time()})}"
    for asset, obj in artifacts.items():
        store.stage(run_id, asset, obj)
    required = tuple(artifacts)
    return store.publish(run_id, lambda load, assets: check_consistency(load, assets, required)).id


def _train_snapshot(
    catalog_rows: np.ndarray, catalog: Any, content: Any, graph: Any, held_out: np.ndarray, seed: int,
    root: Path, source: str, known: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The pipeline's training code on the clicks of the ads not held out by the ``known``
    users (default: all); the snapshot catalogue is ``catalog_rows`` of the source catalogue.
    Returns facts to print."""
    from adrec_assets.ml.models import TrainedProjector
    from adrec_assets.ml.params import AdRefitParams, ProjectorParams, UserRefitParams, UserTrainingParams
    from adrec_assets.ml.refresh import FULL_RETRAIN
    from adrec_assets.ml.served_model import fit_served_model
    from adrec_assets.ml.training import normalized_mean, project_with_bias, train_projector, train_user_embeddings
    from adrec_assets.ml.types import (
        AdCatalog,
        ClickGraph,
        ContentEmbeddings,
        GlobalMean,
        ProjectedAds,
        TrainingProvenance,
        UserEmbeddings,
        align_rows,
        vectors_fingerprint,
    )
    from adrec_assets.online.index import AdIndex, IndexedAds, recall_at_k
    from adrec_assets.privacy import key_fingerprint, pseudonymize_many

    began = time.perf_counter()
    key = SIM_ID_KEY.encode()  # the client sends the source's own user id; the service pseudonymizes it
    keep = ~np.isin(graph.indices, held_out)
    if known is not None:
        keep &= known[graph.click_users()]
    users = graph.click_users()[keep]
    training = ClickGraph.from_codes(
        pseudonymize_many(graph.user_ids, key), users, graph.ad_ids, graph.indices[keep].astype(np.int64),
        graph.weights[keep], key_fingerprint(key),
    )  # fmt: skip
    user_params, projector_params = UserTrainingParams(seed=seed), ProjectorParams(seed=seed)
    trained_users = train_user_embeddings(training, user_params)
    space = f"users:{vectors_fingerprint(trained_users.vectors)}"
    inputs = _fingerprint({"seed": seed, "held_out": held_out.tolist(), "n_clicks": training.n_clicks})
    user_embeddings = UserEmbeddings(
        training.user_ids, trained_users.vectors, space, trained_users.isolated,
        TrainingProvenance(asdict(user_params), inputs, FULL_RETRAIN),
    )  # fmt: skip
    content_rows = align_rows(content.ids, training.ad_ids, "clicked ads missing from the content vectors")
    trained = train_projector(training, content.vectors[content_rows], trained_users.vectors, projector_params)
    ads = AdCatalog(catalog.ad_ids[catalog_rows], catalog.texts[catalog_rows], catalog.image_paths[catalog_rows],
                    catalog.image_root)  # fmt: skip
    ad_content = ContentEmbeddings(ads.ad_ids, content.vectors[catalog_rows], content.encoder_id,
                                   content.has_image[catalog_rows])  # fmt: skip
    vectors, bias = project_with_bias(trained.model, ad_content.vectors)
    refit_params, ad_params = UserRefitParams(), AdRefitParams()
    clicked_rows = align_rows(ads.ad_ids, training.ad_ids, "clicked ads missing from the snapshot catalogue")
    model = fit_served_model(training, trained_users.vectors, vectors[clicked_rows], bias[clicked_rows], refit_params,
                             ad_params)  # fmt: skip
    served = model.users
    served_vectors, served_bias = vectors.copy(), bias.copy()
    served_vectors[clicked_rows], served_bias[clicked_rows] = model.ads.vectors, model.ads.score_bias
    served_users = UserEmbeddings(
        training.user_ids, served, space, trained_users.isolated,
        TrainingProvenance(asdict(refit_params), inputs, FULL_RETRAIN),
    )  # fmt: skip
    prior_vector, norm = normalized_mean(served)
    prior = GlobalMean(prior_vector, len(served_users), norm, space)
    projector = TrainedProjector.trained(trained.model, content.encoder_id, space, inputs, FULL_RETRAIN)
    projected = ProjectedAds(ads.ad_ids, vectors, space, content.encoder_id, bias)
    served_ads = ProjectedAds(ads.ad_ids, served_vectors, space, content.encoder_id, served_bias,
                              json.dumps(asdict(ad_params)))  # fmt: skip
    index = AdIndex.build(ads.ad_ids.tolist(), served_vectors, served_bias, seed=seed)
    sample = served_users.trained_vectors()[:500]
    recall = recall_at_k(index, np.hstack([sample, np.ones((len(sample), 1), np.float32)]), 10)
    snapshot = _publish_snapshot(root, source, {
        "raw_ads": ads, "click_graph": training, "ad_embeddings_raw": ad_content, "user_embeddings": user_embeddings,
        "global_mean": prior, "projector": projector, "ad_projected": projected, "served_users": served_users,
        "served_ads": served_ads, "ad_index": IndexedAds(index, space, content.encoder_id, round(float(recall), 6)),
    })  # fmt: skip
    return {"snapshot": snapshot, "train_seconds": round(time.perf_counter() - began, 1),
            "training_users": int(training.n_users), "training_ads": int(training.n_ads),
            "training_clicks": int(training.n_clicks), "isolated_users": int(trained_users.isolated.sum())}  # fmt: skip


def movielens_world(
    source_dir: Path, work: Path, seed: int, rounds: int, *, n_new: int = 200, unseen_share: float = 0.2,
    arrival_window: int = 5000, theta: Sequence[float] = DEFAULT_THETA, best_ctr: float = 0.05,
    mean_ctr: float = 0.005, k: int = 5, truth: str = "ease", new_user_share: float = 0.2, burst_at: int = -1,
) -> World:  # fmt: skip
    """The MovieLens world of one seed (see the module docstring); training is cached under
    ``work`` and reused while its inputs and settings are unchanged."""
    from adrec_assets.ml.evaluation import stratified_cold_ads
    from adrec_assets.ml.params import UserTrainingParams
    from adrec_assets.snapshots import SnapshotStore

    work.mkdir(parents=True, exist_ok=True)
    catalog, graph = _read_source(source_dir)
    content = _content(catalog, work)
    scores = _truth_scores(graph, work, truth)
    a, b = calibrate(scores, k, best_ctr, mean_ctr)
    probability = expit(a * scores + b).astype(np.float32)

    rng = np.random.default_rng([seed, 11])
    held_out = stratified_cold_ads(graph, unseen_share, 10, rng)
    if not 0 <= n_new <= len(held_out):
        raise SystemExit(f"--new-ads {n_new}: must be between 0 and the {len(held_out)} held-out ads")
    new_columns = np.sort(rng.choice(held_out, size=n_new, replace=False))
    new_users = np.sort(np.random.default_rng([seed, 12]).choice(
        graph.n_users, size=int(round(new_user_share * graph.n_users)), replace=False))  # fmt: skip
    known = ~np.isin(np.arange(graph.n_users), new_users)
    latest = max(1, rounds - arrival_window) if rounds > 2 * arrival_window else max(1, rounds // 2)
    arrivals = np.sort(rng.integers(0, latest, size=n_new))
    if burst_at >= 0:  # every new ad at once (the draw above still runs: the same ads either way)
        arrivals = np.full(n_new, burst_at)
    # The world's ads are the graph's (clicked) ads: only they have truth factors.
    catalog_row = {ad: row for row, ad in enumerate(catalog.ad_ids.tolist())}
    snapshot_ads = np.setdiff1d(np.arange(graph.n_ads), new_columns)
    catalog_rows = np.sort(np.array([catalog_row[ad] for ad in graph.ad_ids[snapshot_ads].tolist()]))

    source = f"bandit-{source_dir.name}-s{seed}"
    root = work / "artifacts"
    settings = {"seed": seed, "unseen_share": unseen_share, "held_out": held_out.tolist(), "new": new_columns.tolist(),
                "new_users": new_users.tolist(), "content": content.encoder_id, "clicks": graph.n_clicks,
                "format": 3}  # fmt: skip
    record_path = work / f"{source}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("settings") != _fingerprint(settings) or SnapshotStore(root, source).current_id() != record.get(
        "facts", {}
    ).get("snapshot"):
        print(f"training the pipeline's models for seed {seed} (cached under {work}) ...", flush=True)
        facts = _train_snapshot(catalog_rows, catalog, content, graph, held_out, seed, root, source, known)
        record = {"settings": _fingerprint(settings), "facts": facts}
        record_path.write_text(json.dumps(record, indent=1))
    content_row = {ad: row for row, ad in enumerate(content.ids.tolist())}
    new_ads = [
        NewAd(int(column), str(graph.ad_ids[column]), str(catalog.texts[catalog_row[graph.ad_ids[column]]]),
              content.vectors[content_row[graph.ad_ids[column]]], int(arrival))
        for column, arrival in zip(rng.permutation(new_columns), arrivals)
    ]  # fmt: skip
    unseen = np.zeros(graph.n_ads, dtype=bool)
    unseen[held_out] = True
    train_keep = ~unseen[graph.indices] & known[graph.click_users()]
    return World(
        name=f"{source_dir.name} seed {seed}", source=source, artifacts_root=root,
        user_ids=[str(u) for u in graph.user_ids.tolist()], ad_ids=graph.ad_ids, probability=probability,
        theta=np.asarray(theta, dtype=np.float64), unseen=unseen, new_ads=new_ads, user_dim=UserTrainingParams().dim,
        content_dim=content.vectors.shape[1],
        facts={"truth": truth, "a": round(a, 3), "b": round(b, 3), "users": graph.n_users, "new_users": len(new_users),
               "ads": graph.n_ads, "held_out_ads": len(held_out), "new_ads": n_new,
               "best_ctr": round(float(np.sort(probability, axis=1)[:, -k:].mean()), 4),
               "mean_ctr": round(float(probability.mean()), 4), **record["facts"]},
        known=known, static_scores=static_scores(graph, train_keep, known, seed),
    )  # fmt: skip


# ------------------------------------------------------------------------- synthetic world
def synthetic_world(
    root: Path, *, seed: int = 0, n_users: int = 150, n_ads: int = 300, n_new: int = 8, rounds: int = 3000,
    dim: int = 8, content_dim: int = 16, arrival_window: int = 1000, theta: Sequence[float] = DEFAULT_THETA,
    weak_share: float = 0.5, weak_weight: float = 0.2, scale: float = 6.0, bias_weight: float = -4.0, intercept: float = -3.0,
    new_ad_min_fans: int = 2, new_ad_margin: float = 0.02, new_ads_anywhere: bool = False,
) -> World:  # fmt: skip
    """A tiny world without MovieLens or an encoder (the tests' and a quick smoke run's).

    Ads are random content vectors; a seeded, untrained projector maps them into a ``dim``-d
    user space (``p_a``, ``b_a``) and users are random unit vectors. The service's model scores
    ``u . p_a + b_a``; the truth is ``sigmoid(scale * sum_j w_j u_j p_aj + bias_weight * b_a
    + intercept)`` with ``w_j = weak_weight`` on a ``weak_share`` of the dimensions and 1 on the
    rest, and popularity counted against the ad: the starting model is deliberately wrong, in
    a way the contextual posterior (features ``[u * p, b, 1]``) can learn. ``n_new`` ads, each
    the favourite of at least ``new_ad_min_fans`` users by ``new_ad_margin`` in click
    probability over their second best (ads a good policy must find), are left out of the
    snapshot and arrive before ``rounds - arrival_window``. ``new_ads_anywhere``: the new ads
    are drawn from all ads instead, favourites or not (only a fresh ad's own random effect
    gets most of them shown).
    """
    import torch

    from adrec_assets.ml.models import Projector, TrainedProjector
    from adrec_assets.ml.params import ProjectorParams
    from adrec_assets.ml.refresh import FULL_RETRAIN
    from adrec_assets.ml.training import normalized_mean, project_with_bias
    from adrec_assets.ml.types import (
        AdCatalog,
        ContentEmbeddings,
        GlobalMean,
        ProjectedAds,
        TrainingProvenance,
        UserEmbeddings,
    )
    from adrec_assets.online.index import AdIndex, IndexedAds
    from adrec_assets.privacy import pseudonymize_many

    rng = np.random.default_rng([seed, 21])
    content = rng.standard_normal((n_ads, content_dim)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    params = ProjectorParams(hidden_dim=32, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Projector(content_dim, dim, params)
        with torch.no_grad():
            model.popularity.weight.copy_(torch.from_numpy(rng.standard_normal((1, content_dim)).astype(np.float32)))
    vectors, bias = project_with_bias(model, content)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    weights = np.ones(dim)
    weights[rng.permutation(dim)[: int(round(weak_share * dim))]] = weak_weight
    logits = scale * (users * weights) @ vectors.T + bias_weight * bias[None, :] + intercept
    probability = expit(logits).astype(np.float32)

    ad_ids = np.array([f"ad-{i:05d}" for i in range(n_ads)])
    ranked = np.sort(probability, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] >= new_ad_margin  # users whose favourite clearly stands out
    fans = np.bincount(probability.argmax(axis=1)[clear], minlength=n_ads)
    worth_showing = np.flatnonzero(fans >= new_ad_min_fans)
    if new_ads_anywhere:
        worth_showing = np.arange(n_ads)
    if n_new > len(worth_showing):
        raise ValueError(
            f"n_new {n_new}: only {len(worth_showing)} ads are the clear favourite of {new_ad_min_fans} users"
        )
    new_columns = np.sort(rng.choice(worth_showing, size=n_new, replace=False))
    in_snapshot = np.setdiff1d(np.arange(n_ads), new_columns)
    user_ids = [f"sim-user-{i:05d}" for i in range(n_users)]
    space = f"users:synthetic-{seed}"
    provenance = TrainingProvenance(asdict(params), f"synthetic-{seed}", FULL_RETRAIN)
    encoder_id = "synthetic:random-content:v1"
    texts = np.array([f"synthetic ad {i}" for i in range(n_ads)])
    embeddings = UserEmbeddings(pseudonymize_many(user_ids, SIM_ID_KEY.encode()), users, space,
                                np.zeros(n_users, dtype=bool), provenance)  # fmt: skip
    prior_vector, norm = normalized_mean(users)
    index = AdIndex.build(ad_ids[in_snapshot].tolist(), vectors[in_snapshot], bias[in_snapshot], seed=seed)
    source = f"bandit-synthetic-s{seed}"
    _publish_snapshot(root, source, {
        "raw_ads": AdCatalog(ad_ids[in_snapshot], texts[in_snapshot], np.full(len(in_snapshot), ""), ""),
        "ad_embeddings_raw": ContentEmbeddings(ad_ids[in_snapshot], content[in_snapshot], encoder_id,
                                               np.zeros(len(in_snapshot), dtype=bool)),
        "user_embeddings": embeddings,
        "served_users": embeddings,  # the world's given user vectors: nothing to refit them against
        "global_mean": GlobalMean(prior_vector, n_users, norm, space),
        "projector": TrainedProjector.trained(model, encoder_id, space, provenance.inputs_fingerprint, FULL_RETRAIN),
        "ad_projected": ProjectedAds(ad_ids[in_snapshot], vectors[in_snapshot], space, encoder_id, bias[in_snapshot]),
        "served_ads": ProjectedAds(ad_ids[in_snapshot], vectors[in_snapshot], space, encoder_id, bias[in_snapshot],
                                   "{}"),  # the world's given ad vectors: no clicks to refit them to
        "ad_index": IndexedAds(index, space, encoder_id, 1.0),
    })  # fmt: skip
    latest = max(1, rounds - arrival_window)
    arrivals = np.sort(rng.integers(0, latest, size=n_new))
    new_ads = [NewAd(int(c), str(ad_ids[c]), str(texts[c]), content[c], int(t))
               for c, t in zip(rng.permutation(new_columns), arrivals)]  # fmt: skip
    return World(
        name=f"synthetic seed {seed}", source=source, artifacts_root=root, user_ids=user_ids, ad_ids=ad_ids,
        probability=probability, theta=np.asarray(theta, dtype=np.float64), unseen=np.isin(np.arange(n_ads), new_columns),
        new_ads=new_ads, user_dim=dim, content_dim=content_dim,
        facts={"users": n_users, "ads": n_ads, "new_ads": n_new, "weak_dims": int((weights != 1).sum()),
               "best_ctr": float(np.sort(probability, axis=1)[:, -5:].mean()), "mean_ctr": float(probability.mean())},
    )  # fmt: skip


# -------------------------------------------------------------------------------- report
def _fmt_spread(values: Sequence[float], digits: int = 0) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():,.{digits}f} ± {values.std():,.{digits}f}"


def _t_interval(values: Sequence[float], digits: int = 3) -> str:
    """mean [95% t interval] over seeds (paired: one value per seed)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}" if len(values) else "–"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():.{digits}f} [{values.mean() - half:.{digits}f}, {values.mean() + half:.{digits}f}]"


def reference_table(results: Sequence[RunResult]) -> str:
    """Each policy's share of the oracle's gain over random (1 - its regret / random's, on the
    same rounds), for all, known and new users, and its regret over each static reference's,
    paired by seed with 95% t intervals over seeds."""
    by = {(r.policy, r.seed): r for r in results}
    seeds = sorted({r.seed for r in results if ("random", r.seed) in by})
    if not seeds:
        return "(no random run: the share of the oracle's gain needs one)"
    refs = [p for p in STATIC_POLICIES if all((p, s) in by for s in seeds)]
    lines = ["| policy | share of the oracle's gain: all users | known users | new users | "
             + " | ".join(f"regret / {p}'s" for p in refs) + " |", "|---|---:|---:|---:|" + "---:|" * len(refs)]  # fmt: skip
    for policy in dict.fromkeys(r.policy for r in results):
        if not all((policy, s) in by for s in seeds):
            continue
        cells = []
        for group in ("all", "known", "new"):
            shares = []
            for s in seeds:
                run, random = by[(policy, s)], by[("random", s)]
                mask = np.ones(run.rounds, bool) if group == "all" else (run.known if group == "known" else ~run.known)
                lost = random.regret[mask].sum()
                if mask.any() and lost > 0:
                    shares.append(1.0 - run.regret[mask].sum() / lost)
            cells.append(_t_interval(shares))
        for ref in refs:
            cells.append(_t_interval([by[(policy, s)].cumulative_regret / by[(ref, s)].cumulative_regret
                                      for s in seeds if by[(ref, s)].cumulative_regret > 0]))  # fmt: skip
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines.append(f"\n(mean [95% t interval] over {len(seeds)} seeds {seeds}; every policy of a seed meets the same users "
                 "in the same order)")  # fmt: skip
    return "\n".join(lines)


def summarize(results: Sequence[RunResult], theta: np.ndarray, estimates: dict[int, list[ThetaEstimate]],
              window: int, ceilings: dict[int, Ceiling] | None = None) -> str:  # fmt: skip
    """The printed report (markdown tables): policies over seeds, the model-class ceiling,
    new ads, theta, targets."""
    policies = list(dict.fromkeys(r.policy for r in results))
    seeds = sorted({r.seed for r in results})
    greedy = {r.seed: r.cumulative_regret for r in results if r.policy == "greedy"}
    lines = ["| policy | cumulative regret | / greedy's | regret per round, last 10% | click rate | "
             "expected clicks / best's | impressions on new ads | on unseen-at-start ads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for policy in policies:
        runs = [r for r in results if r.policy == policy]
        ratio = [r.cumulative_regret / greedy[r.seed] for r in runs if greedy.get(r.seed)]
        lines.append(
            f"| {policy} | {_fmt_spread([r.cumulative_regret for r in runs])} | "
            f"{_fmt_spread(ratio, 3) if ratio else '–'} | "
            f"{_fmt_spread([r.regret[-max(1, r.rounds // 10) :].mean() for r in runs], 3)} | "
            f"{_fmt_spread([100 * r.clicks / r.n_impressions for r in runs], 2)}% | "
            f"{_fmt_spread([r.expected_clicks / r.best_expected_clicks for r in runs], 3)} | "
            f"{_fmt_spread([100 * r.new_ad_impressions / r.n_impressions for r in runs], 2)}% | "
            f"{_fmt_spread([100 * r.unseen_impressions / r.n_impressions for r in runs], 1)}% |"
        )
    lines.append("\n" + reference_table(results))
    first = [r for r in results if r.policy == policies[0]]
    lines.append("\n(± is the standard deviation over seeds.) Best slates' share of slots on new ads (the "
                 f"truth's): {_fmt_spread([100 * r.best_new_ad_slots / (r.rounds * 5) for r in first], 2)}%")  # fmt: skip
    if ceilings:
        lines.append("\nModel-class ceiling (no exploration, snapshot user vectors, snapshot ads), regret per round: "
                     + "; ".join(f"seed {s}: today's score {c.greedy:.3f}, best [u*p, b, 1] parameters {c.fitted:.3f} "
                                 f"(ratio {c.ratio:.3f}), with a best intercept per ad {c.per_ad:.3f} "
                                 f"(ratio {c.per_ad / c.greedy:.3f}), each user's best own vector {c.per_user:.3f} "
                                 f"(ratio {c.per_user / c.greedy:.3f})" for s, c in sorted(ceilings.items())))  # fmt: skip
    lines.append(
        f"\n| run | new ads | shown | shown within {window:,} rounds | a best slate held it within "
        f"{window:,} | of those, shown within {window:,} | rounds to first impression: median / p90 / max |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        if not len(r.first_shown) or r.policy == ORACLE:
            continue
        shown = r.first_shown[r.first_shown >= 0]
        in_time = (r.first_shown >= 0) & (r.first_shown <= window)
        wanted = (r.first_best >= 0) & (r.first_best <= window)
        stats = f"{np.median(shown):.0f} / {np.percentile(shown, 90):.0f} / {shown.max()}" if len(shown) else "–"
        lines.append(f"| {r.policy} seed {r.seed} | {len(r.first_shown)} | {len(shown)} | {int(in_time.sum())} | "
                     f"{int(wanted.sum())} | {int((in_time & wanted).sum())} | {stats} |")  # fmt: skip
    lines.append("\n| seed | estimator | log | impressions | clicks | " + " | ".join(
        f"θ{j} (true {t:g})" for j, t in enumerate(theta)) + " | max rel. error |")  # fmt: skip
    lines.append("|---|---|---|---:|---:|" + "---:|" * (len(theta) + 1))
    for seed in seeds:
        for est in estimates.get(seed, []):
            errors = est.relative_errors(theta)
            cells = " | ".join(f"{v:.3f} ({e:+.0%})" for v, e in zip(est.estimate.theta, errors))
            lines.append(f"| {seed} | {est.method} | {est.log} | {est.n_impressions:,} | "
                         f"{int(est.estimate.clicks.sum()):,} | {cells} | {np.abs(errors[1:]).max():.1%} |")  # fmt: skip
    lines.append("\nTargets (issue: 3 seeds, T = 100k):")
    for seed in seeds:
        by = {r.policy: r for r in results if r.seed == seed}
        if "thompson" in by and "greedy" in by:
            ratio = by["thompson"].cumulative_regret / by["greedy"].cumulative_regret
            late = by["thompson"].first_shown
            in_time = int(((late >= 0) & (late <= window)).sum())
            lines.append(f"* seed {seed}: thompson / greedy regret {ratio:.3f} ({'met' if ratio <= 0.8 else 'missed'}: "
                         f"<= 0.8); new ads shown by thompson within {window:,} rounds: {in_time} of {len(late)} "
                         f"({'met' if in_time == len(late) else 'missed'})")  # fmt: skip
        for est in estimates.get(seed, []):
            if est.at_target:
                error = np.abs(est.relative_errors(theta)[1:]).max()
                verdict = ("the floor from click noise alone" if est.method == "known_relevance"
                           else f"{'met' if error <= 0.1 else 'missed'}: <= 10%")  # fmt: skip
                lines.append(f"* seed {seed}: {est.method} on {est.log} ({est.n_impressions:,} impressions): "
                             f"max |error| {error:.1%} ({verdict})")  # fmt: skip
    return "\n".join(lines)


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """One small PNG: cumulative regret per policy and seed; per-round regret (moving average);
    cumulative regret over greedy's cumulative regret of the same seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"greedy": "tab:red", "epsilon_greedy": "tab:orange", "thompson": "tab:blue", "random": "tab:gray",
              ORACLE: "tab:green", "popularity": "tab:brown", "als": "tab:purple"}  # fmt: skip
    greedy = {r.seed: np.cumsum(r.regret) for r in results if r.policy == "greedy"}
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    labelled: set[str] = set()
    for r in results:
        x = np.arange(1, r.rounds + 1)
        label = None if r.policy in labelled else r.policy
        labelled.add(r.policy)
        cumulative = np.cumsum(r.regret)
        left.plot(x, cumulative, color=colors.get(r.policy), lw=1.0, label=label)
        width = max(1, r.rounds // 50)
        smooth = np.convolve(r.regret, np.ones(width) / width, mode="valid")
        middle.plot(np.arange(width, r.rounds + 1), smooth, color=colors.get(r.policy), lw=0.8)
        if r.seed in greedy and r.policy != "random":
            start = min(r.rounds - 1, max(1, r.rounds // 100))  # skip the first noisy 1%
            right.plot(x[start:], cumulative[start:] / greedy[r.seed][start:], color=colors.get(r.policy), lw=1.0)
    left.set(xlabel="round", ylabel="expected clicks lost", title="cumulative regret")
    middle.set(xlabel="round", ylabel="regret per round", title="per-round regret (moving average)")
    middle.set_ylim(bottom=0)
    right.axhline(0.8, color="black", lw=0.8, ls="--")
    right.set(xlabel="round", ylabel="ratio", title="cumulative regret / greedy's (dashed: 0.8)")
    left.legend(fontsize=8)
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# ----------------------------------------------------------------------------------- CLI
def _run_job(job: tuple[World, SimSettings, Path]) -> RunResult:
    world, settings, folder = job
    result = simulate(world, settings, folder)
    print(f"  {settings.policy:>14} seed {settings.seed}: cumulative regret {result.cumulative_regret:,.1f}, "
          f"click rate {result.clicks / result.n_impressions:.2%}, {result.seconds:.0f} s "
          f"({result.service_seconds:.0f} s in the service)", flush=True)  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("data/sources/ml-latest-small"),
                        help="MovieLens file source (python -m adrec_assets.sources.movielens)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("data/bench/bandit"), help="cache and run folders")
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=[*SERVICE_POLICIES, *STATIC_POLICIES], choices=ALL_POLICIES)
    parser.add_argument(
        "--truth", choices=["ease", "als"], default="ease", help="the truth's model class (fitted on all clicks)"
    )
    parser.add_argument("--new-user-share", type=float, default=0.2, help="share of users whose clicks leave training")
    parser.add_argument("--new-ads", type=int, default=200, help="held-out ads that arrive during the run")
    parser.add_argument("--unseen-share", type=float, default=0.2, help="share of ads without training clicks")
    parser.add_argument("--window", type=int, default=5000, help="rounds a new ad has to get its first impression")
    parser.add_argument("--theta", type=float, nargs="+", default=list(DEFAULT_THETA))
    parser.add_argument("--best-ctr", type=float, default=0.05, help="mean P(click|examined) of users' best 5 ads")
    parser.add_argument("--mean-ctr", type=float, default=0.005, help="mean P(click|examined) over all pairs")
    parser.add_argument("--randomized-share", type=float, default=0.05, help="service: share of slates permuted")
    parser.add_argument(
        "--fresh-prior-sd",
        type=float,
        default=DEFAULT_FRESH_PRIOR_SD,
        help="service: prior sd of a fresh ad's logit offset under thompson (0: none)",
    )
    parser.add_argument(
        "--fresh-scope",
        choices=["live", "untrained"],
        default="live",
        help="service: fresh ads are the live-added ones, or also the snapshot's click-less ads",
    )
    parser.add_argument(
        "--fresh-share",
        type=float,
        default=DEFAULT_FRESH_SHARE,
        help="service: most slots per slate (share of k) for fresh ads their clicks have not earned (1: no cap)",
    )
    parser.add_argument(
        "--shared-exploration",
        type=float,
        default=1.0,
        help="service: thompson's draw spread of the shared click model (0: its mean; fresh ads still explore)",
    )
    parser.add_argument("--settle-every", type=int, default=500, help="rounds between settle() calls")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/figures/bandit_regret.png"))
    parser.add_argument("--json", type=Path, help="also write the summary numbers here")
    args = parser.parse_args(argv)
    if len(args.theta) < 5:
        parser.error("--theta needs one examination probability per slate position (5)")
    args.work.mkdir(parents=True, exist_ok=True)
    lock = (args.work / ".lock").open("w")  # held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.error(
            f"--work {args.work}: another bandit_sim run is using it (both would write their event logs "
            "into the same run folders and mix them); wait for it, or pass another --work"
        )

    wall = time.perf_counter()
    worlds = {}
    for seed in args.seeds:
        worlds[seed] = movielens_world(
            args.source, args.work, seed, args.rounds, n_new=args.new_ads, unseen_share=args.unseen_share,
            arrival_window=args.window, theta=args.theta, best_ctr=args.best_ctr, mean_ctr=args.mean_ctr,
            truth=args.truth, new_user_share=args.new_user_share,
        )  # fmt: skip
        print(f"world {worlds[seed].name}: {worlds[seed].facts}", flush=True)
    print(f"worlds ready in {time.perf_counter() - wall:.0f} s; {args.rounds:,} rounds, policies {args.policies}",
          flush=True)  # fmt: skip
    jobs = []
    for seed in args.seeds:
        for policy in args.policies:
            folder = args.work / "runs" / f"{policy}-s{seed}"
            if folder.exists():
                shutil.rmtree(folder)  # a previous run's event files
            settings = SimSettings(policy, seed, args.rounds, randomized_share=args.randomized_share,
                                   fresh_prior_sd=args.fresh_prior_sd, fresh_scope=args.fresh_scope,
                                   fresh_share=args.fresh_share, settle_every=args.settle_every,
                                   shared_exploration=args.shared_exploration)  # fmt: skip
            jobs.append((worlds[seed], settings, folder))
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_job, jobs))
    else:
        results = [_run_job(job) for job in jobs]
    theta = np.asarray(args.theta[:5])
    estimates = {
        seed: estimate_theta([r for r in results if r.seed == seed], true_relevance(worlds[seed]))
        for seed in args.seeds
    }
    ceilings = {seed: model_class_ceiling(worlds[seed]) for seed in args.seeds}
    print()
    print(summarize(results, theta, estimates, args.window, ceilings))
    plot(results, args.figure, f"{args.source.name}: {args.rounds:,} rounds, slates of 5, seeds {args.seeds}")
    print(f"\nfigure {args.figure}; wall time {time.perf_counter() - wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([
            {"policy": r.policy, "seed": r.seed, "cumulative_regret": r.cumulative_regret, "clicks": r.clicks,
             "impressions": r.n_impressions, "new_ad_impressions": r.new_ad_impressions,
             "first_shown": r.first_shown.tolist(), "seconds": r.seconds,
             # the service settings of the run, so runs of other settings are never mistaken for it
             "fresh_prior_sd": args.fresh_prior_sd, "fresh_scope": args.fresh_scope, "fresh_share": args.fresh_share,
             "shared_exploration": args.shared_exploration, "randomized_share": args.randomized_share}
            for r in results], indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
