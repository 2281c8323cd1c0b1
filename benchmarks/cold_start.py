"""Item cold-start benchmark on any file source: the `evaluation` asset's protocol, over seeds.

Reads the source folder with the pipeline's own readers, encodes the ads once (or reuses an
``ad_embeddings_raw`` artifact), then for each seed draws a new cold-ad split and retrains
the user space and the projector on it. Prints every method's Recall@k / NDCG@k / AUC as
mean ± std over the seeds, the pipeline's ratio to the best content baseline, and wall times.

    .venv/bin/python -m adrec_assets.sources.movielens ../shared/datasets/ml-latest-small \\
        data/sources/ml-latest-small
    .venv/bin/python benchmarks/cold_start.py --source data/sources/ml-latest-small --seeds 0 1 2
    # reuse a materialized encoding, try other settings:
    .venv/bin/python benchmarks/cold_start.py --source data/sources/ml-latest-small \\
        --embeddings data/artifacts/ad_embeddings_raw/ml-latest-small.npz --user lr=1e-3 --projector epochs=30
    # incremental refresh: 1% of clicks arrive late; warm-start refresh vs full retrain
    .venv/bin/python benchmarks/cold_start.py --source data/sources/ml-latest-small --refresh 0.01
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adrec_assets.artifacts import load_file  # noqa: E402
from adrec_assets.ml.encoders import build_encoder  # noqa: E402
from adrec_assets.ml.evaluation import (  # noqa: E402
    METHOD_LABELS,
    METHOD_ORDER,
    PIPELINE,
    EvaluationParams,
    EvaluationReport,
    combine_seeds,
    compare_refresh,
    evaluate_cold_start,
)
from adrec_assets.ml.fields import AdFields
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams  # noqa: E402
from adrec_assets.ml.types import AdCatalog, ClickGraph, align_rows  # noqa: E402
from adrec_assets.sources.files import FileSource  # noqa: E402


def overrides(pairs: list[str], cls: type) -> dict:
    """``key=value`` strings -> typed fields of the params dataclass ``cls``."""
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown {cls.__name__} field {key!r}; choose from {sorted(types)}")
        out[key] = (
            {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}[str(types[key])](value)
            if str(types[key]) != "str"
            else value
        )
    return out


def load_content(
    args: argparse.Namespace, graph: ClickGraph, catalog: AdCatalog
) -> tuple[np.ndarray, AdFields, str, float]:
    """Content rows and the ads' structured fields aligned with ``graph.ad_ids`` (no fields
    with ``--no-fields``), the encoder id, and the encoding seconds."""
    started = time.perf_counter()
    if args.embeddings:
        stored = load_file(args.embeddings)
        ids, vectors, encoder_id = stored.ids, stored.vectors, stored.encoder_id
    else:
        encoder = build_encoder(args.encoder)
        result = encoder.encode(list(catalog.texts), [p or None for p in catalog.image_paths])
        ids, vectors, encoder_id = catalog.ad_ids, result.vectors, encoder.encoder_id
    rows = align_rows(ids, graph.ad_ids, "clicked ads missing from the embeddings")
    fields = AdFields() if args.no_fields else catalog.fields.take(align_rows(catalog.ad_ids, graph.ad_ids, "ads"))
    return vectors[rows], fields, encoder_id, time.perf_counter() - started


def run_seed(job: tuple) -> EvaluationReport:
    """One seed's protocol; prints its table as soon as it is done."""
    graph, content, fields, user_params, projector_params, params, threads = job
    if threads:
        torch.set_num_threads(threads)
    result = evaluate_cold_start(graph, content, user_params, projector_params, params, fields=fields)
    best, best_recall = result.als_baseline()
    print(
        f"seed {params.seed}: pipeline Recall@{params.k} {result.results[PIPELINE].recall:.4f}, "
        f"{best} {best_recall:.4f}, {result.seconds:.0f} s\n{result.markdown()}\n",
        flush=True,
    )
    return result


