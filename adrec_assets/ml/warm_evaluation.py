"""Warm evaluation: known users, ads with click history, against tuned collaborative filtering.

Protocol (plain numpy, no Dagster; the ``evaluation`` asset and ``benchmarks/warm_start.py``
run this same code):

1. **Split.** Hold out ``holdout_share`` of each user's clicks, only on ads that keep at least
   one other click and never a user's last click, so every held-out click is on a *warm* ad
   for a *known* user. The click graph keeps no timestamps, so the draw is seeded at random.
2. **Tune** the baselines on a validation split made the same way from the training clicks:
   implicit ALS over a grid of (factors, regularization, alpha) and EASE over its L2 penalty
   (Steck 2019, closed form); the best setting by validation Recall@k is refitted on all
   training clicks.
3. **Score.** Every user with a held-out click ranks *every catalogue ad* but those they
   clicked in training: Recall@k and NDCG@k with ties broken at random. Catalogue ads with no
   training click are ranked by the pipeline through their projection (as served) and put last
   by the baselines, which have nothing to score them with.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from adrec_assets.ml.als import AlsParams, click_matrix, fit_als
from adrec_assets.ml.metrics import ndcg_at_k, recall_at_k
from adrec_assets.ml.pipeline import FittedPipeline
from adrec_assets.ml.scoring import score_matrix
from adrec_assets.ml.types import ClickGraph

LogFn = Callable[[str], None]
#: scores (n_users_chunk, n_catalogue) of the given user rows, for one method
Scorer = Callable[[np.ndarray], np.ndarray]

WARM_PIPELINE = "pipeline"
WARM_METHOD_ORDER = ("random", "popularity", "ease", "als", "pipeline_projection_only", WARM_PIPELINE)
WARM_BASELINES = ("popularity", "ease", "als")
WARM_METHOD_LABELS = {
    "random": "random",
    "popularity": "popularity (training clicks)",
    "ease": "EASE (tuned L2)",
    "als": "implicit ALS (tuned factors, L2, alpha)",
    "pipeline_projection_only": "pipeline without the ad refit (served users x projection + popularity)",
    WARM_PIPELINE: "**pipeline** (served users x served ads)",
}
CHUNK_USERS = 512


class WarmEvaluationError(ValueError):
    """The click graph cannot support the warm protocol (no clicks to hold out)."""


@dataclass(frozen=True)
class WarmParams:
    holdout_share: float = 0.2
    validation_share: float = 0.2
    k: int = 20
    seed: int = 0
    als_factors: tuple[int, ...] = (32, 64, 128)
    als_regularization: tuple[float, ...] = (0.1, 10.0, 100.0)
    als_alpha: tuple[float, ...] = (1.0, 10.0, 40.0)
    ease_l2: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
    max_ease_ads: int = 20_000  # EASE inverts an ads x ads matrix; skipped above this many clicked ads
    max_eval_users: int = 5_000  # users scored (a seeded sample above it)


@dataclass(frozen=True)
class HoldoutSplit:
    """Training clicks (same user and ad index spaces) and the held-out (user, ad) pairs."""

    train: ClickGraph
    test_users: np.ndarray  # (n_test,) user index of each held-out click
    test_ads: np.ndarray  # (n_test,) ad index of each held-out click

    @property
    def eval_users(self) -> np.ndarray:
        return np.unique(self.test_users)


def holdout_split(graph: ClickGraph, share: float, rng: np.random.Generator) -> HoldoutSplit:
    """About ``share`` of each user's clicks held out, on ads that keep another click, never a
    user's last one (see the module docstring)."""
    if not 0.0 < share < 1.0:
        raise WarmEvaluationError(f"holdout share must be in (0, 1), got {share}")
    users = graph.click_users()
    held = rng.random(graph.n_clicks) < share
    # Every ad and every user keeps at least one training click: release one held click of
    # each ad (user) whose clicks were all drawn, chosen at random among them.
    for owner, n in ((graph.indices, graph.n_ads), (users, graph.n_users)):
        drawn = rng.permutation(np.flatnonzero(held))
        _, first = np.unique(owner[drawn], return_index=True)
        candidates = drawn[first]  # one random held click per owner
        kept = np.bincount(owner[~held], minlength=n)
        held[candidates[kept[owner[candidates]] == 0]] = False
    # Releasing a user's click may not take an ad's last training click; holding out never
    # removes the released ones, so both guarantees hold.
    if not held.any():
        raise WarmEvaluationError("no click could be held out: every ad or user has a single click")
    return HoldoutSplit(graph.keep_clicks(~held), users[held], graph.indices[held].astype(np.int64))


