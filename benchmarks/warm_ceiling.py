"""How far a 128-d dot product reaches on the warm protocol: optimistic ceilings, per seed.

Same split as ``warm_start.py`` (``evaluate_warm``'s first ``holdout_split`` draw for the seed),
same users, same metric code (``evaluate_scorer``). Per seed the pipeline is trained once, then:

1. **The pipeline's own knobs, tuned on the TEST hold-out** (deliberately optimistic: the best
   test value over a grid bounds what validation tuning could reach): the served-model steps
   (``refit_ads``, ``user_step``, as ``fit_served_model`` runs them, checked equal to it) over
   alpha x regularization x iterations x warm_bias (x user_regularization where iterations > 0),
   starting from the trained pipeline's refitted users and content projections.
2. **Rank ceilings of the baselines' model class:** EASE's B truncated to rank r by a
   randomized SVD (score x_u B_r, a u.v model of dimension r); the best rank-r approximation
   of EASE's whole score matrix X B (truncated SVD: the Frobenius-best r-d u.v with free
   users); implicit ALS with 256 / 512 factors over a few settings, test-tuned.

EASE is evaluated at its validation-tuned L2 from ``benchmarks/README.md`` (``--ease-l2``) or
re-tuned on the validation split exactly as ``evaluate_warm`` does (``--tune-ease``, slow).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/warm_ceiling.py \\
        --source data/sources/ml-latest-small --seeds 0 1 2 3 4 --json /tmp/ceiling.jsonl
    # the defaults are the wide grid (200 settings, ~20 min a seed on a shared core); the README's run used
    # --alpha 0.25 0.5 1 2 --regularization 15 30 60 --warm-bias 0 --als-regularization 100 300 --als-alpha 40
    .venv/bin/python benchmarks/warm_ceiling.py --report /tmp/ceiling.jsonl  # tables of saved rows
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from cold_start import load_content  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from warm_start import interval  # noqa: E402

from adrec_assets.ml.ad_refit import refit_ads  # noqa: E402
from adrec_assets.ml.als import AlsParams, click_matrix  # noqa: E402
from adrec_assets.ml.params import AdRefitParams, ProjectorParams, UserRefitParams, UserTrainingParams  # noqa: E402
from adrec_assets.ml.pipeline import fit_pipeline  # noqa: E402
from adrec_assets.ml.scoring import score_matrix  # noqa: E402
from adrec_assets.ml.served_model import fit_served_model, user_step  # noqa: E402
from adrec_assets.ml.types import ClickGraph  # noqa: E402
from adrec_assets.ml.warm_evaluation import (  # noqa: E402
    WarmParams,
    _padded,
    als_scorer,
    evaluate_scorer,
    holdout_split,
    pipeline_scorers,
    popularity_scorer,
)
from adrec_assets.sources.files import FileSource  # noqa: E402

# validation-tuned EASE L2 per seed and its test Recall@20 (benchmarks/README.md, warm_start.py, 2026-12-06)
README_EASE = {0: (200.0, 0.2562), 1: (500.0, 0.2516), 2: (200.0, 0.2533), 3: (200.0, 0.2593), 4: (200.0, 0.2448)}
README_PIPELINE = {0: 0.2457, 1: 0.2524, 2: 0.2509, 3: 0.2577, 4: 0.2457}


def ease_matrix(train: ClickGraph, l2: float) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """(B, X, clicked): ``warm_evaluation.ease_scorer``'s computation, with B kept."""
    clicked = np.flatnonzero(train.ad_degrees() > 0)
    x = click_matrix(train)[:, clicked].astype(np.float64)
    x.data[:] = 1.0
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    with threadpool_limits(None, "blas"):
        p = np.linalg.inv(gram)
    b = p / (-np.diag(p))[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b, sp.csr_matrix(x), clicked


def dense_scorer(scores: np.ndarray, clicked: np.ndarray, n_graph: int, n_catalogue: int):
    """Scorer over precomputed (n_users, len(clicked)) scores; unclicked ads last, as EASE does."""

    def score(rows: np.ndarray) -> np.ndarray:
        s = np.full((len(rows), n_graph), -np.inf)
        s[:, clicked] = scores[rows]
        return _padded(s, n_catalogue)

    return score


def randomized_svd(matrix: np.ndarray, rank: int, oversample: int = 64, power: int = 6, seed: int = 0):
    """Halko et al.: (U, s, Vt) of the top ``rank`` singular triplets."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], rank + oversample)))
    for _ in range(power):
        q, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ q)
    u, s, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def run_seed(seed: int, graph: ClickGraph, n_catalogue: int, content, fields, args) -> dict:
    started = time.perf_counter()
    k = args.k
    params = WarmParams(k=k, seed=seed)
    rng = np.random.default_rng([seed, 10])
    split = holdout_split(graph, params.holdout_share, rng)  # evaluate_warm's first draw: the same split
    train, users, n = split.train, split.eval_users, split.train.n_ads
    row: dict = {"seed": seed, "n_eval_users": len(users), "n_held_out": len(split.test_users), "seconds": {}}

    def evaluate(scorer) -> float:
        return evaluate_scorer(scorer, split, users, n_catalogue, k, seed)[0]

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        row["seconds"][stage] = round(now - since, 1)
        print(f"  seed {seed} {stage}: {now - since:.1f} s", flush=True)
        return now

    clock = time.perf_counter()
    row["popularity"] = evaluate(popularity_scorer(train, n_catalogue))
    # --- EASE at its tuned L2 (or re-tuned as evaluate_warm does) ---
    if args.tune_ease:
        tuning = holdout_split(train, params.validation_share, rng)
        tune_users = tuning.eval_users
        grid = []
        for l2 in params.ease_l2:
            b, x, clicked = ease_matrix(tuning.train, l2)
            scores = np.asarray(x @ b)
            grid.append((l2, evaluate_scorer(dense_scorer(scores, clicked, tuning.train.n_ads, n_catalogue), tuning,
                                             tune_users, n_catalogue, k, seed)[0]))  # fmt: skip
        row["ease_grid"] = grid
        l2 = max(grid, key=lambda pair: pair[1])[0]
    else:
        l2 = args.ease_l2.get(seed, README_EASE.get(seed, (200.0,))[0])
    b, x, clicked = ease_matrix(train, l2)
    ease_scores = np.asarray(x @ b)
    row["ease_l2"], row["ease"] = l2, evaluate(dense_scorer(ease_scores, clicked, n, n_catalogue))
    print(f"  seed {seed} EASE L2 {l2}: {row['ease']:.4f} (README {README_EASE.get(seed, (None, None))[1]}); "
          f"popularity {row['popularity']:.4f}", flush=True)  # fmt: skip
    clock = lap("ease", clock)
    # --- EASE rank ceilings ---
    top = max(args.ranks)
    left, sing, right = randomized_svd(b, top, seed=seed)
    row["ease_b_rank"] = {}
    for r in args.ranks:
        approx = np.asarray(x @ (left[:, :r] * sing[:r])) @ right[:r]
        row["ease_b_rank"][r] = evaluate(dense_scorer(approx, clicked, n, n_catalogue))
    su, ss, svt = np.linalg.svd(ease_scores, full_matrices=False)
    row["ease_scores_rank"] = {}
    for r in args.ranks:
        approx = (su[:, :r] * ss[:r]) @ svt[:r]
        row["ease_scores_rank"][r] = evaluate(dense_scorer(approx, clicked, n, n_catalogue))
    print(f"  seed {seed} EASE B rank-r {row['ease_b_rank']}, X B rank-r {row['ease_scores_rank']}", flush=True)
    del b, ease_scores, left, right, su, svt
    clock = lap("ease ranks", clock)
    # --- the pipeline, trained once ---
    fitted = fit_pipeline(train, content, fields, UserTrainingParams(seed=seed), ProjectorParams(seed=seed),
                          UserRefitParams(), AdRefitParams())  # fmt: skip
    clock = lap("fit_pipeline", clock)
    row["pipeline"] = evaluate(pipeline_scorers(fitted)["pipeline"])
    print(f"  seed {seed} pipeline default: {row['pipeline']:.4f} (README {README_PIPELINE.get(seed)})", flush=True)
    first = fitted.served.projection_users
    projected, bias = fitted.projected[:n], fitted.projected_bias[:n]
    has_clicks = np.diff(train.indptr) > 0

    def served(ad_params: AdRefitParams):
        """Yield (iteration, users, RefitAds) after each ad step, as fit_served_model runs them."""
        u = first
        ads = refit_ads(train, u, projected, bias, ad_params)
        yield 0, u, ads
        for iteration in range(1, ad_params.iterations + 1):
            step = user_step(train, ads.vectors, ad_params.alpha, ad_params.user_regularization)[has_clicks]
            norms = np.linalg.norm(step, axis=1, keepdims=True)
            u = u.copy()
            u[has_clicks] = np.where(norms > 1e-12, step / np.maximum(norms, 1e-12), u[has_clicks])
            ads = refit_ads(train, u, projected, bias, ad_params)
            yield iteration, u, ads

    def scorer(u: np.ndarray, ads, warm_bias: float):
        vectors, b = fitted.projected.copy(), fitted.projected_bias.copy()
        vectors[:n] = ads.vectors
        b[:n] = np.where(ads.refitted, bias * warm_bias, bias)
        u = u.astype(np.float32)
        return lambda rows: score_matrix(u[rows], vectors, b)

    # the reimplemented loop equals fit_served_model (default and two alternations)
    check = replace(AdRefitParams(), iterations=2)
    reference = fit_served_model(train, fitted.user_vectors, projected, bias, UserRefitParams(), check)
    *_, (_, u_mine, ads_mine) = served(check)
    assert np.allclose(reference.users, u_mine.astype(np.float32), atol=1e-5)
    assert np.allclose(reference.ads.vectors, ads_mine.vectors, atol=1e-5)
    _, u0, ads0 = next(served(AdRefitParams()))
    assert np.allclose(fitted.served.ads.vectors, ads0.vectors, atol=1e-5)
    mine = evaluate(scorer(u0, ads0, AdRefitParams().warm_bias))
    assert abs(mine - row["pipeline"]) < 1e-9, (mine, row["pipeline"])
    grid = []
    max_it = max(args.iterations)
    for alpha, reg in itertools.product(args.alpha, args.regularization):
        user_regs = [AdRefitParams().user_regularization] + [r for r in args.user_regularization
                                                              if r != AdRefitParams().user_regularization]  # fmt: skip
        for user_reg in user_regs if max_it > 0 else user_regs[:1]:
            ad_params = AdRefitParams(alpha=alpha, regularization=reg, iterations=max_it, user_regularization=user_reg)
            for iteration, u, ads in served(ad_params):
                if iteration not in args.iterations or (iteration == 0 and user_reg != user_regs[0]):
                    continue
                for warm_bias in args.warm_bias:
                    recall = evaluate(scorer(u, ads, warm_bias))
                    grid.append({"alpha": alpha, "regularization": reg, "iterations": iteration, "warm_bias": warm_bias,
                                 "user_regularization": user_reg, "recall": recall})  # fmt: skip
        best = max(grid, key=lambda g: g["recall"])
        print(f"  seed {seed} grid alpha {alpha} reg {reg} done ({len(grid)} settings); best so far {best}", flush=True)
    row["grid"] = grid
    clock = lap("grid", clock)
    # --- ALS with more factors, test-tuned ---
    row["als"] = []
    for factors, reg, alpha in itertools.product(args.als_factors, args.als_regularization, args.als_alpha):
        t = time.perf_counter()
        setting = AlsParams(factors=factors, regularization=reg, alpha=alpha, seed=seed, threads=1)
        recall = evaluate(als_scorer(train, setting, n_catalogue))
        row["als"].append({"factors": factors, "regularization": reg, "alpha": alpha, "recall": recall})
        print(f"  seed {seed} ALS {factors}/{reg}/{alpha}: {recall:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    clock = lap("als", clock)
    row["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return row


def key(g: dict) -> tuple:
    return (g["alpha"], g["regularization"], g["iterations"], g["warm_bias"], g["user_regularization"])


def label(g: dict) -> str:
    extra = f" ureg {g['user_regularization']:g}" if g["iterations"] else ""
    return f"a{g['alpha']:g} r{g['regularization']:g} it{g['iterations']} wb{g['warm_bias']:g}{extra}"


def report(rows: list[dict], k: int) -> None:
    ease = np.asarray([r["ease"] for r in rows])
    print(f"\nRecall@{k} on the test hold-out; ratios are to each seed's tuned EASE (the best tuned baseline).")
    ranks = sorted(rows[0]["ease_b_rank"], key=int)
    head = " | ".join(f"EASE B rank {r}" for r in ranks) + " | " + " | ".join(f"EASE XB rank {r}" for r in ranks)
    factors = sorted({a["factors"] for a in rows[0]["als"]})
    print(
        f"\n| seed | EASE (L2) | pipeline default | ratio | best grid on test (setting) | ratio | {head} | "
        + " | ".join(f"best ALS-{f} (setting)" for f in factors)
        + " |"
    )
    print("|---" * (6 + 2 * len(ranks) + len(factors)) + "|")
    columns: dict[str, list[float]] = {}

    def ratio(name: str, value: float, base: float) -> str:
        columns.setdefault(name, []).append(value / base)
        return f"{value:.4f} ({value / base:.3f}x)"

    for r in rows:
        best = max(r["grid"], key=lambda g: g["recall"])
        cells = [f"{r['seed']}", f"{r['ease']:.4f} ({r['ease_l2']:g})", f"{r['pipeline']:.4f}",
                 ratio("pipeline default", r["pipeline"], r["ease"]).split(" ")[1],
                 f"{best['recall']:.4f} ({label(best)})", ratio("best grid, per seed", best["recall"], r["ease"]).split(" ")[1]]  # fmt: skip
        cells += [ratio(f"EASE B rank {q}", r["ease_b_rank"][q], r["ease"]) for q in ranks]
        cells += [ratio(f"EASE XB rank {q}", r["ease_scores_rank"][q], r["ease"]) for q in ranks]
        for f in factors:
            a = max((a for a in r["als"] if a["factors"] == f), key=lambda a: a["recall"])
            cells.append(ratio(f"best ALS-{f}, per seed", a["recall"], r["ease"]).split(" ")[0]
                         + f" ({a['recall'] / r['ease']:.3f}x; r{a['regularization']:g} a{a['alpha']:g})")  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\nmean ratio to tuned EASE over seeds {[r['seed'] for r in rows]} (95% t interval):")
    for name, values in columns.items():
        values = np.asarray(values)
        print(f"  {name}: {interval(values)} (per seed {np.round(values, 3).tolist()})")
    # the single best setting over seeds (mean ratio), and the default for reference
    settings = {key(g) for g in rows[0]["grid"]}
    by_setting = {s: np.asarray([next(g["recall"] for g in r["grid"] if key(g) == s) / r["ease"] for r in rows])
                  for s in settings if all(any(key(g) == s for g in r["grid"]) for r in rows)}  # fmt: skip
    ranked = sorted(by_setting.items(), key=lambda item: -item[1].mean())
    print("\nbest single grid settings across seeds (test-tuned, mean ratio to tuned EASE):")
    for s, values in ranked[:8]:
        g = dict(zip(("alpha", "regularization", "iterations", "warm_bias", "user_regularization"), s, strict=True))
        print(f"  {label(g)}: {interval(values)} (per seed {np.round(values, 3).tolist()}, min {values.min():.3f})")
    print(f"seeds' EASE Recall@{k}: {np.round(ease, 4).tolist()}; grid size {len(settings)} settings per seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="file source folder (ads + clicks/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--encoder", default="offline", help="encoder name when --embeddings is not given")
    parser.add_argument("--embeddings", help="reuse an ad_embeddings_raw .npz artifact instead of encoding")
    parser.add_argument("--no-fields", action="store_true", help="ignore the source's structured ad fields")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--tune-ease", action="store_true", help="re-tune EASE's L2 on validation (6 inversions)")
    parser.add_argument("--ease-l2", type=json.loads, default={}, help='per-seed L2 override, JSON {"0": 200}')
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--als-factors", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--als-regularization", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--als-alpha", type=float, nargs="+", default=[10.0, 40.0])
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 5.0, 10.0, 20.0, 40.0])
    parser.add_argument("--regularization", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0, 300.0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--warm-bias", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--user-regularization", type=float, nargs="*", default=[], help="besides the default")
    parser.add_argument("--json", type=Path, help="append each seed's row here (JSON lines)")
    parser.add_argument("--report", type=Path, nargs="+", help="only print the tables of these --json files' rows")
    args = parser.parse_args()
    if args.report:
        rows = [json.loads(line) for path in args.report for line in path.read_text().splitlines() if line.strip()]
        report(sorted(rows, key=lambda r: r["seed"]), args.k)
        return
    args.ease_l2 = {int(s): float(v) for s, v in args.ease_l2.items()}

    wall = time.perf_counter()
    torch.set_num_threads(1)  # as warm_start.py --jobs 2 ran (one torch thread per seed)
    source = FileSource(args.source, args.source.name)
    catalog = source.read_ads()
    clicks, _ = source.read_clicks(catalog.ad_ids)
    graph = ClickGraph.from_codes(
        clicks.user_vocab, clicks.user_codes, clicks.ad_vocab, clicks.ad_codes, clicks.weights
    )
    order = np.concatenate([graph.ad_ids, np.setdiff1d(catalog.ad_ids, graph.ad_ids)])
    catalogue = ClickGraph(graph.user_ids, order, np.zeros(graph.n_users + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.float32))  # fmt: skip
    content, fields, encoder_id, encode_seconds = load_content(args, catalogue, catalog)
    print(f"source {args.source}: {graph.n_users} users, {graph.n_ads} clicked of {len(order)} ads; encoder "
          f"{encoder_id} ({encode_seconds:.1f} s); default ad refit {asdict(AdRefitParams())}", flush=True)  # fmt: skip
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, graph, len(order), content, fields, args)
        rows.append(row)
        print(f"seed {seed} done in {row['seconds']['total']:.0f} s (wall so far {time.perf_counter() - wall:.0f} s)",
              flush=True)  # fmt: skip
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(row) + "\n")
        report(rows, args.k)
    print(f"wall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
