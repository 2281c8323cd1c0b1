"""Warm benchmark on any file source: the `evaluation` asset's warm protocol, over seeds.

Known users, ads with click history: each seed holds out a share of every user's clicks on ads
that keep others, retrains the pipeline on the rest, and ranks the whole catalogue against
popularity, EASE and implicit ALS tuned on a validation split
(``adrec_assets.ml.warm_evaluation``). Prints every method's Recall@k / NDCG@k per seed, the
pipeline's ratio to the best tuned baseline per seed with a t interval, and the tuned settings.

    .venv/bin/python -m adrec_assets.sources.movielens ../shared/datasets/ml-latest-small \\
        data/sources/ml-latest-small
    .venv/bin/python benchmarks/warm_start.py --source data/sources/ml-latest-small --seeds 0 1 2 3 4 --jobs 2
    # other ad refit settings (AdRefitParams fields):
    .venv/bin/python benchmarks/warm_start.py --source data/sources/ml-latest-small --ads iterations=0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cold_start import load_content, overrides  # noqa: E402
from scipy import stats  # noqa: E402

from adrec_assets.ml.params import AdRefitParams, ProjectorParams, UserRefitParams, UserTrainingParams  # noqa: E402
from adrec_assets.ml.pipeline import FittedPipeline, fit_pipeline  # noqa: E402
from adrec_assets.ml.scoring import score_matrix  # noqa: E402
from adrec_assets.ml.served_model import fit_served_model  # noqa: E402
from adrec_assets.ml.types import ClickGraph  # noqa: E402
from adrec_assets.ml.warm_evaluation import (  # noqa: E402
    WARM_BASELINES,
    WARM_METHOD_LABELS,
    WARM_METHOD_ORDER,
    WARM_PIPELINE,
    WarmParams,
    evaluate_warm,
    pipeline_scorers,
)
from adrec_assets.sources.files import FileSource  # noqa: E402

ALTERNATED = "pipeline_alternated"  # the same trained pipeline with one alternation (iterations 1)
LABELS = {**WARM_METHOD_LABELS, ALTERNATED: "pipeline, one alternation (AdRefitParams.iterations 1)"}


def scorers(train: ClickGraph, content: np.ndarray, fields, user_params, projector_params, ad_params) -> dict:
    """The pipeline's scorers, and the same trained pipeline served with one more alternation."""
    fitted: FittedPipeline = fit_pipeline(train, content, fields, user_params, projector_params, UserRefitParams(),
                                          ad_params)  # fmt: skip
    n = train.n_ads
    other = fit_served_model(train, fitted.user_vectors, fitted.projected[:n], fitted.projected_bias[:n],
                             UserRefitParams(), replace(ad_params, iterations=1))  # fmt: skip
    vectors, bias = fitted.projected.copy(), fitted.projected_bias.copy()
    vectors[:n], bias[:n] = other.ads.vectors, other.ads.score_bias
    return {**pipeline_scorers(fitted), ALTERNATED: lambda rows: score_matrix(other.users[rows], vectors, bias)}


def run_seed(job: tuple) -> dict:
    graph, n_catalogue, content, fields, user_params, projector_params, ad_params, params, threads = job
    torch.set_num_threads(threads)
    report = evaluate_warm(
        graph, n_catalogue, lambda train: scorers(train, content, fields, user_params, projector_params, ad_params),
        params,
    )  # fmt: skip
    print(f"seed {params.seed} ({report.seconds:.0f} s): "
          + ", ".join(f"{m} {r[0]:.4f}" for m, r in report.results.items()) + f"; tuned {report.tuned}", flush=True)  # fmt: skip
    return {"seed": params.seed, "results": report.results, "tuned": report.tuned, "grid": report.grid,
            "n_eval_users": report.n_eval_users, "n_held_out": report.n_held_out, "seconds": report.seconds}  # fmt: skip


