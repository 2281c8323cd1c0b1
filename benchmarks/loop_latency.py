"""Refresh loop latency: a click file lands -> the sensor sees it -> the pipeline run -> the
published snapshot -> the running service answers with the new ``model_version``.

A synthetic power-law file source (``benchmarks/scale.py``'s generator: ``--users``,
``--clicks-per-user``, ``--ads``) is registered in a throw-away Dagster instance under
``--work`` and materialized once by the ``adrec_pipeline`` job (the starting state; timed,
not part of the loop), and a real ``python -m adrec_assets.serve`` is started for it on a
free 127.0.0.1 port. Then, per ``--rounds``:

1. a new click file (``--new-share`` of the clicks, a tenth by new users) is written beside
   the source and renamed into its ``clicks/`` folder: the landing, t = 0;
2. the project's ``click_source_sensor`` is evaluated (``--tick-delay`` after the landing;
   the daemon ticks every 30 s, so a deployment adds 0-30 s here) until it requests a run;
3. the run request is executed as the daemon's launcher would, in a new process running
   ``adrec_pipeline`` for that partition with the request's tags (process start and
   imports, then every step from the run's event log; the ``snapshot`` step publishes);
4. ``/healthz`` is polled every 50 ms until it reports the new snapshot id (the service's
   reload poll, ``ADREC_SERVE_RELOAD_SECONDS``, the complete load and the swap), then one
   ``/v1/recommendations`` answer must carry it too.

Each stage's wall time is printed (and written with ``--json``). Everything is bounded
(``--timeout`` per round) and on loopback; only the server this script started is stopped
(its own process group), also on errors.

    .venv/bin/python benchmarks/loop_latency.py --users 20000 --clicks-per-user 10 --ads 2000
    .venv/bin/python benchmarks/loop_latency.py --users 1000000 --clicks-per-user 10 --ads 100000 \\
        --random-encodings

Default training settings, as a user runs them: with ``--user epochs=N`` the refresh's passes
(``refresh_epochs``) may equal the full schedule's, and the loop then measures a retrain.
``--random-encodings`` seeds the encoding cache instead of encoding the catalogue (hours at 1M
ads on 2 cores); the loop itself never encodes, its ads do not change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


# ----------------------------------------------------------------------------- the run, in its own process


def worker_run(partition: str, run_config: dict, tags: dict) -> dict:
    """Execute ``adrec_pipeline`` for ``partition`` in this (new) process, as a launched run."""
    began = time.time()
    import dagster as dg

    from adrec_assets.definitions import defs
    from adrec_assets.resources import ArtifactStoreResource
    from adrec_assets.snapshots import SnapshotStore

    imported = time.time()
    job = defs.get_job_def("adrec_pipeline")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            partition_key=partition, run_config=run_config or None, instance=instance, tags=tags, raise_on_error=False
        )
        steps: dict[str, dict[str, float]] = {}
        for record in instance.all_logs(result.run_id):
            event = record.dagster_event
            if event is None or not event.step_key:
                continue
            if event.event_type_value == "STEP_START":
                steps.setdefault(event.step_key, {})["start"] = record.timestamp
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                steps.setdefault(event.step_key, {})["end"] = record.timestamp
    finished = time.time()
    snapshot = SnapshotStore(ArtifactStoreResource().root(), partition).current()
    return {
        "success": result.success,
        "run_id": result.run_id,
        "process_start": began,
        "imported": imported,
        "finished": finished,
        "steps": {k: v for k, v in steps.items() if "start" in v and "end" in v},
        "snapshot": snapshot.id,
        "published_at": snapshot.published_at,
    }


def launch_run(env: dict, partition: str, run_config: dict, tags: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "_worker", partition, json.dumps(run_config), json.dumps(tags)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"run process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["success"]:
        raise RuntimeError(f"run {out['run_id']} failed:\n{proc.stderr[-4000:]}")
    return out


# ----------------------------------------------------------------------------- the sensor


class Sensor:
    """The project's ``click_source_sensor``, evaluated here with a cursor kept between ticks."""

    def __init__(self) -> None:
        import dagster as dg

        from adrec_assets.definitions import defs
        from adrec_assets.resources import ClickSourceResource

        self.dg = dg
        self.sensor = defs.get_sensor_def("click_source_sensor")
        self.resources = {"click_sources": ClickSourceResource()}
        self.cursor: str | None = None

    def tick(self, instance) -> list:
        context = self.dg.build_sensor_context(instance=instance, cursor=self.cursor, resources=self.resources)
        result = self.sensor(context)
        self.cursor = result.cursor
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or [])