def popularity_scorer(train: ClickGraph, n_catalogue: int) -> Scorer:
    degree = np.full(n_catalogue, -np.inf)
    degree[: train.n_ads] = np.where(train.ad_degrees() > 0, train.ad_degrees(), -np.inf)
    return lambda users: np.tile(degree, (len(users), 1))


def _padded(scores: np.ndarray, n_catalogue: int) -> np.ndarray:
    """Graph-ad scores followed by -inf for the catalogue ads outside the click graph."""
    if scores.shape[1] == n_catalogue:
        return scores
    return np.hstack([scores, np.full((len(scores), n_catalogue - scores.shape[1]), -np.inf)])


def als_scorer(train: ClickGraph, params: AlsParams, n_catalogue: int) -> Scorer:
    factors = fit_als(train, params)
    unseen = train.ad_degrees() == 0
    users, ads = factors.users.astype(np.float64), factors.ads.astype(np.float64)

    def score(rows: np.ndarray) -> np.ndarray:
        s = users[rows] @ ads.T
        s[:, unseen] = -np.inf
        return _padded(s, n_catalogue)

    return score


def ease_scorer(train: ClickGraph, l2: float, n_catalogue: int) -> Scorer:
    """EASE (Steck 2019): B = I − P / diag(P), P = (XᵀX + λI)⁻¹ over the ads with a click."""
    clicked = np.flatnonzero(train.ad_degrees() > 0)
    x = click_matrix(train)[:, clicked].astype(np.float64)
    x.data[:] = 1.0
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    with threadpool_limits(None, "blas"):
        p = np.linalg.inv(gram)
    b = p / (-np.diag(p))[None, :]
    b[np.diag_indices_from(b)] = 0.0
    x = sp.csr_matrix(x)

    def score(rows: np.ndarray) -> np.ndarray:
        s = np.full((len(rows), train.n_ads), -np.inf)
        s[:, clicked] = np.asarray(x[rows] @ b)
        return _padded(s, n_catalogue)

    return score