def run_refresh_seed(job: tuple) -> dict:
    """Warm-start refresh vs full retrain on one seed's split (see compare_refresh)."""
    graph, content, fields, user_params, projector_params, params, threads, share, refresh_epochs = job
    if threads:
        torch.set_num_threads(threads)
    is_new = np.random.default_rng([params.seed, 7]).random(graph.n_clicks) < share
    result = compare_refresh(
        graph, is_new, content, user_params, projector_params, params, refresh_epochs, fields=fields
    )
    print(
        f"seed {params.seed}: {result.n_new_clicks} new clicks ({share:.1%})\n{result.markdown(params.k)}\n", flush=True
    )
    return {
        "seed": params.seed,
        "full": asdict(result.full),
        "refreshed": asdict(result.refreshed),
        "stale": asdict(result.stale),
        "full_seconds": result.full_seconds,
        "refresh_seconds": result.refresh_seconds,
        "n_new_clicks": result.n_new_clicks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="file source folder (ads + clicks/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--encoder", default="offline", help="encoder name when --embeddings is not given")
    parser.add_argument("--embeddings", help="reuse an ad_embeddings_raw .npz artifact instead of encoding")
    parser.add_argument("--user", nargs="*", default=[], metavar="K=V", help="UserTrainingParams overrides")
    parser.add_argument("--projector", nargs="*", default=[], metavar="K=V", help="ProjectorParams overrides")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm reference (halves the time)")
    parser.add_argument("--no-fields", action="store_true", help="ignore the source's structured ad fields")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (use --threads 1)")
    parser.add_argument("--json", type=Path, help="also write the per-seed results here")
    parser.add_argument(
        "--refresh", type=float, default=0.0, metavar="SHARE",
        help="instead: mark a random SHARE of clicks as new and compare a warm-start refresh with a full retrain",
    )  # fmt: skip
    parser.add_argument("--refresh-epochs", type=int, nargs=2, default=[2, 2], metavar=("USER", "PROJECTOR"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    wall = time.perf_counter()
    source = FileSource(args.source, args.source.name)
    catalog = source.read_ads()
    clicks, _ = source.read_clicks(catalog.ad_ids)
    graph = ClickGraph.from_codes(
        clicks.user_vocab, clicks.user_codes, clicks.ad_vocab, clicks.ad_codes, clicks.weights
    )
    content, fields, encoder_id, encode_seconds = load_content(args, graph, catalog)
    user_overrides = overrides(args.user, UserTrainingParams)
    projector_overrides = overrides(args.projector, ProjectorParams)
    print(f"source {args.source}: {graph.n_users} users, {graph.n_ads} clicked ads, {graph.n_clicks} user-ad pairs")
    print(f"encoder {encoder_id} ({encode_seconds:.1f} s); torch threads {torch.get_num_threads()}; "
          f"ad fields {[f'{spec.name} ({spec.kind})' for spec in fields.specs] or 'none'}")  # fmt: skip

    jobs = [
        (graph, content, fields, UserTrainingParams(**{**user_overrides, "seed": seed}),
         ProjectorParams(**{**projector_overrides, "seed": seed}),
         EvaluationParams(seed=seed, k=args.k, warm_reference=not args.no_warm), args.threads)
        for seed in args.seeds
    ]  # fmt: skip
    if args.refresh > 0:
        jobs = [(*job, args.refresh, tuple(args.refresh_epochs)) for job in jobs]
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows = list(pool.map(run_refresh_seed, jobs))
        else:
            rows = [run_refresh_seed(job) for job in jobs]
        full = np.array([r["full"]["recall"] for r in rows])
        refreshed = np.array([r["refreshed"]["recall"] for r in rows])
        stale = np.array([r["stale"]["recall"] for r in rows])
        print(
            f"Recall@{args.k} over seeds {args.seeds}: full retrain {full.mean():.4f} ± {full.std():.4f}, "
            f"warm refresh {refreshed.mean():.4f} ± {refreshed.std():.4f}, stale {stale.mean():.4f}"
        )
        print(
            f"refresh / full: {(refreshed / full).mean():.4f} (per seed {np.round(refreshed / full, 4).tolist()}); "
            f"training s full {np.mean([r['full_seconds'] for r in rows]):.1f}, "
            f"refresh {np.mean([r['refresh_seconds'] for r in rows]):.1f}; refresh epochs {args.refresh_epochs}"
        )
        print(f"wall time {time.perf_counter() - wall:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    if args.jobs > 1:
        # Seeds are independent: one process each, one torch thread each (no OpenMP
        # oversubscription); every seed still gives exactly its sequential numbers.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            per_seed = list(pool.map(run_seed, jobs))
    else:
        per_seed = [run_seed(job) for job in jobs]

    k = args.k
    combined = combine_seeds(per_seed)
    print(f"\n{len(args.seeds)} seeds {args.seeds}; {per_seed[0].n_cold_ads} cold ads, "
          f"{per_seed[0].n_eval_users} users evaluated (seed {args.seeds[0]})\n")  # fmt: skip
    print(f"| method | Recall@{k} | NDCG@{k} | AUC | Recall@{k} per seed |\n|---|---:|---:|---:|---|")
    for name in METHOD_ORDER:
        if name not in combined.per_seed:
            continue
        values = combined.per_seed[name]
        cells = [f"{values[:, i].mean():.4f} ± {values[:, i].std():.4f}" for i in range(3)]
        print(f"| {METHOD_LABELS[name]} | " + " | ".join(cells) + f" | {', '.join(f'{v:.4f}' for v in values[:, 0])} |")
    ratio, per_seed_ratio = combined.headline()
    als_name = combined.als_baseline()[0]
    print(
        f"\n**pipeline / {als_name} Recall@{k}: {ratio:.3f}** (ratio of the means; per seed "
        f"{np.round(per_seed_ratio, 3).tolist()}, min {per_seed_ratio.min():.3f}, spread ± {per_seed_ratio.std():.3f}); "
        f"NDCG@{k} {combined.results[PIPELINE].ndcg:.4f} vs {combined.results[als_name].ndcg:.4f}"
    )
    ratios = np.array([r.results[PIPELINE].recall / r.best_baseline()[1] for r in per_seed])
    print(
        f"pipeline / best of (content-kNN, ridge into user space) Recall@{k}: {ratios.mean():.3f} "
        f"(per seed {np.round(ratios, 3).tolist()})"
    )
    print(f"user params {asdict(UserTrainingParams(**user_overrides))}")
    print(f"projector params {asdict(ProjectorParams(**projector_overrides))}")
    print(f"wall time {time.perf_counter() - wall:.1f} s (encoding {encode_seconds:.1f} s, "
          f"per seed {np.mean([r.seconds for r in per_seed]):.1f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                [json.loads(r.settings) | {"results": {n: asdict(m) for n, m in r.results.items()}} for r in per_seed],
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