# ----------------------------------------------------------------------------- helpers


def http_json(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else {}
    finally:
        conn.close()


def land_clicks(folder: Path, staging: Path, info: dict, share: float, seed: int, landed: int) -> tuple[Path, int]:
    """Write new clicks beside the source, then rename them into its ``clicks/``: they land at
    once. ``landed``: files landed before this one; each file's new users are new (numbered
    apart), also when a run starts from a snapshot that learnt earlier files."""
    import scale

    shutil.rmtree(staging, ignore_errors=True)
    (staging / "clicks").mkdir(parents=True)
    offset = info["base"]["users"] + 10_000_000 * landed
    n = scale.append_new_clicks(staging, info, share, seed, new_user_offset=offset)
    (written,) = (staging / "clicks").glob("*.parquet")
    target = folder / "clicks" / f"loop-{seed:03d}-{written.name}"
    os.replace(written, target)
    return target, n


def seed_random_encodings(name: str, seed: int) -> int:
    """Fill the encoding cache with seeded random unit vectors for every ad of source ``name``
    (keyed exactly as ``ad_embeddings_raw`` looks them up), so the starting materialization
    skips the encoder: at 1M ads it would take hours on 2 cores, and the loop re-encodes
    nothing (its ads do not change). The vectors carry no content signal: this measures time."""
    import numpy as np

    from adrec_assets.ml.encoders.base import ImageAccess
    from adrec_assets.ml.encoders.cache import content_hashes
    from adrec_assets.resources import ClickSourceResource, EncoderResource

    catalog, _ = ClickSourceResource().source(name).read_ads_with_report()
    resource = EncoderResource()
    encoder, cache = resource.get(), resource.encoding_cache()
    if cache is None:
        raise RuntimeError("--random-encodings needs the encoding cache on")
    paths = [p or None for p in catalog.image_paths]
    access = ImageAccess(catalog.image_root or None, resource.max_image_bytes)
    hashes = content_hashes(list(catalog.texts), paths, access)
    vectors = np.random.default_rng(seed).standard_normal((len(hashes), encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cache.update(encoder.encoder_id, hashes, vectors, np.array([p is not None for p in paths]))
    return len(hashes)


def fmt(seconds: float) -> str:
    return f"{seconds:8.1f} s"


# ----------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        print(json.dumps(worker_run(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--clicks-per-user", type=float, default=10.0)
    parser.add_argument("--ads", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-share", type=float, default=0.01, help="new clicks per round, share of the source's")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tick-delay", type=float, default=0.0, help="seconds from landing to the sensor's tick")
    parser.add_argument("--reload-seconds", type=float, default=2.0, help="the service's ADREC_SERVE_RELOAD_SECONDS")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound of each run (the initial one too)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--user", action="append", default=[], help="user_embeddings config key=value")
    parser.add_argument("--projector", action="append", default=[], help="projector config key=value")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "loop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--reuse-start",
        action="store_true",
        help="start from the snapshot an earlier run of the same size left under --work (skips the initial run)",
    )
    parser.add_argument(
        "--random-encodings",
        action="store_true",
        help="seed the encoding cache with random unit vectors instead of encoding the ads (timing only)",
    )
    args = parser.parse_args()

    import scale
    import serve_latency

    name = f"loop_u{args.users}_c{args.clicks_per_user:g}_a{args.ads}"
    work = args.work
    sources, artifacts, home = work / "sources", work / "artifacts", work / "dagster_home"
    from adrec_assets.snapshots import SnapshotStore

    stamp_path = work / f"{name}.start.json"
    started_with = {"seed": args.seed, "run_config": run_config_of(args), "random_encodings": args.random_encodings}
    reuse = args.reuse_start and (home / "dagster.yaml").exists() and SnapshotStore(artifacts, name).current_id()
    if reuse and (not stamp_path.exists() or json.loads(stamp_path.read_text()) != started_with):
        print("--reuse-start: the earlier start used other settings (or left no record): starting afresh", flush=True)
        reuse = None
    if not reuse:
        for path in (artifacts / name, home):
            shutil.rmtree(path, ignore_errors=True)
        home.mkdir(parents=True)
        (home / "dagster.yaml").touch()
    (work / ".gitignore").write_text("*\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ADREC_ARTIFACTS_DIR": str(artifacts),
        "ADREC_SOURCES_DIR": str(sources),
        # random vectors never share a cache with real encodings (a later run would take them as hits)
        "ADREC_ENCODER_CACHE_DIR": str(work / ("encoder_cache_random" if args.random_encodings else "encoder_cache")),
        "ADREC_ENCODER": os.environ.get("ADREC_ENCODER", "offline"),
        "ADREC_ID_KEY": serve_latency.BENCH_KEY,  # the key the service is started with
        "ADREC_ONLINE_STORE": str(work / "online" / f"{name}.sqlite3"),
        "ADREC_SERVE_RELOAD_SECONDS": str(args.reload_seconds),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    env.pop("ADREC_API_TOKEN", None)  # loopback only
    os.environ.update(env)  # the sensor and the instance in this process read the same settings
    for path in (work / "online").glob(f"{name}.sqlite3*"):
        path.unlink()
    (work / "online").mkdir(parents=True, exist_ok=True)

    print(f"loop_latency: generating {sources / name} ...", flush=True)
    landed_before = sorted((sources / name / "clicks").glob("loop-*.parquet"))
    for leftover in [] if reuse else landed_before:
        leftover.unlink()  # an earlier run's landed files (kept with --reuse-start: its snapshot learnt them)
    args.first_round = len(landed_before) if reuse else 0  # new files, never one the snapshot has seen
    info = scale.generate_source(sources / name, args.users, args.clicks_per_user, args.ads, args.seed)
    print(f"  {info['n_clicks']:,} clicks, {args.users:,} users, {args.ads:,} ads", flush=True)
    run_config = run_config_of(args)
    if args.random_encodings:
        began = time.time()
        n = seed_random_encodings(name, args.seed)
        print(f"  encoding cache seeded with {n:,} random unit vectors in {time.time() - began:.1f} s", flush=True)

    import dagster as dg

    from adrec_assets.partitions import click_source_partitions

    report: dict = {"name": name, "source": info, "threads": args.threads, "load_before": os.getloadavg(),
                    "random_encodings": args.random_encodings, "run_config": run_config}  # fmt: skip
    server = None
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(click_source_partitions.name, [name])
        sensor = Sensor()
        first = [r for r in sensor.tick(instance) if r.partition_key == name]  # the cursor now knows these files
        if reuse:
            report["initial"] = {"wall_s": 0.0, "snapshot": reuse}
            initial = {"snapshot": reuse}
            print(f"starting from {reuse}, published by an earlier run (--reuse-start)", flush=True)
        else:
            print(f"initial run for {name} (the starting state, not part of the loop) ...", flush=True)
            started = time.time()
            initial = launch_run(env, name, run_config, dict(first[0].tags) if first else {}, args.timeout)
            report["initial"] = {"wall_s": time.time() - started, "snapshot": initial["snapshot"]}
            stamp_path.write_text(json.dumps(started_with))
            print(f"  published {initial['snapshot']} in {time.time() - started:.1f} s", flush=True)
        try:
            server = serve_latency.Server(work, name, "faiss", "warning")
            ready_s, health = server.wait_ready(args.timeout)
            if health.get("model_version") != initial["snapshot"]:
                raise RuntimeError(f"service serves {health.get('model_version')}, expected {initial['snapshot']}")
            print(f"service on 127.0.0.1:{server.port} ready in {ready_s:.1f} s ({health['index_kind']}, "
                  f"{health['n_ads']:,} ads, {health['model_version']})", flush=True)  # fmt: skip
            rounds = []
            for round_no in range(args.rounds):
                rounds.append(one_round(args, env, instance, sensor, server, sources / name, work, info, round_no))
            report["rounds"] = rounds
        finally:
            if server is not None:
                server.stop()
    report["load_after"] = os.getloadavg()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def one_round(args, env, instance, sensor, server, folder: Path, work: Path, info: dict, round_no: int) -> dict:
    seed = args.seed + 1 + args.first_round + round_no
    path, n_new = land_clicks(folder, work / "staging", info, args.new_share, seed, args.first_round + round_no)
    landed = time.time()
    print(f"\nround {round_no + 1}: {n_new:,} new clicks landed as {path.name}", flush=True)
    time.sleep(args.tick_delay)
    requests, ticks, tick_s = [], 0, 0.0
    deadline = landed + args.timeout
    while not requests:
        began = time.time()
        requests = [r for r in sensor.tick(instance) if r.partition_key == folder.name]
        tick_s += time.time() - began
        ticks += 1
        if not requests:
            if time.time() > deadline:
                raise RuntimeError("the sensor never requested a run for the landed file")
            time.sleep(1.0)
    detected = time.time()
    run = launch_run(env, folder.name, run_config_of(args), dict(requests[0].tags), args.timeout)
    run_done = time.time()
    version, served, answered = run["snapshot"], None, None
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status, health = http_json(server.port, "/healthz", 5.0)
            if status == 200 and health.get("model_version") == version:
                served = time.time()
                break
        time.sleep(0.05)
    if served is None:
        raise RuntimeError(f"the service never served {version}:\n{server.log_tail()}")
    user = urllib.parse.quote("user-0000001")
    status, answer = http_json(server.port, f"/v1/recommendations?user_id={user}&k=10")
    answered = time.time()
    if status != 200 or answer.get("model_version") != version:
        raise RuntimeError(f"a recommendation after the swap carried {answer.get('model_version')} ({status})")
    steps = {k: v["end"] - v["start"] for k, v in sorted(run["steps"].items(), key=lambda kv: kv[1]["start"])}
    stages = {
        "landing -> sensor requests a run": detected - landed,
        "run process start + imports": run["imported"] - run["process_start"],
        "run: pipeline steps": run["finished"] - run["imported"],
        "run process start -> published": run["published_at"] - run["process_start"],
        "published -> service answers": answered - run["published_at"],
        "landing -> service answers (total)": answered - landed,
    }
    print(f"  sensor: {ticks} tick(s), {tick_s:.2f} s evaluating; run {run['run_id'][:8]} -> {version}", flush=True)
    for label, seconds in stages.items():
        print(f"  {label:<40} {fmt(seconds)}", flush=True)
    return {"n_new_clicks": n_new, "snapshot": version, "stages": stages, "steps": steps, "sensor_ticks": ticks,
            "sensor_eval_s": tick_s, "run_to_done_s": run_done - detected}  # fmt: skip


def run_config_of(args) -> dict:
    import scale

    config: dict = {"ops": {}}
    if args.user:
        config["ops"]["user_embeddings"] = {"config": scale.parse_overrides(args.user)}
    if args.projector:
        config["ops"]["projector"] = {"config": scale.parse_overrides(args.projector)}
    return config


def print_report(report: dict) -> None:
    load = report["load_before"]
    print(f"\n## loop_latency {report['name']}: {report['threads']} threads, load average {load[0]:.2f} before / "
          f"{report['load_after'][0]:.2f} after; initial run {report['initial']['wall_s']:.1f} s")  # fmt: skip
    for i, r in enumerate(report.get("rounds", [])):
        print(f"\nround {i + 1} ({r['n_new_clicks']:,} new clicks -> {r['snapshot']})\n")
        print("| stage | seconds |\n|---|---:|")
        for label, seconds in r["stages"].items():
            print(f"| {label} | {seconds:.1f} |")
        print("\n| run step | seconds |\n|---|---:|")
        for step, seconds in r["steps"].items():
            print(f"| {step} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