def evaluate_scorer(
    scorer: Scorer, split: HoldoutSplit, users: np.ndarray, n_catalogue: int, k: int, seed: int
) -> tuple[float, float]:
    """(Recall@k, NDCG@k) means over ``users``; their training clicks are excluded."""
    rng = np.random.default_rng([seed, 11])
    recalls, ndcgs = [], []
    train = split.train
    order = np.argsort(split.test_users, kind="stable")
    test_users, test_ads = split.test_users[order], split.test_ads[order]
    for begin in range(0, len(users), CHUNK_USERS):
        rows = users[begin : begin + CHUNK_USERS]
        scores = np.asarray(scorer(rows), dtype=np.float64)
        local = np.full(train.n_users, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        clicked = train.click_users()
        mine = local[clicked] >= 0
        scores[local[clicked[mine]], train.indices[mine]] = -np.inf
        relevant = np.zeros(scores.shape, dtype=bool)
        held = local[test_users] >= 0
        relevant[local[test_users[held]], test_ads[held]] = True
        recalls.append(recall_at_k(scores, relevant, k, rng))
        ndcgs.append(ndcg_at_k(scores, relevant, k, rng))
    return float(np.nanmean(np.concatenate(recalls))), float(np.nanmean(np.concatenate(ndcgs)))


@dataclass
class WarmReport:
    """One seed's warm table: method -> (Recall@k, NDCG@k), and the tuned baselines' settings."""

    k: int
    seed: int
    results: dict[str, tuple[float, float]] = field(default_factory=dict)
    tuned: dict[str, str] = field(default_factory=dict)
    grid: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # validation Recall@k per setting
    n_eval_users: int = 0
    n_held_out: int = 0
    seconds: float = 0.0

    def best_baseline(self) -> tuple[str, float]:
        name = max((m for m in WARM_BASELINES if m in self.results), key=lambda m: self.results[m][0])
        return name, self.results[name][0]

    def headline(self) -> float:
        """pipeline Recall@k / the best tuned baseline's."""
        best = self.best_baseline()[1]
        return self.results[WARM_PIPELINE][0] / best if best > 0 else float("nan")


def _tune(
    name: str,
    settings: list,
    make: Callable[[ClickGraph, object], Scorer],
    tuning: HoldoutSplit,
    n_catalogue: int,
    params: WarmParams,
    report: WarmReport,
) -> object:
    users = tuning.eval_users
    if len(users) > params.max_eval_users:
        users = np.sort(np.random.default_rng([params.seed, 12]).choice(users, params.max_eval_users, replace=False))
    scored = [(s, evaluate_scorer(make(tuning.train, s), tuning, users, n_catalogue, params.k, params.seed)[0])
              for s in settings]  # fmt: skip
    report.grid[name] = [(str(s), round(r, 5)) for s, r in scored]
    best = max(scored, key=lambda pair: pair[1])[0]
    report.tuned[name] = str(best)
    return best


def evaluate_warm(
    graph: ClickGraph,
    n_catalogue: int,
    pipeline: Callable[[ClickGraph], dict[str, Scorer]],
    params: WarmParams = WarmParams(),
    log: LogFn | None = None,
) -> WarmReport:
    """The whole protocol on one seed. ``pipeline(train)`` trains the pipeline on the
    training clicks and returns its scorers by method name (over ``n_catalogue`` ads: the
    graph's ads first, in order, then the catalogue ads without clicks)."""
    started = time.perf_counter()
    say = log or (lambda message: None)
    rng = np.random.default_rng([params.seed, 10])
    split = holdout_split(graph, params.holdout_share, rng)
    tuning = holdout_split(split.train, params.validation_share, rng)
    users = split.eval_users
    if len(users) > params.max_eval_users:
        users = np.sort(rng.choice(users, params.max_eval_users, replace=False))
    report = WarmReport(params.k, params.seed, n_eval_users=len(users), n_held_out=len(split.test_users))
    say(f"warm split: {len(split.test_users)} held-out clicks of {len(users)} users; {split.train.n_clicks} training")

    def record(name: str, scorer: Scorer) -> None:
        report.results[name] = evaluate_scorer(scorer, split, users, n_catalogue, params.k, params.seed)
        say(f"warm {name}: Recall@{params.k} {report.results[name][0]:.4f}")

    record(
        "random", lambda rows: np.random.default_rng([params.seed, 13, int(rows[0])]).random((len(rows), n_catalogue))
    )
    record("popularity", popularity_scorer(split.train, n_catalogue))
    if int((split.train.ad_degrees() > 0).sum()) <= params.max_ease_ads:
        l2 = _tune("ease", list(params.ease_l2), lambda g, s: ease_scorer(g, s, n_catalogue), tuning, n_catalogue,
                   params, report)  # fmt: skip
        record("ease", ease_scorer(split.train, l2, n_catalogue))
    grid = [AlsParams(factors=f, regularization=r, alpha=a, seed=params.seed)
            for f, r, a in itertools.product(params.als_factors, params.als_regularization, params.als_alpha)]  # fmt: skip
    best = _tune("als", grid, lambda g, s: als_scorer(g, s, n_catalogue), tuning, n_catalogue, params, report)
    report.tuned["als"] = f"factors={best.factors} regularization={best.regularization} alpha={best.alpha}"
    record("als", als_scorer(split.train, best, n_catalogue))
    for name, scorer in pipeline(split.train).items():
        record(name, scorer)
    report.seconds = time.perf_counter() - started
    return report


def pipeline_scorers(fitted: FittedPipeline) -> dict[str, Scorer]:
    """The served score, and the pipeline without the ad refit: users fitted to the content
    projections, scored against them (what was served before ``served_ads``)."""
    vectors, bias = fitted.ads()
    before = fitted.served.projection_users
    return {
        "pipeline_projection_only": lambda rows: score_matrix(before[rows], fitted.projected, fitted.projected_bias),
        WARM_PIPELINE: lambda rows: score_matrix(fitted.users[rows], vectors, bias),
    }