def interval(values: np.ndarray) -> str:
    """mean [95% t interval] over seeds."""
    mean = values.mean()
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="file source folder (ads + clicks/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--encoder", default="offline", help="encoder name when --embeddings is not given")
    parser.add_argument("--embeddings", help="reuse an ad_embeddings_raw .npz artifact instead of encoding")
    parser.add_argument("--ads", nargs="*", default=[], metavar="K=V", help="AdRefitParams overrides")
    parser.add_argument("--no-fields", action="store_true", help="ignore the source's structured ad fields")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one torch thread each)")
    parser.add_argument("--json", type=Path, help="also write the per-seed results here")
    args = parser.parse_args()

    wall = time.perf_counter()
    source = FileSource(args.source, args.source.name)
    catalog = source.read_ads()
    clicks, _ = source.read_clicks(catalog.ad_ids)
    graph = ClickGraph.from_codes(
        clicks.user_vocab, clicks.user_codes, clicks.ad_vocab, clicks.ad_codes, clicks.weights
    )
    # the whole catalogue, the graph's ads first (the protocol ranks every ad)
    order = np.concatenate([graph.ad_ids, np.setdiff1d(catalog.ad_ids, graph.ad_ids)])
    catalogue = ClickGraph(graph.user_ids, order, np.zeros(graph.n_users + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.float32))  # fmt: skip
    content, fields, encoder_id, encode_seconds = load_content(args, catalogue, catalog)
    ad_params = AdRefitParams(**overrides(args.ads, AdRefitParams))
    print(
        f"source {args.source}: {graph.n_users} users, {graph.n_ads} clicked of {len(order)} ads, "
        f"{graph.n_clicks} user-ad pairs; encoder {encoder_id} ({encode_seconds:.1f} s); ad refit {asdict(ad_params)}"
    )
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    jobs = [(graph, len(order), content, fields, UserTrainingParams(seed=seed), ProjectorParams(seed=seed), ad_params,
             WarmParams(k=args.k, seed=seed), threads) for seed in args.seeds]  # fmt: skip
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_seed, jobs))
    else:
        rows = [run_seed(job) for job in jobs]

    k = args.k
    print(f"\n| method | Recall@{k} | NDCG@{k} | Recall@{k} per seed |\n|---|---:|---:|---|")
    for name in (*WARM_METHOD_ORDER, ALTERNATED):
        values = np.asarray([r["results"][name] for r in rows if name in r["results"]])
        if len(values) == len(rows):
            print(f"| {LABELS[name]} | {values[:, 0].mean():.4f} ± {values[:, 0].std():.4f} | "
                  f"{values[:, 1].mean():.4f} ± {values[:, 1].std():.4f} | {', '.join(f'{v:.4f}' for v in values[:, 0])} |")  # fmt: skip
    pipeline = np.asarray([r["results"][WARM_PIPELINE][0] for r in rows])
    for name in (*WARM_BASELINES, "pipeline_projection_only"):
        if all(name in r["results"] for r in rows):
            ratio = pipeline / np.asarray([r["results"][name][0] for r in rows])
            print(f"pipeline / {name} Recall@{k}: {interval(ratio)} (per seed {np.round(ratio, 3).tolist()})")
    best_each = np.asarray([max(r["results"][m][0] for m in WARM_BASELINES if m in r["results"]) for r in rows])
    best = pipeline / best_each
    print(f"**pipeline / best tuned warm baseline Recall@{k}: {interval(best)}** (per seed {np.round(best, 3).tolist()}, "
          f"min {best.min():.3f})")  # fmt: skip
    alternated = np.asarray([r["results"][ALTERNATED][0] for r in rows]) / best_each
    print(f"one alternation / best tuned warm baseline Recall@{k}: {interval(alternated)} "
          f"(per seed {np.round(alternated, 3).tolist()})")  # fmt: skip
    for r in rows:
        print(f"seed {r['seed']}: tuned {r['tuned']}; validation Recall@{k} grid {json.dumps(r['grid'])}")
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
