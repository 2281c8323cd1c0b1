"""Item cold-start evaluation: can the pipeline recommend ads nobody clicked in training?

Protocol (plain numpy/torch, no Dagster, so the asset and the benchmark run the same code):

1. **Split.** Hold out ``cold_share`` of the clicked ads as *cold*, sampled within
   popularity strata (ads sorted by click count, cut into ``n_strata`` bins, the same share
   drawn from each) so the cold set is not just the long tail. Every click on a cold ad is
   removed from training.
2. **Train** the user space and the projector on the remaining clicks with the given params,
   and refit the users against the projected ads, as the serving pipeline does.
3. **Score.** For every user with at least one click on a cold ad, rank *all* cold ads;
   Recall@k, NDCG@k and AUC with ties broken at random (ids may correlate with popularity).
4. **Compare** on the same split: random, content-kNN (mean raw content of the user's
   training clicks), the global-mean user (non-personalized), ridge regression from content
   to the clickers' centroid in user space (a linear map into the same space as the projector),
   ridge from content to implicit-ALS item factors scored with a dot product (the classic
   content -> collaborative-filtering map, whose factor norms keep popularity), and a *warm
   reference*: the pipeline retrained with half of each cold ad's clicks visible,
   scored on the other half (what the same ads would reach once they have some clicks).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch

from adrec_assets.ml.als import AlsFactors, AlsParams, fit_als
from adrec_assets.ml.fields import AdFields
from adrec_assets.ml.linear import ridge_fit, ridge_predict
from adrec_assets.ml.metrics import auc_per_row, ndcg_at_k, recall_at_k
from adrec_assets.ml.params import AdRefitParams, ProjectorParams, UserRefitParams, UserTrainingParams
from adrec_assets.ml.pipeline import fit_pipeline
from adrec_assets.ml.sampling import clicker_centroids
from adrec_assets.ml.scoring import score_matrix
from adrec_assets.ml.training import normalized_mean
from adrec_assets.ml.types import ClickGraph, Fields, artifact_type, pack_strings
from adrec_assets.ml.warm_evaluation import (
    WARM_BASELINES,
    WARM_METHOD_LABELS,
    WARM_METHOD_ORDER,
    WARM_PIPELINE,
    WarmReport,
)

LogFn = Callable[[str], None]

PIPELINE = "pipeline"
METHOD_ORDER = (
    "random", "content_knn", "popularity", "global_mean", "ridge", "ridge_als", "ridge_als_fields", "cosine_only",
    PIPELINE, "infonce_users", "warm_reference",
)  # fmt: skip
# The headline bar: the classic content -> collaborative-filtering map, ridge into ALS item
# factors, given the structured fields too when the source declares them (the stronger of
# the two counts). Content-kNN and ridge into the pipeline's own user space are the weaker,
# same-space baselines.
ALS_BASELINES = ("ridge_als", "ridge_als_fields")
CONTENT_BASELINES = ("content_knn", "ridge")
#: the fields' scale beside the content for ridge -> ALS: its best of 0.25 / 0.5 / 1.0 on
#: ml-latest-small (benchmarks/README.md), so the baseline gets the fields at their best too
BASELINE_FIELD_SCALE = 0.25
METHOD_LABELS = {
    "random": "random",
    "content_knn": "content-kNN (raw content)",
    "popularity": "content-predicted popularity only",
    "global_mean": "global-mean user x projected ad (+ popularity)",
    "ridge": "ridge content -> user space",
    "ridge_als": "ridge content -> ALS item factors (dot)",
    "ridge_als_fields": "ridge content + ad fields -> ALS item factors (dot)",
    "cosine_only": "projector cosine only (popularity_weight 0)",
    PIPELINE: "**pipeline** (served users x projected ad + popularity, cold ads)",
    "infonce_users": "pipeline with the InfoNCE user vectors, no refit (refit mix 0)",
    "warm_reference": "warm reference (half the clicks seen)",
}


class EvaluationError(ValueError):
    """The click graph cannot support the protocol (too few clicked ads or users)."""


@dataclass(frozen=True)
class EvaluationParams:
    cold_share: float = 0.2
    n_strata: int = 10
    k: int = 20
    seed: int = 0
    warm_reference: bool = True


@dataclass(frozen=True)
class ColdSplit:
    """Train graph (same user/ad index spaces, cold clicks removed) and the test targets."""

    train: ClickGraph
    cold_ads: np.ndarray  # (n_cold,) ad indices into the graph
    eval_users: np.ndarray  # (n_eval,) user indices with >= 1 held-out click
    relevant: np.ndarray  # (n_eval, n_cold) bool: held-out clicks
    seen: np.ndarray  # (n_eval, n_cold) bool: clicks on cold ads visible in training (warm only)


def stratified_cold_ads(graph: ClickGraph, share: float, n_strata: int, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the clicked ads, drawn evenly from popularity strata (sorted ad indices)."""
    if not 0.0 < share < 1.0:
        raise EvaluationError(f"cold_share must be in (0, 1), got {share}")
    degree = graph.ad_degrees()
    clicked = np.flatnonzero(degree > 0)
    if len(clicked) < 10:
        raise EvaluationError(f"only {len(clicked)} ads have clicks; the cold-start protocol needs at least 10")
    # Ties in degree are ordered randomly so strata boundaries do not follow ad ids.
    order = clicked[np.lexsort((rng.random(len(clicked)), degree[clicked]))]
    picks = []
    for stratum in np.array_split(order, min(n_strata, len(order))):
        n = int(round(share * len(stratum)))
        picks.append(rng.choice(stratum, size=n, replace=False))
    cold = np.sort(np.concatenate(picks))
    if len(cold) < 2:
        raise EvaluationError(f"cold share {share} of {len(clicked)} clicked ads leaves fewer than 2 cold ads")
    return cold


