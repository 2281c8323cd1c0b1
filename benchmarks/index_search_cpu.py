"""CPU time per single-query index search, in-process: what one ``search(q, 10)`` costs a core,
measured with ``time.thread_time()`` so that other processes on the cores do not inflate it
(wall-clock latencies on a busy machine measure the contention instead).

Reads the ``ad_index`` of snapshots that ``serve_latency.py`` built and cached under its
``--work`` (sources ``bench-<size>-<kind>``), queries with 2,000 of the same benchmark users
(the seed of its recall sample), one OpenMP thread as the service searches.

    .venv/bin/python benchmarks/index_search_cpu.py bench-100k-hnsw bench-100k-ivf bench-1m-ivf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    import serve_latency as sl

    from adrec_assets.snapshots import SnapshotStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="benchmark snapshots, e.g. bench-1m-ivf")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "serve")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20_000)
    args = parser.parse_args()
    _, users = sl.make_users(args.users, 0)
    pick = np.random.default_rng([0, 6]).choice(len(users), min(args.queries, len(users)), replace=False)
    queries = np.concatenate([users[pick], np.ones((len(pick), 1), np.float32)], axis=1)
    print("| index | kind | nprobe | CPU p50 / p99 / mean ms | wall p50 / p99 ms |\n|---|---|---:|---|---|")
    for source in args.sources:
        index = SnapshotStore(args.work / "artifacts", source).load("ad_index").index
        index.search(queries[:1], 10, threads=1)
        cpu, wall = np.empty(len(queries)), np.empty(len(queries))
        for i in range(len(queries)):
            began_cpu, began = time.thread_time(), time.perf_counter()
            index.search(queries[i : i + 1], 10, threads=1)
            cpu[i], wall[i] = time.thread_time() - began_cpu, time.perf_counter() - began
        cpu, wall = cpu * 1e3, wall * 1e3
        print(f"| {source} | {index.kind} | {index.params.get('ivf_nprobe') or '-'} | "
              f"{np.percentile(cpu, 50):.3f} / {np.percentile(cpu, 99):.3f} / {cpu.mean():.3f} | "
              f"{np.percentile(wall, 50):.3f} / {np.percentile(wall, 99):.3f} |", flush=True)  # fmt: skip
        del index


if __name__ == "__main__":
    main()
