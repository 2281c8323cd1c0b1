"""Time the ``served_model`` asset's fit (``adrec_assets.ml.served_model``) on synthetic clicks.

    .venv/bin/python benchmarks/served_model.py --users 1000000 --ads 100000 --clicks-per-user 10

Clicks per user are geometric (mean ``--clicks-per-user``, capped at 2,000), ads uniform;
user and projected-ad vectors are random unit rows. Prints each step's wall time (the user
refit, then the ad and user steps), the total, and the process's peak RSS. Figures:
``benchmarks/README.md`` (warm section).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adrec_assets.ml.params import AdRefitParams, UserRefitParams  # noqa: E402
from adrec_assets.ml.served_model import fit_served_model  # noqa: E402
from adrec_assets.ml.types import ClickGraph  # noqa: E402


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=50_000)
    parser.add_argument("--clicks-per-user", type=float, default=10.0)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=AdRefitParams().iterations, help="AdRefitParams.iterations")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    degrees = np.minimum(rng.geometric(1 / args.clicks_per_user, size=args.users), 2000)
    users = np.repeat(np.arange(args.users), degrees)
    ads = rng.integers(0, args.ads, size=len(users))
    graph = ClickGraph.from_codes(
        np.asarray([f"u{i:08d}" for i in range(args.users)]),
        users,
        np.asarray([f"a{i:08d}" for i in range(args.ads)]),
        ads,
    )
    user_vectors, ad_vectors = unit_rows(rng, graph.n_users, args.dim), unit_rows(rng, graph.n_ads, args.dim)
    bias = rng.normal(scale=0.25, size=graph.n_ads).astype(np.float32)
    stages: list[str] = []
    started = time.perf_counter()
    fit_served_model(graph, user_vectors, ad_vectors, bias, UserRefitParams(), AdRefitParams(iterations=args.iterations),
                     timing=lambda stage, seconds: stages.append(f"{stage} {seconds:.1f} s"))  # fmt: skip
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{graph.n_users:,} users, {graph.n_clicks:,} clicks, {graph.n_ads:,} ads, {args.iterations} iterations: "
          f"served model {seconds:.1f} s ({', '.join(stages)}), peak RSS {peak_gib:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