def _targets(
    graph: ClickGraph, cold: np.ndarray, held_out: np.ndarray, seen: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eval_users, relevant, seen) matrices over the cold ads from click masks."""
    column = np.full(graph.n_ads, -1, dtype=np.int64)
    column[cold] = np.arange(len(cold))
    users = graph.click_users()
    eval_users = np.unique(users[held_out])
    row = np.full(graph.n_users, -1, dtype=np.int64)
    row[eval_users] = np.arange(len(eval_users))
    relevant = np.zeros((len(eval_users), len(cold)), dtype=bool)
    relevant[row[users[held_out]], column[graph.indices[held_out]]] = True
    seen_matrix = np.zeros_like(relevant)
    visible_cold = seen & (row[users] >= 0)
    seen_matrix[row[users[visible_cold]], column[graph.indices[visible_cold]]] = True
    return eval_users, relevant, seen_matrix


def cold_split(graph: ClickGraph, params: EvaluationParams) -> ColdSplit:
    """Cold-ad split: every click on a cold ad leaves training (see module docstring)."""
    rng = np.random.default_rng(params.seed)
    cold = stratified_cold_ads(graph, params.cold_share, params.n_strata, rng)
    is_cold_click = np.isin(graph.indices, cold)
    eval_users, relevant, seen = _targets(graph, cold, is_cold_click, np.zeros_like(is_cold_click))
    return ColdSplit(graph.keep_clicks(~is_cold_click), cold, eval_users, relevant, seen)


def warm_split(graph: ClickGraph, cold: np.ndarray, seed: int) -> ColdSplit:
    """Same cold ads, but a random half of each one's clicks stays in training; the other
    half is the target (ads with one click keep it hidden)."""
    rng = np.random.default_rng([seed, 1])
    is_cold_click = np.isin(graph.indices, cold)
    visible = np.zeros(graph.n_clicks, dtype=bool)
    cold_clicks = np.flatnonzero(is_cold_click)
    # Shuffle, then within each ad keep the first floor(deg / 2) clicks visible.
    cold_clicks = cold_clicks[rng.permutation(len(cold_clicks))]
    cold_clicks = cold_clicks[np.argsort(graph.indices[cold_clicks], kind="stable")]
    ads = graph.indices[cold_clicks]
    starts = np.searchsorted(ads, ads, side="left")
    position = np.arange(len(ads)) - starts
    degree = np.bincount(ads, minlength=graph.n_ads)[ads]
    visible[cold_clicks[position < degree // 2]] = True
    held_out = is_cold_click & ~visible
    eval_users, relevant, seen = _targets(graph, cold, held_out, visible)
    return ColdSplit(graph.keep_clicks(~held_out), cold, eval_users, relevant, seen)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def content_knn_scores(split: ColdSplit, content: np.ndarray) -> np.ndarray:
    """cos(mean raw content of the user's training clicks, raw content of each cold ad).
    Users with no training click get all-equal scores (random order)."""
    train = split.train
    rows = np.zeros((train.n_users, content.shape[1]), dtype=np.float64)
    np.add.at(rows, train.click_users(), content[train.indices])
    profile = _unit(rows[split.eval_users])
    return profile @ content[split.cold_ads].astype(np.float64).T


def ridge_scores(split: ColdSplit, content: np.ndarray, user_vectors: np.ndarray, seed: int) -> np.ndarray:
    """user . ridge(content): ridge from a clicked ad's content to its clickers' centroid."""
    train = split.train
    clicked = np.flatnonzero(train.ad_degrees() > 0)
    centroids = clicker_centroids(train, user_vectors)
    weights = ridge_fit(content[clicked], centroids[clicked], np.random.default_rng([seed, 2]))
    return user_vectors[split.eval_users].astype(np.float64) @ ridge_predict(content[split.cold_ads], weights).T


def ridge_als_scores(
    split: ColdSplit, content: np.ndarray, params: AlsParams, factors: AlsFactors | None = None
) -> np.ndarray:
    """user factor . ridge(content): ALS on the training clicks (or the given ``factors`` of
    them), then ridge from a clicked ad's content to its ALS item factor. Unnormalized factors
    carry popularity in their norm, so this baseline scores popularity and taste in one dot
    product."""
    train = split.train
    factors = fit_als(train, params) if factors is None else factors
    clicked = np.flatnonzero(train.ad_degrees() > 0)
    weights = ridge_fit(content[clicked], factors.ads[clicked], np.random.default_rng([params.seed, 6]))
    return factors.users[split.eval_users].astype(np.float64) @ ridge_predict(content[split.cold_ads], weights).T


@dataclass
class TrainedOnSplit:
    user_vectors: np.ndarray  # the InfoNCE space (what the projector learns and a refresh starts from)
    served_vectors: np.ndarray  # refitted against the projected ads: what the service ranks with
    projected_cold: np.ndarray  # (n_cold, d) unit rows
    bias_cold: np.ndarray  # (n_cold,) the score's popularity term
    popularity_cold: np.ndarray  # (n_cold,) the popularity head's z-score
    seconds: float
    projector_state: dict[str, torch.Tensor] = field(default_factory=dict)  # for a warm start

    def scores(self, eval_users: np.ndarray) -> np.ndarray:
        """What serving computes: cos(served user, projected ad) + popularity bias."""
        return score_matrix(self.served_vectors[eval_users], self.projected_cold, self.bias_cold)


def train_pipeline_on(
    split: ColdSplit,
    content: np.ndarray,
    user_params: UserTrainingParams,
    projector_params: ProjectorParams,
    log: LogFn | None = None,
    train: ClickGraph | None = None,
    warm_from: TrainedOnSplit | None = None,
    refresh_epochs: tuple[int, int] = (2, 2),
    fields: AdFields = AdFields(),
    refit_params: UserRefitParams = UserRefitParams(),
    ad_params: AdRefitParams = AdRefitParams(),
) -> TrainedOnSplit:
    """The pipeline's own training code on the split's training clicks (or on ``train``,
    a graph over the same user/ad indices). With ``warm_from`` it is a warm-start refresh:
    user vectors and projector weights start from that model and train ``refresh_epochs``
    (users, projector) epochs, as the assets do after new clicks arrive. ``fields`` (rows
    aligned with ``content``) are the ads' structured fields; as in the ``projector`` asset
    their encoding is fitted on every ad's cells (ad properties, no clicks). Users and ads are
    then fitted as ``served_model`` does (``refit_params``, ``ad_params``); the cold ads have no
    training click, so they keep their projections and do not enter the fit."""
    started = time.perf_counter()
    train = split.train if train is None else train
    fitted = fit_pipeline(
        train, content, fields, user_params, projector_params, refit_params, ad_params,
        init_users=None if warm_from is None else warm_from.user_vectors,
        init_projector=None if warm_from is None else warm_from.projector_state, refresh_epochs=refresh_epochs,
    )  # fmt: skip
    if log:
        log(f"user space: {fitted.history_steps} steps, final loss {fitted.final_loss:.4f}")
    model = fitted.model
    cold_inputs = model.inputs(content[split.cold_ads], fields.take(split.cold_ads).cells)
    with torch.inference_mode():
        popularity = model.popularity_z(torch.from_numpy(cold_inputs))
    return TrainedOnSplit(
        fitted.user_vectors,
        fitted.users,
        fitted.projected[split.cold_ads],
        fitted.projected_bias[split.cold_ads],
        popularity.numpy(),
        time.perf_counter() - started,
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@dataclass
class MethodResult:
    recall: float
    ndcg: float
    auc: float
    n_users: int
    n_cold_ads: int


@artifact_type("evaluation_report")
@dataclass
class EvaluationReport:
    """Metrics of every method on one split, or their means over several seeds' splits
    (``per_seed`` keeps each seed's Recall, NDCG and AUC); stored as the ``evaluation`` artifact."""

    k: int
    results: dict[str, MethodResult] = field(default_factory=dict)
    n_cold_ads: int = 0
    n_eval_users: int = 0
    n_train_clicks: int = 0
    n_held_out_clicks: int = 0
    seconds: float = 0.0
    settings: str = ""  # JSON of the evaluation and training params used
    seeds: list[int] = field(default_factory=list)
    per_seed: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n_seeds, 3) recall, ndcg, auc
    #: the warm protocol (adrec_assets.ml.warm_evaluation), when run: method -> (n_seeds, 2) recall, ndcg
    warm_per_seed: dict[str, np.ndarray] = field(default_factory=dict)
    warm_settings: str = "[]"  # JSON, one entry per seed: tuned baselines, their grids, counts

    _COUNTS: ClassVar[tuple[str, ...]] = ("n_cold_ads", "n_eval_users", "n_train_clicks", "n_held_out_clicks")

    def to_arrays(self) -> dict[str, np.ndarray]:
        names = list(self.results)
        out = {
            **pack_strings("methods", names),
            "metrics": np.asarray(
                [[r.recall, r.ndcg, r.auc, r.n_users, r.n_cold_ads] for r in self.results.values()], dtype=np.float64
            ).reshape(len(names), 5),
            "k": np.asarray(self.k),
            "seconds": np.asarray(self.seconds),
            "settings": np.asarray(self.settings),
            "seeds": np.asarray(self.seeds, dtype=np.int64),
            "seed_metrics": np.asarray([self.per_seed[n] for n in names], dtype=np.float64).reshape(
                len(names), len(self.seeds), 3
            ),
        }
        out.update({name: np.asarray(getattr(self, name)) for name in self._COUNTS})
        warm = list(self.warm_per_seed)
        out.update(pack_strings("warm_methods", warm))
        out["warm_metrics"] = np.asarray([self.warm_per_seed[n] for n in warm], dtype=np.float64).reshape(
            len(warm), len(self.seeds) if warm else 0, 2
        )
        out["warm_settings"] = np.asarray(self.warm_settings)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EvaluationReport:
        f = Fields(arrays, cls.type_tag)
        names = [str(name) for name in f.strings("methods")]
        results = {
            name: MethodResult(float(m[0]), float(m[1]), float(m[2]), int(m[3]), int(m[4]))
            for name, m in zip(names, f.array("metrics"))
        }
        counts = {name: int(f.array(name)) for name in cls._COUNTS}
        return cls(
            k=int(f.array("k")), results=results, seconds=float(f.array("seconds")),
            settings=f.text("settings"), **counts, seeds=[int(s) for s in f.array("seeds")],
            per_seed=dict(zip(names, f.array("seed_metrics"))),
            warm_per_seed=dict(zip([str(n) for n in f.strings("warm_methods")], f.array("warm_metrics"))),
            warm_settings=f.text("warm_settings"),
        )  # fmt: skip

    def headline(self) -> tuple[float, np.ndarray]:
        """Pipeline / the stronger ridge -> ALS baseline, Recall@k: the ratio of the means over
        seeds, and each seed's own ratio."""
        name, baseline = self.als_baseline()
        pipeline = self.per_seed[PIPELINE][:, 0]
        per_seed = pipeline / np.where(self.per_seed[name][:, 0] > 0, self.per_seed[name][:, 0], np.nan)
        return (self.results[PIPELINE].recall / baseline if baseline > 0 else float("nan")), per_seed

    def als_baseline(self) -> tuple[str, float]:
        """The stronger ridge -> ALS baseline by recall: the headline's denominator."""
        name = max((m for m in ALS_BASELINES if m in self.results), key=lambda m: self.results[m].recall)
        return name, self.results[name].recall

    def best_baseline(self) -> tuple[str, float]:
        """The stronger of content-kNN and ridge into user space by recall (the bar the
        pipeline must clear; ``ridge_als`` is compared separately)."""
        name = max(CONTENT_BASELINES, key=lambda m: self.results[m].recall)
        return name, self.results[name].recall

    def warm_headline(self) -> tuple[float, np.ndarray, str]:
        """(ratio, per seed, baseline): pipeline / the best tuned warm baseline by mean Recall@k,
        and each seed's pipeline / that seed's best baseline."""
        names = [m for m in WARM_BASELINES if m in self.warm_per_seed]
        best = max(names, key=lambda m: self.warm_per_seed[m][:, 0].mean())
        pipeline = self.warm_per_seed[WARM_PIPELINE][:, 0]
        per_seed = pipeline / np.stack([self.warm_per_seed[m][:, 0] for m in names]).max(axis=0)
        return float(pipeline.mean() / self.warm_per_seed[best][:, 0].mean()), per_seed, best

    def warm_markdown(self) -> str:
        """The warm table: Recall@k and NDCG@k, mean ± std over seeds, and Recall@k per seed."""
        k = self.k
        lines = [f"| method (warm) | Recall@{k} | NDCG@{k} | Recall@{k} per seed |", "|---|---:|---:|---|"]
        for name in WARM_METHOD_ORDER:
            if name in self.warm_per_seed:
                v = self.warm_per_seed[name]
                cells = [f"{v[:, i].mean():.4f} ± {v[:, i].std():.4f}" for i in range(2)]
                lines.append(
                    f"| {WARM_METHOD_LABELS[name]} | {' | '.join(cells)} | {', '.join(f'{x:.4f}' for x in v[:, 0])} |"
                )
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table; over several seeds each cell is mean ± std across them."""
        k = self.k
        lines = [f"| method | Recall@{k} | NDCG@{k} | AUC | users | cold ads |", "|---|---:|---:|---:|---:|---:|"]
        for name in METHOD_ORDER:
            if name in self.results:
                r = self.results[name]
                spread = self.per_seed.get(name)
                cells = [f"{v:.4f}" for v in (r.recall, r.ndcg, r.auc)]
                if spread is not None and len(spread) > 1:
                    cells = [f"{c} ± {spread[:, i].std():.4f}" for i, c in enumerate(cells)]
                lines.append(f"| {METHOD_LABELS[name]} | {' | '.join(cells)} | {r.n_users} | {r.n_cold_ads} |")
        return "\n".join(lines)


def combine_seeds(reports: list[EvaluationReport]) -> EvaluationReport:
    """One report of several seeds' splits: each method's metrics averaged over the seeds,
    counts from the first split, seconds summed, ``per_seed`` the seeds' own numbers."""
    if not reports:
        raise EvaluationError("no seed was evaluated")
    first = reports[0]
    methods = [m for m in first.results if all(m in r.results for r in reports)]
    per_seed = {
        m: np.asarray([[r.results[m].recall, r.results[m].ndcg, r.results[m].auc] for r in reports]) for m in methods
    }
    results = {
        m: MethodResult(*map(float, per_seed[m].mean(axis=0)), first.results[m].n_users, first.results[m].n_cold_ads)
        for m in methods
    }
    settings = json.loads(first.settings) if first.settings else {}
    seeds = [seed for r in reports for seed in r.seeds]
    settings["seeds"] = seeds
    counts = {name: getattr(first, name) for name in EvaluationReport._COUNTS}
    warm_methods = [m for m in first.warm_per_seed if all(m in r.warm_per_seed for r in reports)]
    return EvaluationReport(
        k=first.k, results=results, seconds=sum(r.seconds for r in reports), settings=json.dumps(settings, sort_keys=True),
        seeds=seeds, per_seed=per_seed, **counts,
        warm_per_seed={m: np.concatenate([r.warm_per_seed[m] for r in reports]) for m in warm_methods},
        warm_settings=json.dumps([entry for r in reports for entry in json.loads(r.warm_settings)]),
    )  # fmt: skip


def with_warm(report: EvaluationReport, warm: WarmReport) -> EvaluationReport:
    """``report`` (one seed) with that seed's warm table attached."""
    report.warm_per_seed = {name: np.asarray([values]) for name, values in warm.results.items()}
    report.warm_settings = json.dumps([{
        "seed": warm.seed, "tuned": warm.tuned, "grid": warm.grid, "n_eval_users": warm.n_eval_users,
        "n_held_out_clicks": warm.n_held_out, "seconds": round(warm.seconds, 1),
    }])  # fmt: skip
    report.seconds += warm.seconds
    return report


def score_metrics(scores: np.ndarray, split: ColdSplit, k: int, seed: int) -> MethodResult:
    """Recall@k, NDCG@k (ads the user saw in training are excluded) and AUC, means over users."""
    scores = np.where(split.seen, -np.inf, scores.astype(np.float64))
    rng = np.random.default_rng([seed, 3])
    return MethodResult(
        recall=float(np.nanmean(recall_at_k(scores, split.relevant, k, rng))),
        ndcg=float(np.nanmean(ndcg_at_k(scores, split.relevant, k, rng))),
        auc=float(np.nanmean(auc_per_row(scores, split.relevant, candidates=~split.seen))),
        n_users=len(split.eval_users),
        n_cold_ads=len(split.cold_ads),
    )


def evaluate_cold_start(
    graph: ClickGraph,
    content: np.ndarray,
    user_params: UserTrainingParams,
    projector_params: ProjectorParams,
    params: EvaluationParams = EvaluationParams(),
    log: LogFn | None = None,
    fields: AdFields = AdFields(),
    refit_params: UserRefitParams = UserRefitParams(),
    ad_params: AdRefitParams = AdRefitParams(),
) -> EvaluationReport:
    """Run the whole protocol; ``content`` rows (and ``fields``' cells) align with ``graph.ad_ids``."""
    if len(content) != graph.n_ads:
        raise EvaluationError(f"content has {len(content)} rows for {graph.n_ads} ads in the click graph")
    started = time.perf_counter()
    split = cold_split(graph, params)
    if len(split.eval_users) == 0:
        raise EvaluationError("no user clicked a cold ad; the split has nothing to evaluate")
    report = EvaluationReport(
        k=params.k,
        n_cold_ads=len(split.cold_ads),
        n_eval_users=len(split.eval_users),
        n_train_clicks=split.train.n_clicks,
        n_held_out_clicks=int(split.relevant.sum()),
        settings=json.dumps(
            {
                "evaluation": asdict(params),
                "user": asdict(user_params),
                "projector": asdict(projector_params),
                "refit": asdict(refit_params),
                "ad_refit": asdict(ad_params),
            },
            sort_keys=True,
        ),
    )
    say = log or (lambda message: None)
    say(
        f"split: {len(split.cold_ads)} cold ads, {len(split.eval_users)} users, {report.n_train_clicks} training clicks"
    )
    rng = np.random.default_rng([params.seed, 4])

    def record(name: str, scores: np.ndarray, on: ColdSplit = split) -> None:
        report.results[name] = score_metrics(scores, on, params.k, params.seed)
        say(f"{name}: Recall@{params.k} {report.results[name].recall:.4f}")

    record("random", rng.random(split.relevant.shape))
    record("content_knn", content_knn_scores(split, content))
    trained = train_pipeline_on(split, content, user_params, projector_params, log, fields=fields,
                                refit_params=refit_params, ad_params=ad_params)  # fmt: skip
    n_eval = len(split.eval_users)
    record("popularity", np.tile(trained.popularity_cold, (n_eval, 1)))
    prior = normalized_mean(trained.served_vectors)[0]
    record("global_mean", np.tile(trained.projected_cold @ prior + trained.bias_cold, (n_eval, 1)))
    record("ridge", ridge_scores(split, content, trained.user_vectors, params.seed))
    als_params = AlsParams(seed=params.seed)
    factors = fit_als(split.train, als_params)
    record("ridge_als", ridge_als_scores(split, content, als_params, factors))
    if fields.specs:
        encoded = fields.fit(BASELINE_FIELD_SCALE).transform(fields.cells, graph.n_ads)
        record("ridge_als_fields", ridge_als_scores(split, np.hstack([content, encoded]), als_params, factors))
    record("cosine_only", trained.served_vectors[split.eval_users] @ trained.projected_cold.T)
    record(PIPELINE, trained.scores(split.eval_users))
    record(
        "infonce_users", score_matrix(trained.user_vectors[split.eval_users], trained.projected_cold, trained.bias_cold)
    )
    if params.warm_reference:
        warm = warm_split(graph, split.cold_ads, params.seed)
        warm_trained = train_pipeline_on(
            warm, content, user_params, projector_params, log, fields=fields, refit_params=refit_params,
            ad_params=ad_params,
        )  # fmt: skip
        record("warm_reference", warm_trained.scores(warm.eval_users), warm)
    report.seconds = time.perf_counter() - started
    report.seeds = [params.seed]
    report.per_seed = {name: np.asarray([[r.recall, r.ndcg, r.auc]]) for name, r in report.results.items()}
    return report


@dataclass
class RefreshComparison:
    """Cold-ad quality of a warm-start refresh next to a full retrain on the same clicks."""

    full: MethodResult
    refreshed: MethodResult
    stale: MethodResult  # the pre-refresh model, new clicks ignored (what a refresh fixes)
    full_seconds: float
    refresh_seconds: float
    n_new_clicks: int

    def markdown(self, k: int) -> str:
        rows = [
            ("full retrain on all clicks", self.full, self.full_seconds),
            ("warm-start refresh", self.refreshed, self.refresh_seconds),
            ("stale model (before the new clicks)", self.stale, float("nan")),
        ]
        body = "\n".join(f"| {name} | {r.recall:.4f} | {r.ndcg:.4f} | {r.auc:.4f} | {t:.1f} |" for name, r, t in rows)
        return f"| model | Recall@{k} | NDCG@{k} | AUC | training s |\n|---|---:|---:|---:|---:|\n{body}"


def compare_refresh(
    graph: ClickGraph,
    is_new_click: np.ndarray,
    content: np.ndarray,
    user_params: UserTrainingParams,
    projector_params: ProjectorParams,
    params: EvaluationParams = EvaluationParams(),
    refresh_epochs: tuple[int, int] = (2, 2),
    log: LogFn | None = None,
    fields: AdFields = AdFields(),
    refit_params: UserRefitParams = UserRefitParams(),
    ad_params: AdRefitParams = AdRefitParams(),
) -> RefreshComparison:
    """Does a warm-start refresh lose cold-start quality against a full retrain?

    One cold-ad split of the whole graph (old + new clicks). The *stale* model trains on the
    old training clicks only; the *refresh* starts from it and trains ``refresh_epochs`` on
    all training clicks (users absent from the old clicks start at its global mean, as in
    the assets); the *full* model trains from scratch on all training clicks. All three
    rank the same cold ads for the same users.
    """
    if len(is_new_click) != graph.n_clicks:
        raise EvaluationError(f"is_new_click has {len(is_new_click)} entries for {graph.n_clicks} clicks")
    split = cold_split(graph, params)
    is_cold_click = np.isin(graph.indices, split.cold_ads)
    old_train = graph.keep_clicks(~is_cold_click & ~is_new_click)
    common = {"log": log, "fields": fields, "refit_params": refit_params, "ad_params": ad_params}
    full = train_pipeline_on(split, content, user_params, projector_params, **common)
    stale = train_pipeline_on(split, content, user_params, projector_params, train=old_train, **common)
    refreshed = train_pipeline_on(
        split, content, user_params, projector_params, warm_from=stale, refresh_epochs=refresh_epochs, **common
    )
    metric = lambda trained: score_metrics(trained.scores(split.eval_users), split, params.k, params.seed)  # noqa: E731
    return RefreshComparison(
        full=metric(full),
        refreshed=metric(refreshed),
        stale=metric(stale),
        full_seconds=full.seconds,
        refresh_seconds=refreshed.seconds,
        n_new_clicks=int(is_new_click.sum()),
    )
