"""Scale benchmark: a synthetic power-law file source of any size through the real assets.

Generates ``<work>/sources/<name>/`` (ads.csv + clicks/*.parquet; users prefer one of 50
topics, ads are drawn with Zipf popularity inside and across topics), registers it as a
partition of a throw-away Dagster instance, then materializes each asset of the pipeline in
its own process, so every step gets its own wall time and peak RSS (``ru_maxrss`` of that
process, imports included). Throughputs come from the assets' metadata. Next to it, the
reference a practitioner would reach for: ``implicit``'s ALS (64 factors, 15 iterations) on
the same click matrix, in its own process (``adrec_assets.ml.als``; ``--no-als`` skips it).

    .venv/bin/python benchmarks/scale.py --users 10000 --clicks-per-user 10 --ads 10000
    .venv/bin/python benchmarks/scale.py --users 1000000 --clicks-per-user 10 --ads 100000 \\
        --user epochs=2 --projector epochs=1 --projector batch_size=1024

``--refresh 0.01`` then appends that share of new clicks (a tenth of them by new users) and
re-materializes: once on the default (warm-start) path, once with a full retrain, and prints
both beside the first full materialization. Encoding uses the content-hash cache under
``<work>/encoder_cache`` (shared by all sizes: the ads of a smaller catalogue are a prefix of a
larger one's), so it is timed on its own and the training steps stay visible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adrec_assets.snapshots import OFFLINE_ARTIFACTS as PIPELINE  # noqa: E402

N_TOPICS = 50
TOPICS = [
    "running shoes",
    "trail gear",
    "yoga mats",
    "road bikes",
    "camping tents",
    "fishing rods",
    "golf clubs",
    "ski jackets",
    "swimwear",
    "fitness trackers",
    "espresso machines",
    "cookware",
    "baking tools",
    "meal kits",
    "craft beer",
    "fine wine",
    "tea sets",
    "vegan snacks",
    "pet food",
    "dog toys",
    "cat trees",
    "aquariums",
    "garden tools",
    "house plants",
    "power drills",
    "smart lights",
    "sofas",
    "mattresses",
    "desk chairs",
    "monitors",
    "laptops",
    "gaming consoles",
    "board games",
    "headphones",
    "cameras",
    "drones",
    "kids books",
    "toys for toddlers",
    "strollers",
    "skincare",
    "perfume",
    "watches",
    "sneakers",
    "handbags",
    "city breaks",
    "beach resorts",
    "car insurance",
    "savings accounts",
    "language courses",
    "concert tickets",
]
ADJECTIVES = ["premium", "budget", "eco", "compact", "pro", "classic", "smart", "handmade", "lightweight", "family"]
HOOKS = ["sale", "new arrivals", "free delivery", "bundle deal", "limited offer", "top rated", "clearance"]


# ----------------------------------------------------------------------------- data


def ad_topic(index: np.ndarray) -> np.ndarray:
    """Topic of ad ``i`` depends on ``i`` alone, so smaller catalogues are prefixes of larger."""
    return (index * 2654435761 % 2**32) % N_TOPICS


def ad_texts(n_ads: int) -> list[str]:
    idx = np.arange(n_ads)
    topic = ad_topic(idx)
    return [
        f"{ADJECTIVES[(i // 7) % len(ADJECTIVES)]} {TOPICS[t]}: {HOOKS[(i // 3) % len(HOOKS)]} #{i}"
        for i, t in zip(idx.tolist(), topic.tolist())
    ]


def draw_clicks(
    n_users: int,
    clicks_per_user: float,
    n_ads: int,
    rng: np.random.Generator,
    user_offset: int = 0,
    user_topics: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(user index, ad index) per click. Each user has a topic; 80% of clicks go to ads of
    that topic, 20% anywhere, both with Zipf(1.0) popularity over a random ad ranking."""
    topics = ad_topic(np.arange(n_ads))
    popularity = (np.random.default_rng(12345).permutation(n_ads) + 1.0) ** -1.0  # fixed per catalogue
    by_topic = np.argsort(topics, kind="stable")
    cum_topic = np.cumsum(popularity[by_topic])
    bounds = np.searchsorted(topics[by_topic], np.arange(N_TOPICS + 1))
    start = np.concatenate([[0.0], cum_topic])[bounds[:-1]]
    end = np.concatenate([[0.0], cum_topic])[bounds[1:]]
    cum_all = np.cumsum(popularity)
    user_topic = rng.integers(N_TOPICS, size=n_users) if user_topics is None else user_topics
    counts = 1 + rng.poisson(max(clicks_per_user - 1, 0), size=n_users)
    users = np.repeat(np.arange(n_users), counts)
    n = len(users)
    in_topic = rng.random(n) < 0.8
    u = rng.random(n)
    t = user_topic[users]
    topic_pick = by_topic[np.minimum(np.searchsorted(cum_topic, start[t] + u * (end[t] - start[t])), n_ads - 1)]
    any_pick = np.minimum(np.searchsorted(cum_all, u * cum_all[-1]), n_ads - 1)
    return users + user_offset, np.where(in_topic, topic_pick, any_pick)


def write_clicks(path: Path, users: np.ndarray, ads: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def ids(prefix: str, codes: np.ndarray, width: int) -> pa.Array:
        digits = pc.utf8_lpad(pc.cast(pa.array(codes), pa.string()), width, "0")
        return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")

    table = pa.table({"user_id": ids("u", users, 8), "ad_id": ids("ad", ads, 7)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=1_000_000)
    tmp.rename(path)


def generate_source(folder: Path, n_users: int, clicks_per_user: float, n_ads: int, seed: int) -> dict:
    """Write (or reuse) the source; returns its stamp. Clicks go in files of <= 2M rows."""
    stamp = {"users": n_users, "clicks_per_user": clicks_per_user, "ads": n_ads, "seed": seed}
    stamp_file = folder / "generated.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()).get("base") == stamp:
        for appended in (folder / "clicks").glob("new-*.parquet"):
            appended.unlink()  # a previous --refresh run's clicks: the full run must not see them
        return json.loads(stamp_file.read_text())
    import shutil

    import pandas as pd

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "clicks").mkdir(parents=True)
    started = time.perf_counter()
    pd.DataFrame({"ad_id": [f"ad{i:07d}" for i in range(n_ads)], "text": ad_texts(n_ads)}).to_csv(
        folder / "ads.csv", index=False
    )
    rng = np.random.default_rng(seed)
    users, ads = draw_clicks(n_users, clicks_per_user, n_ads, rng)
    chunk = 2_000_000
    for part, begin in enumerate(range(0, len(users), chunk)):
        write_clicks(
            folder / "clicks" / f"part-{part:03d}.parquet", users[begin : begin + chunk], ads[begin : begin + chunk]
        )
    info = {"base": stamp, "n_clicks": len(users), "generate_seconds": round(time.perf_counter() - started, 1)}
    stamp_file.write_text(json.dumps(info))
    return info


def append_new_clicks(folder: Path, info: dict, share: float, seed: int, new_user_offset: int | None = None) -> int:
    """Append ``share`` x clicks as a new file: 90% by existing users, 10% by new users
    (numbered from ``new_user_offset``, default right after the source's users)."""
    base = info["base"]
    n_new = int(round(share * info["n_clicks"]))
    rng = np.random.default_rng([seed, 99])
    n_new_users = max(1, int(0.1 * n_new / max(base["clicks_per_user"], 1)))
    offset = base["users"] if new_user_offset is None else new_user_offset
    new_u, new_a = draw_clicks(n_new_users, base["clicks_per_user"], base["ads"], rng, user_offset=offset)
    n_old = max(0, n_new - len(new_u))
    old_u = rng.integers(base["users"], size=n_old)
    # existing users click within their own topic mostly: redraw with their topics
    old_topics = np.random.default_rng(base["seed"]).integers(N_TOPICS, size=base["users"])
    u2, a2 = draw_clicks(n_old, 1, base["ads"], rng, user_topics=old_topics[old_u])
    users = np.concatenate([old_u[u2], new_u])
    ads = np.concatenate([a2, new_a])
    write_clicks(folder / "clicks" / f"new-{seed:03d}.parquet", users, ads)
    return len(users)


# ----------------------------------------------------------------------------- workers


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker_materialize(asset: str, partition: str, run_config: dict) -> dict:
    """One asset, one process: the parent reads wall time, peak RSS and metadata.

    Each step is its own run here, so each publishes what it staged (unchecked: the snapshot
    is complete only after the last step) for the next process to read. The product's
    pipeline job stages every step of one run and publishes once, validated."""
    import dagster as dg

    from adrec_assets.definitions import ALL_ASSETS, default_resources
    from adrec_assets.resources import ArtifactStoreResource

    base_rss = peak_rss_gib()
    ops = {k: v for k, v in run_config.get("ops", {}).items() if k == asset}
    with dg.DagsterInstance.get() as instance:
        started = time.perf_counter()
        result = dg.materialize(
            ALL_ASSETS,
            selection=[asset],
            partition_key=partition,
            instance=instance,
            resources=default_resources(),
            run_config={"ops": ops} if ops else None,
        )
        wall = time.perf_counter() - started
    ArtifactStoreResource().store(partition).publish(result.run_id)
    (event,) = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.materialization.metadata.items() if isinstance(v.value, (int, float, str))}
    return {"asset": asset, "wall_s": wall, "peak_rss_gib": peak_rss_gib(), "import_rss_gib": base_rss, "meta": meta}


def worker_als(graph_path: str, threads: int) -> dict:
    """implicit's ALS (``adrec_assets.ml.als``, the evaluation's baseline) on the click_graph artifact."""
    from adrec_assets.artifacts import load_file
    from adrec_assets.ml.als import AlsParams, fit_als

    graph = load_file(graph_path)
    started = time.perf_counter()
    fit_als(graph, AlsParams(factors=64, iterations=15, seed=0, threads=threads))
    wall = time.perf_counter() - started
    return {
        "asset": "ALS reference (implicit, 64 f, 15 it)",
        "wall_s": wall,
        "peak_rss_gib": peak_rss_gib(),
        "meta": {"n_users": graph.n_users, "n_clicks": graph.n_clicks},
    }


def run_worker(args: list[str], env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, cwd=REPO, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"worker {args[:3]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def throughput(row: dict) -> str:
    m, asset = row["meta"], row["asset"]
    if asset == "click_graph" and "n_click_rows_read" in m:
        return f"{m['n_click_rows_read'] / row['wall_s']:,.0f} clicks/s read"
    if asset in ("user_embeddings", "projector") and m.get("train_seconds"):
        path = f" ({m['training_path']})" if "training_path" in m else ""
        return f"{m.get('pairs_trained', 0) / m['train_seconds']:,.0f} pairs/s trained, {m.get('epochs_run')} ep{path}"
    if asset == "ad_embeddings_raw":
        rate = f", {m['ads_per_second']:,.0f} ads/s encoded" if m.get("ads_per_second") else ""
        return f"{m.get('n_encoded', m.get('n_ads'))} encoded, {m.get('n_cache_hits', 0)} cached{rate}"
    if asset == "ad_projected" and "n_ads" in m:
        return f"{m['n_ads'] / row['wall_s']:,.0f} ads/s projected"
    return ""


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| step | wall s | peak RSS GiB | throughput |\n|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['asset']} | {row['wall_s']:.1f} | {row['peak_rss_gib']:.2f} | {throughput(row)} |")
    training = [r for r in rows if r["asset"] in PIPELINE and r["asset"] != "ad_embeddings_raw"]
    if training:
        print(
            f"| **all steps except encoding** | **{sum(r['wall_s'] for r in training):.1f}** | "
            f"**{max(r['peak_rss_gib'] for r in training):.2f}** | |"
        )


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` -> config dict; values are JSON (numbers, true/false), else strings."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind = sys.argv[2]
        if kind == "materialize":
            print(json.dumps(worker_materialize(sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))))
        else:
            print(json.dumps(worker_als(sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--clicks-per-user", type=float, default=10.0)
    parser.add_argument("--ads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="sources, artifacts, instance")
    parser.add_argument("--user", action="append", default=[], help="user_embeddings config key=value")
    parser.add_argument("--projector", action="append", default=[], help="projector config key=value")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-als", action="store_true")
    parser.add_argument("--refresh", type=float, default=0.0, help="share of new clicks to append, then refresh")
    parser.add_argument(
        "--refresh-full-retrain",
        action="store_true",
        help="after the refresh, also time a full retrain on the same clicks",
    )
    parser.add_argument("--json", type=Path, help="also write all figures here")
    args = parser.parse_args()

    name = f"scale_u{args.users}_c{args.clicks_per_user:g}_a{args.ads}"
    sources, artifacts, home = args.work / "sources", args.work / "artifacts" / name, args.work / "dagster_home" / name
    import shutil

    shutil.rmtree(artifacts, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").touch()
    print(f"generating {sources / name} ...", flush=True)
    info = generate_source(sources / name, args.users, args.clicks_per_user, args.ads, args.seed)
    print(f"source: {info['n_clicks']:,} click rows, {args.users:,} users, {args.ads:,} ads ({info})", flush=True)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ADREC_ARTIFACTS_DIR": str(artifacts),
        "ADREC_SOURCES_DIR": str(sources),
        "ADREC_ENCODER_CACHE_DIR": str(args.work / "encoder_cache"),
        "ADREC_ENCODER": os.environ.get("ADREC_ENCODER", "offline"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "ADREC_ID_KEY": os.environ.get("ADREC_ID_KEY", "scale-benchmark-key"),
    }
    subprocess.run(
        [sys.executable, "-m", "adrec_assets.cli", "register", name], env=env, cwd=REPO, check=True, capture_output=True
    )
    run_config = {"ops": {}}
    if args.user:
        run_config["ops"]["user_embeddings"] = {"config": parse_overrides(args.user)}
    if args.projector:
        run_config["ops"]["projector"] = {"config": parse_overrides(args.projector)}

    def pipeline(extra: dict | None = None) -> list[dict]:
        rows = []
        for asset in PIPELINE:
            config = json.loads(json.dumps(run_config))
            for op, values in (extra or {}).items():
                config["ops"].setdefault(op, {"config": {}})["config"].update(values)
            row = run_worker(["_worker", "materialize", asset, name, json.dumps(config)], env)
            print(
                f"  {asset}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB  {throughput(row)}",
                flush=True,
            )
            rows.append(row)
        return rows

    started = time.perf_counter()
    full = pipeline()
    if not args.no_als:
        from adrec_assets.snapshots import SnapshotStore

        graph_path = SnapshotStore(artifacts, name).path_of("click_graph")
        als = run_worker(["_worker", "als", str(graph_path), str(args.threads)], env)
        full.append(als)
        print(f"  ALS reference: {als['wall_s']:.1f} s, peak RSS {als['peak_rss_gib']:.2f} GiB", flush=True)
    report = {"name": name, "source": info, "threads": args.threads, "run_config": run_config, "full": full}
    print_table(f"{name}: full materialization (threads={args.threads}, config {json.dumps(run_config['ops'])})", full)
    if args.refresh > 0:
        n_new = append_new_clicks(sources / name, info, args.refresh, args.seed)
        print(f"\nappended {n_new:,} new clicks ({args.refresh:.1%}); refreshing (warm start) ...", flush=True)
        warm = pipeline()
        print_table("refresh: default path (warm start, cached encodings)", warm)

        def total(rows: list[dict]) -> float:
            return sum(r["wall_s"] for r in rows if r["asset"] in PIPELINE)

        print(
            f"\nrefresh vs first full materialization (all seven steps, encoding included): "
            f"{total(full):.1f} s -> {total(warm):.1f} s = {total(full) / total(warm):.1f}x faster"
        )
        report.update(refresh_warm=warm, n_new_clicks=n_new)
        if args.refresh_full_retrain:
            print("full retrain on the same clicks (warm_start=false) ...", flush=True)
            cold = pipeline({"user_embeddings": {"warm_start": False}, "projector": {"warm_start": False}})
            print_table("refresh: full retrain (warm_start=false, cached encodings)", cold)
            print(f"refresh vs full retrain on the same clicks: {total(cold) / total(warm):.1f}x faster")
            report.update(refresh_full=cold)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
