"""Serving latency benchmark: a real ``python -m adrec_assets.serve`` process on loopback under
bounded load, per catalogue size and index backend.

For each size (default 10k, 100k and 1M ads) a fake but well-formed snapshot is built and
published with :class:`~adrec_assets.snapshots.SnapshotStore` (no pipeline, no training):
20k clustered unit user vectors keyed by real pseudonyms, ads projected near the same
clusters with a small ``score_bias``, a catalogue of short texts, an untrained projector (only
used for live ads), the global mean and the ``ad_index`` artifact, exact (``flat``), HNSW and
IVF (``nprobe`` tuned to recall 0.97 on the 200 users of the build, as the ``ad_index``
asset does), for the same ads; only the kinds the ``--backends`` need are built. Snapshots
are cached in ``--work`` (the 1M HNSW build is the slow part) and rebuilt only when their
parameters change.

Each configuration -- (a) NumPy brute force (``ADREC_SERVE_INDEX=numpy`` over the flat
snapshot), (b) FAISS flat, (c) FAISS HNSW, (d) FAISS IVF -- gets its own server process on a free
127.0.0.1 port with a fresh SQLite online store. After ``/healthz`` reports the encoder
ready: a warm-up, then bounded load (``--requests`` requests or ``--seconds``, whichever comes
first) with one client and with ``--clients`` concurrent clients (threads, one keep-alive
connection each through the lean :class:`KeepAlive` client, 80% known users and 20% new ones), client-side latency per
request, server-side latency from the ``/metrics`` histogram and the CPU the server and the
client used; recall@10 of the service's answers against exact NumPy search over
``[p_a, b_a]`` (tie-aware, as :func:`adrec_assets.online.index.recall_at_k`); then
``--add-requests`` text-only ads through ``POST /v1/ads`` (the offline encoder). At 100k ads,
``policy=thompson`` and ``policy=greedy`` requests alternate for the same users (policy
overhead). Every server is stopped by its process group, also on errors.

    .venv/bin/python benchmarks/serve_latency.py                      # 10k, 100k, 1M
    .venv/bin/python benchmarks/serve_latency.py --sizes 10k --requests 500 --seconds 5
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 128
N_CLUSTERS = 200
USER_SPREAD, AD_SPREAD = 0.7, 1.0  # noise norm around the cluster centre (cos ~ 0.82 and ~ 0.71)
BIAS_STD = 0.05
KNOWN_SHARE = 0.8
BENCH_KEY = "serve-latency-benchmark-key-0123456789"
DATA_VERSION = 1  # bump when the generated data changes, so cached snapshots are rebuilt
TOPICS = ["running shoes", "espresso machines", "city breaks", "board games", "house plants", "headphones",
          "yoga mats", "car insurance", "skincare", "road bikes"]  # fmt: skip
HOOKS = ["sale", "new arrivals", "free delivery", "bundle deal", "limited offer", "top rated"]
BACKENDS = ("numpy", "flat", "hnsw", "ivf")  # numpy serves the flat snapshot through NumpyIndex
IVF_RECALL_TARGET = 0.97  # as the ad_index asset's default: nprobe is the smallest reaching it
POLICY_SIZE = 100_000
FRESH_ADS = 1_000  # live ads with random effects in the in-process policy check


# ----------------------------------------------------------------------------- data


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 10000, 10k or 1m")
    return int(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()]


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def centres(seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng([seed, 1]).standard_normal((N_CLUSTERS, DIM)))


def around(
    centre_rows: np.ndarray, n: int, spread: float, rng: np.random.Generator, chunk: int = 200_000
) -> np.ndarray:
    """``n`` unit vectors, each near a random cluster centre (noise of norm ~``spread``)."""
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(spread / np.sqrt(DIM))
        out[start : start + m] = unit_rows(centre_rows[rng.integers(N_CLUSTERS, size=m)] + noise)
    return out


def user_ids(n_users: int) -> list[str]:
    """The raw ids clients send for the snapshot's known users (pseudonymized by the service)."""
    return [f"user-{i:07d}" for i in range(n_users)]


def make_users(n_users: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Raw user ids and their vectors."""
    return user_ids(n_users), around(centres(seed), n_users, USER_SPREAD, np.random.default_rng([seed, 2]))


def make_ads(n_ads: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 3, n_ads])
    vectors = around(centres(seed), n_ads, AD_SPREAD, rng)
    bias = (BIAS_STD * rng.standard_normal(n_ads)).astype(np.float32)
    return [f"ad{i:07d}" for i in range(n_ads)], vectors, bias


def ad_text(i: int) -> str:
    return f"{TOPICS[i % len(TOPICS)]}: {HOOKS[(i // 7) % len(HOOKS)]} #{i}"


def source_name(n_ads: int, kind: str) -> str:
    return f"bench-{size_label(n_ads).lower()}-{kind}"


@dataclass
class Built:
    """A published benchmark snapshot and what building it cost."""

    source: str
    kind: str
    n_ads: int
    build_seconds: float
    index_bytes: int
    params: dict[str, int]


def build_snapshots(work: Path, n_ads: int, args: argparse.Namespace) -> dict[str, Built]:
    """The flat and HNSW snapshots of one size: reused when cached with the same parameters."""
    import faiss
    import torch

    from adrec_assets.ml.encoders.offline import OfflineEncoder
    from adrec_assets.ml.models import Projector, TrainedProjector
    from adrec_assets.ml.types import (
        FULL_RETRAIN,
        AdCatalog,
        GlobalMean,
        TrainingProvenance,
        UserEmbeddings,
        vectors_fingerprint,
    )
    from adrec_assets.online.index import AdIndex, IndexedAds, recall_at_k
    from adrec_assets.privacy import key_fingerprint, pseudonymize
    from adrec_assets.snapshots import SnapshotStore, check_consistency

    artifacts = work / "artifacts"
    wanted = {"data_version": DATA_VERSION, "n_ads": n_ads, "n_users": args.users, "seed": args.seed, "dim": DIM,
              "clusters": N_CLUSTERS, "snapshot_layout": 2}  # 2: users published as served_users  # fmt: skip
    kinds = {"flat": {"exact_max_ads": n_ads},
             "hnsw": {"exact_max_ads": 0, "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                      "ef_search": args.ef_search},
             "ivf": {"exact_max_ads": 0, "ann": "ivf", "ivf_nlist": args.ivf_nlist,
                     "ivf_train_per_list": args.ivf_train_per_list}}  # fmt: skip
    wanted_kinds = {"flat" if b == "numpy" else b for b in args.backends}  # never an unrequested (slow) build
    kinds = {kind: params for kind, params in kinds.items() if kind in wanted_kinds}
    out: dict[str, Built] = {}
    todo = []
    for kind, params in kinds.items():
        source = source_name(n_ads, kind)
        stamp_path = artifacts / source / "bench.json"
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        if (
            stamp.get("data") == wanted
            and stamp.get("params") == params
            and SnapshotStore(artifacts, source).current_id()
        ):
            out[kind] = Built(source, kind, n_ads, stamp["build_seconds"], stamp["index_bytes"], params)
        else:
            todo.append((kind, params))
    if not todo:
        return out

    key = BENCH_KEY.encode()
    raw_users, user_vectors = make_users(args.users, args.seed)
    pseudonyms = [pseudonymize(u, key) for u in raw_users]
    ad_ids, ad_vectors, ad_bias = make_ads(n_ads, args.seed)
    encoder_id = OfflineEncoder.encoder_id
    users = UserEmbeddings(np.asarray(pseudonyms), user_vectors, f"users:{vectors_fingerprint(user_vectors)}",
                           np.zeros(len(pseudonyms), dtype=bool),
                           TrainingProvenance({}, "serve-latency-benchmark", FULL_RETRAIN))  # fmt: skip
    mean = user_vectors.astype(np.float64).mean(axis=0)
    prior = GlobalMean(
        (mean / np.linalg.norm(mean)).astype(np.float32), len(pseudonyms), float(np.linalg.norm(mean)), users.space
    )
    catalog = AdCatalog(np.asarray(ad_ids), np.asarray([ad_text(i) for i in range(n_ads)]), np.full(n_ads, ""), "")
    torch.manual_seed(args.seed)
    projector = TrainedProjector.trained(
        Projector(768, DIM), encoder_id, users.space, "serve-latency-benchmark", FULL_RETRAIN
    )
    sample = user_vectors[np.random.default_rng([args.seed, 4]).choice(len(user_vectors), 200, replace=False)]
    queries = np.concatenate([sample, np.ones((len(sample), 1), np.float32)], axis=1)
    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(args.build_threads)
    try:
        for kind, params in todo:
            source = source_name(n_ads, kind)
            print(f"  building {source} ({kind}, {params}) ...", flush=True)
            shutil.rmtree(artifacts / source, ignore_errors=True)
            started = time.perf_counter()
            index = AdIndex.build(ad_ids, ad_vectors, ad_bias, seed=args.seed, **params)
            tuning = ""
            if index.kind == "ivf":  # as the ad_index asset: nprobe from these 200 users, judged on others
                trained_s = time.perf_counter() - started
                nprobe, tune_recall = index.tune_nprobe(queries, 10, IVF_RECALL_TARGET, threads=args.build_threads)
                tuning = (f" (train + add {trained_s:.1f} s, nprobe {nprobe} of {index.params['ivf_nlist']} tuned in "
                          f"{time.perf_counter() - started - trained_s:.1f} s to recall {tune_recall:.4f})")  # fmt: skip
            build_seconds = time.perf_counter() - started
            recall = recall_at_k(index, queries, 10, threads=args.build_threads)
            store = SnapshotStore(artifacts, source)
            run_id = "serve-latency-build"
            for asset, obj in (("raw_ads", catalog), ("served_users", users), ("global_mean", prior),
                               ("projector", projector), ("ad_index", IndexedAds(index, users.space, encoder_id, recall))):  # fmt: skip
                store.stage(run_id, asset, obj)
            del index

            def validate(load: Any, assets: list[str]) -> dict[str, str]:
                info = check_consistency(
                    load, assets, ("raw_ads", "served_users", "global_mean", "projector", "ad_index")
                )
                return {**info, "encoder_id": encoder_id, "key_fingerprint": key_fingerprint(key)}

            snapshot = store.publish(run_id, validate)
            index_bytes = store.path_of("ad_index", snapshot).stat().st_size
            stamp = {"data": wanted, "params": params, "build_seconds": round(build_seconds, 2), "index_bytes": index_bytes,
                     "recall_at_10_build": recall, "snapshot": snapshot.id}  # fmt: skip
            (artifacts / source / "bench.json").write_text(json.dumps(stamp, indent=1))
            print(f"  {source}: built in {build_seconds:.1f} s{tuning}, {index_bytes / 2**20:.0f} MB, recall@10 "
                  f"{recall:.4f} (in-process, the 200 users of the build)", flush=True)  # fmt: skip
            out[kind] = Built(source, kind, n_ads, build_seconds, index_bytes, params)
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return out


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m adrec_assets.serve`` in its own process group; :meth:`stop` ends the group."""

    def __init__(self, work: Path, source: str, backend: str, log_level: str, store_dir: Path | None = None,
                 workers: int = 1, store_url: str | None = None) -> None:  # fmt: skip
        self.source, self.port, self.workers = source, free_port(), workers
        store = (store_dir or work / "online") / f"{source}-{backend}.sqlite3"
        for path in store.parent.glob(f"{store.name}*"):
            path.unlink()
        store.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "logs" / f"{source}-{backend}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "ADREC_ARTIFACTS_DIR": str(work / "artifacts"),
            "ADREC_SOURCES_DIR": str(work / "sources"),
            "ADREC_ONLINE_STORE": store_url or str(store),
            "ADREC_ID_KEY": BENCH_KEY,
            "ADREC_SERVE_INDEX": "numpy" if backend == "numpy" else "faiss",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("ADREC_API_TOKEN", None)  # loopback only: write endpoints without a token
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adrec_assets.serve", "--source", source, "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", log_level, "--workers", str(workers)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> tuple[float, dict]:
        """Seconds until ``/healthz`` answers with the encoder loaded (or failed to load)."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server for {self.source} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                status, body = get(self.port, "/healthz")
                health = json.loads(body)
                if status == 200 and health.get("encoder") != "the encoder is loading":
                    if self.workers == 1 or self._all_workers_ready():
                        return time.perf_counter() - self.started, health
            time.sleep(0.25)
        raise RuntimeError(
            f"server for {self.source} not ready after {timeout:.0f} s (last health {health}):\n{self.log_tail()}"
        )

    def _all_workers_ready(self, answers: int = 40) -> bool:
        """Several workers share the port and the kernel spreads new connections over them:
        ready when ``answers`` fresh connections in a row find a worker with its encoder."""
        for _ in range(answers):
            status, body = get(self.port, "/healthz")
            if status != 200 or json.loads(body).get("encoder") == "the encoder is loading":
                return False
        return True

    def _group(self) -> list[int]:
        """The server's processes: the uvicorn supervisor and its workers (one process group)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == self.pid:
                    pids.append(int(stat.parent.name))
        return pids or [self.pid]

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def rss_gib(self) -> float:
        """Resident memory of the server's processes now (summed over workers)."""
        total = 0
        for pid in self._group():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 2**20 if total else float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's processes (all threads, all workers), from /proc."""
        ticks = 0
        for pid in self._group():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def running(work: Path, source: str, backend: str, log_level: str, store_dir: Path | None,
            workers: int = 1, store_url: str | None = None) -> Iterator[Server]:  # fmt: skip
    server = Server(work, source, backend, log_level, store_dir, workers, store_url)
    try:
        yield server
    finally:
        server.stop()


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------- load


@dataclass
class Histogram:
    """The ``adrec_request_seconds`` series of one endpoint: cumulative buckets, sum, count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def __sub__(self, other: Histogram) -> Histogram:
        return Histogram({le: v - other.buckets.get(le, 0.0) for le, v in self.buckets.items()},
                         self.total - other.total, self.count - other.count)  # fmt: skip

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket (Prometheus' ``histogram_quantile``), seconds."""
        if self.count <= 0:
            return float("nan")
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            if self.buckets[le] >= rank:
                if np.isinf(le):
                    return lower
                share = (rank - below) / max(self.buckets[le] - below, 1e-12)
                return lower + (le - lower) * share
            lower, below = le, self.buckets[le]
        return lower


def server_histogram(server: Server, endpoint: str) -> Histogram:
    """The server's histogram now; empty with several workers (each answers /metrics with its
    own series, so differences between two scrapes would mix workers)."""
    if server.workers > 1:
        return Histogram()
    _, body = get(server.port, "/metrics")
    hist = Histogram()
    label = f'endpoint="{endpoint}"'
    for line in body.decode().splitlines():
        if label not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("adrec_request_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', name).group(1)  # type: ignore[union-attr]
            hist.buckets[float(le)] = float(value)
        elif name.startswith("adrec_request_seconds_sum"):
            hist.total = float(value)
        elif name.startswith("adrec_request_seconds_count"):
            hist.count = float(value)
    return hist


@dataclass
class Phase:
    """One bounded load phase: client latencies and what the server saw meanwhile."""

    latencies: np.ndarray  # seconds, client-side, successful requests in request order
    indices: np.ndarray  # the request number of each latency
    wall: float
    errors: int
    server: Histogram
    server_cores: float
    client_cores: float
    load: tuple[float, float, float]
    bodies: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def qps(self) -> float:
        return len(self.latencies) / self.wall if self.wall > 0 else float("nan")

    def ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if len(self.latencies) else float("nan")


class KeepAlive:
    """One keep-alive HTTP/1.1 connection that writes pre-built requests and reads
    ``Content-Length`` responses off the socket.

    Why not ``http.client``: the load generator shares the two cores with the server, and
    ``http.client`` spends ~170 µs of CPU per request on header objects and buffered reads;
    this spends a fraction of that, so more of the machine measures the service.
    """

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode("ascii") + b"\r\n" + (body or b""))
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        header, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        status = int(header[9:12])
        match = re.search(r"(?im)^content-length:\s*(\d+)", header)
        if match is None:
            raise RuntimeError(f"response without Content-Length to {method} {path}: {header[:200]!r}")
        length = int(match.group(1))
        while len(self.buffer) < length:
            self._fill()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def drive(server: Server, paths: Sequence[str], clients: int, max_requests: int, seconds: float,
          keep_bodies: bool = False, method: str = "GET", bodies: Sequence[bytes] | None = None,
          endpoint: str = "/v1/recommendations") -> Phase:  # fmt: skip
    """``clients`` threads, one keep-alive connection each, share ``paths[:max_requests]`` until
    done or ``seconds`` passed; request i goes to ``paths[i % len(paths)]``."""
    counter = itertools.count()
    deadline = time.perf_counter() + seconds
    results: list[list[tuple[int, float]]] = [[] for _ in range(clients)]
    errors = [0] * clients
    kept: list[tuple[int, bytes]] = []
    failures: list[BaseException] = []
    start_gate = threading.Barrier(clients + 1)

    def client(slot: int) -> None:
        conn = KeepAlive(server.port)
        try:
            start_gate.wait(timeout=60)
            while True:
                i = next(counter)
                if i >= max_requests or time.perf_counter() >= deadline:
                    return
                path = paths[i % len(paths)]
                body = bodies[i % len(bodies)] if bodies is not None else None
                began = time.perf_counter()
                status, data = conn.request(method, path, body)
                elapsed = time.perf_counter() - began
                if status in (200, 201):
                    results[slot].append((i, elapsed))
                    if keep_bodies:
                        kept.append((i, data))
                else:
                    errors[slot] += 1
                    if errors[slot] == 1:
                        print(f"    HTTP {status} for {path}: {data[:300]!r}", flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failures.append(exc)
            start_gate.abort()  # the others (and the caller) stop waiting for this client
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    before_hist = server_histogram(server, endpoint)
    before_server, before_client = server.cpu_seconds(), _own_cpu()
    with contextlib.suppress(threading.BrokenBarrierError):
        start_gate.wait(timeout=60)
    began = time.perf_counter()
    deadline = began + seconds
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    server_cores = (server.cpu_seconds() - before_server) / wall
    client_cores = (_own_cpu() - before_client) / wall
    hist = server_histogram(server, endpoint) - before_hist
    if failures:
        raise RuntimeError(f"a client failed: {failures[0]!r}\n{server.log_tail()}") from failures[0]
    done = sorted(x for r in results for x in r)
    return Phase(np.asarray([t for _, t in done]), np.asarray([i for i, _ in done], dtype=np.int64), wall, sum(errors), hist,
                 server_cores, client_cores, os.getloadavg(), sorted(kept))  # fmt: skip


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def recommendation_paths(raw_users: list[str], n: int, seed: int, tag: str, policy: str | None = None) -> list[str]:
    """``n`` request paths: a known user (random, with repeats) with probability KNOWN_SHARE,
    else a user the snapshot has never seen (unique id, served with the global mean)."""
    rng = np.random.default_rng([seed, 5, sum(map(ord, tag))])
    known = rng.random(n) < KNOWN_SHARE
    picks = rng.integers(len(raw_users), size=n)
    extra = f"&policy={policy}" if policy else ""
    return [f"/v1/recommendations?user_id={raw_users[p] if k else f'new-{tag}-{i}'}&k=10{extra}"
            for i, (k, p) in enumerate(zip(known.tolist(), picks.tolist()))]  # fmt: skip


# ----------------------------------------------------------------------------- recall


@dataclass
class ExactReference:
    """Exact top-10 thresholds for the recall sample (same for every backend of one size)."""

    raw_users: list[str]
    queries: np.ndarray  # (m, d+1) float32 [u, 1]; the last row is the global mean (new users)
    threshold: np.ndarray  # (m,) float64: the 10th best exact score
    rows: np.ndarray  # (n_ads, d+1) float32 [p_a, b_a]


def exact_reference(n_ads: int, args: argparse.Namespace) -> ExactReference:
    from adrec_assets.online.index import exact_top_k

    raw_users, user_vectors = make_users(args.users, args.seed)
    _, ad_vectors, ad_bias = make_ads(n_ads, args.seed)
    rows = np.concatenate([ad_vectors, ad_bias[:, None]], axis=1)
    del ad_vectors
    pick = np.random.default_rng([args.seed, 6]).choice(
        len(raw_users), min(args.recall_users, len(raw_users)), replace=False
    )
    mean = user_vectors.astype(np.float64).mean(axis=0)
    vectors = np.vstack([user_vectors[pick], (mean / np.linalg.norm(mean)).astype(np.float32)])
    queries = np.concatenate([vectors, np.ones((len(vectors), 1), np.float32)], axis=1)
    scores, _ = exact_top_k(rows, queries, 10)
    return ExactReference(
        [raw_users[p] for p in pick] + ["never-seen-user"], queries, scores[:, 9].astype(np.float64), rows
    )


def service_recall(server: Server, ref: ExactReference) -> tuple[float, float]:
    """(mean recall@10 over the sampled known users, recall@10 of a new user's slate)."""
    paths = [f"/v1/recommendations?user_id={urllib.parse.quote(u)}&k=10" for u in ref.raw_users]
    phase = drive(server, paths, 1, len(paths), 600.0, keep_bodies=True)
    if phase.errors or len(phase.bodies) != len(paths):
        raise RuntimeError(
            f"recall requests failed: {phase.errors} errors, {len(phase.bodies)} of {len(paths)} answered"
        )
    hits = []
    for i, body in phase.bodies:
        answer = json.loads(body)
        expected = "new" if i == len(paths) - 1 else "known"
        if answer["user_status"] != expected:
            raise RuntimeError(f"user {ref.raw_users[i]} served as {answer['user_status']}, expected {expected}")
        rows = np.asarray([int(item["ad_id"][2:]) for item in answer["items"]], dtype=np.int64)
        true = ref.rows[rows].astype(np.float64) @ ref.queries[i].astype(np.float64)
        tol = 1e-5 * max(1.0, abs(ref.threshold[i]))
        hits.append(min(10, int((true >= ref.threshold[i] - tol).sum())) / 10)
    return float(np.mean(hits[:-1])), float(hits[-1])


def in_process_search_ms(index: Any, queries: np.ndarray, seconds: float) -> tuple[float, float]:
    """p50 / p99 of single-query ``index.search(q, 10)`` in this process (no HTTP, no service)."""
    index.search(queries[:1], 10)
    times, deadline = [], time.perf_counter() + seconds
    for i in itertools.cycle(range(len(queries))):
        if time.perf_counter() >= deadline or len(times) >= 2000:
            break
        began = time.perf_counter()
        index.search(queries[i : i + 1], 10)
        times.append(time.perf_counter() - began)
    arr = np.asarray(times) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def in_process_policy_ms(index: Any, users: np.ndarray, seconds: float) -> dict[str, np.ndarray]:
    """Seconds per ``policy.recommend(user, index, 10, rng)`` for greedy, thompson (prior
    posterior), thompson with ``FRESH_ADS`` fresh ads carrying random effects (their exact
    scan beside the index search) and thompson drawing the user's own vector from a rank-16
    posterior (``ADREC_SERVE_USER_EXPLORATION`` > 0; the draw's spread computed per request,
    as the service does), alternating for the same users on one BLAS thread."""
    from threadpoolctl import ThreadpoolController

    from adrec_assets.online.fresh_ads import FreshAdEffects
    from adrec_assets.online.policy import make_policy
    from adrec_assets.online.posterior import LaplaceLogisticPosterior
    from adrec_assets.online.user_posterior import UserPrior, draw_spread, prior_belief

    posterior = LaplaceLogisticPosterior.prior(DIM)
    fresh = FreshAdEffects(DIM)
    slots = np.sort(np.random.default_rng(0).choice(index.live_slots(), size=FRESH_ADS, replace=False))
    fresh.register([f"fresh-{s}" for s in slots.tolist()], slots, index.vectors(slots))
    policies: dict[str, Any] = {"greedy": make_policy("greedy"), "thompson": make_policy("thompson", posterior=posterior),
                "thompson_fresh": make_policy("thompson", posterior=posterior, fresh=fresh)}  # fmt: skip
    prior = UserPrior.from_users(users)

    def user_draw(user: np.ndarray) -> Any:  # what the service builds per request
        spread = draw_spread(prior_belief(user.astype(np.float64), prior), prior)
        return make_policy("thompson", posterior=posterior, user_spread=spread)

    policies["thompson_user"] = user_draw
    times: dict[str, list[float]] = {name: [] for name in policies}
    deadline = time.perf_counter() + seconds
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        for i in itertools.cycle(range(len(users))):
            if time.perf_counter() >= deadline or len(times["greedy"]) >= 2000:
                break
            for name, policy in policies.items():
                rng = np.random.default_rng([i, 7])
                began = time.perf_counter()
                (policy(users[i]) if callable(policy) else policy).recommend(users[i], index, 10, rng)
                times[name].append(time.perf_counter() - began)
    return {name: np.asarray(values[1:]) for name, values in times.items()}  # the first call warms up


# ----------------------------------------------------------------------------- one configuration


@dataclass
class Result:
    n_ads: int
    backend: str
    kind: str
    build_s: float
    index_mb: float
    start_s: float = float("nan")
    rss_gib: float = float("nan")
    search_ms: tuple[float, float] = (float("nan"), float("nan"))
    one: Phase | None = None
    many: Phase | None = None
    recall: float = float("nan")
    recall_new: float = float("nan")
    add: Phase | None = None
    add_first_ms: float = float("nan")
    policy: dict[str, np.ndarray] = field(default_factory=dict)
    policy_in_process: dict[str, np.ndarray] = field(default_factory=dict)


def measure(
    work: Path, built: Built, backend: str, ref: ExactReference, result: Result, args: argparse.Namespace
) -> None:
    label = f"{size_label(built.n_ads)} {backend}"
    with running(work, built.source, backend, args.log_level, args.store_dir, args.workers, args.store_url) as server:
        result.start_s, health = server.wait_ready(args.start_timeout)
        result.rss_gib = server.rss_gib()
        print(f"  [{label}] ready in {result.start_s:.1f} s (index {health['index_kind']}, {health['n_ads']:,} ads, "
              f"encoder: {health['encoder']}, RSS {result.rss_gib:.2f} GiB); load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        raw_users = user_ids(args.users)
        warm = recommendation_paths(raw_users, args.warmup, args.seed, "warm")
        drive(server, warm, args.clients, args.warmup, args.warmup_seconds)
        result.one = drive(
            server, recommendation_paths(raw_users, args.requests, args.seed, "one"), 1, args.requests, args.seconds
        )
        _print_phase(label, "1 client", result.one)
        many = recommendation_paths(raw_users, args.requests, args.seed, "many")
        result.many = drive(server, many, args.clients, args.requests, args.seconds)
        _print_phase(label, f"{args.clients} clients", result.many)
        result.recall, result.recall_new = service_recall(server, ref)
        print(f"  [{label}] recall@10 {result.recall:.4f} over {len(ref.raw_users) - 1} known users; "
              f"new user (global mean) {result.recall_new:.1f}", flush=True)  # fmt: skip
        if built.n_ads == POLICY_SIZE and backend != "numpy" and args.policy_requests > 0:
            result.policy = policy_overhead(server, raw_users, args)
        if args.add_requests > 0:
            if health["encoder"] != "ready":
                print(f"  [{label}] add-ad skipped: encoder {health['encoder']}", flush=True)
            else:
                bodies = [json.dumps({"ad_id": f"live-{backend}-{i}", "text": f"{ad_text(i)} (live {i})"}).encode()
                          for i in range(args.add_requests)]  # fmt: skip
                result.add = drive(server, ["/v1/ads"], 1, args.add_requests, args.seconds, keep_bodies=True,
                                   method="POST", bodies=bodies, endpoint="/v1/ads")  # fmt: skip
                result.add_first_ms = (
                    float(result.add.latencies[0] * 1e3) if len(result.add.latencies) else float("nan")
                )
                _print_phase(label, "add ad", result.add)


def policy_overhead(server: Server, raw_users: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Greedy and Thompson requests alternating for the same user, one client: latencies of each."""
    base = recommendation_paths(raw_users, args.policy_requests, args.seed, "policy")
    paths = [p.replace("&k=10", f"&k=10&policy={policy}") for p in base for policy in ("greedy", "thompson")]
    phase = drive(server, paths, 1, len(paths), 2 * args.seconds)
    if phase.errors:
        raise RuntimeError(f"policy requests failed: {phase.errors} errors")
    pairs = len(phase.indices) // 2
    if not np.array_equal(phase.indices[: 2 * pairs], np.arange(2 * pairs)):
        raise RuntimeError("policy requests: answers missing, pairs would not match")
    return {"greedy": phase.latencies[0 : 2 * pairs : 2], "thompson": phase.latencies[1 : 2 * pairs : 2]}


def _print_phase(label: str, what: str, phase: Phase) -> None:
    server_p50, server_p99 = phase.server.quantile(0.5) * 1e3, phase.server.quantile(0.99) * 1e3
    server_mean = phase.server.total / phase.server.count * 1e3 if phase.server.count else float("nan")
    print(f"  [{label}] {what}: {len(phase.latencies)} ok, {phase.errors} errors in {phase.wall:.1f} s -> "
          f"{phase.qps:,.0f} QPS; client p50 {phase.ms(50):.2f} / p99 {phase.ms(99):.2f} ms; server mean {server_mean:.2f}, "
          f"~p50 {server_p50:.2f} / ~p99 {server_p99:.2f} ms; CPU server {phase.server_cores:.2f} + client "
          f"{phase.client_cores:.2f} cores; load {phase.load[0]:.2f}", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- report


def print_report(results: list[Result], args: argparse.Namespace, wall: float, load_before: tuple[float, ...]) -> None:
    c = args.clients
    print(
        f"\n## serve_latency: {os.cpu_count()} cores, load average {load_before[0]:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after; --requests {args.requests} --seconds {args.seconds:g} --workers {args.workers}; wall {wall:.0f} s\n"
    )
    print(
        f"| ads | backend | kind | build s | index MB | p50 ms (1) | p99 ms (1) | QPS (1) | p99 ms ({c}) | QPS ({c}) | recall@10 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r.one is None or r.many is None:
            continue
        print(
            f"| {size_label(r.n_ads)} | {r.backend} | {r.kind} | {r.build_s:.1f} | {r.index_mb:.0f} | {r.one.ms(50):.2f} | "
            f"{r.one.ms(99):.2f} | {r.one.qps:,.0f} | {r.many.ms(99):.2f} | {r.many.qps:,.0f} | {r.recall:.4f} |"
        )
    print(
        f"\nDiagnostics: in-process `search(q, 10)` alone; server-side latency from the /metrics histogram "
        f"(mean exact, quantiles interpolated in buckets); CPU cores used by server and client during the {c}-client phase.\n"
    )
    print(
        f"| ads | backend | start s | RSS GiB | search p50 / p99 ms | server mean / ~p99 ms (1) | server mean / ~p99 ms ({c}) "
        f"| CPU server + client ({c}) | requests (1 / {c}) | errors | load (1 / {c}) |"
    )
    print("|---|---|---:|---:|---|---|---|---|---|---:|---|")
    for r in results:
        if r.one is None or r.many is None:
            continue
        print(
            f"| {size_label(r.n_ads)} | {r.backend} | {r.start_s:.1f} | {r.rss_gib:.2f} | {r.search_ms[0]:.2f} / {r.search_ms[1]:.2f} | "
            f"{_server(r.one)} | {_server(r.many)} | {r.many.server_cores:.2f} + {r.many.client_cores:.2f} | "
            f"{len(r.one.latencies)} / {len(r.many.latencies)} | {r.one.errors + r.many.errors} | "
            f"{r.one.load[0]:.2f} / {r.many.load[0]:.2f} |"
        )
    adds = [r for r in results if r.add is not None and len(r.add.latencies)]
    if adds:
        print("\nAdding a text-only ad (POST /v1/ads, offline encoder, one client):\n")
        print("| ads | backend | requests | p50 ms | p99 ms | max ms | first ms |\n|---|---|---:|---:|---:|---:|---:|")
        for r in adds:
            assert r.add is not None
            print(
                f"| {size_label(r.n_ads)} | {r.backend} | {len(r.add.latencies)} | {r.add.ms(50):.1f} | {r.add.ms(99):.1f} | "
                f"{r.add.latencies.max() * 1e3:.1f} | {r.add_first_ms:.1f} |"
            )
    policy = [(r, where, timings) for r in results for where, timings in (("HTTP, one client", r.policy),
              ("in-process policy.recommend", r.policy_in_process)) if timings]  # fmt: skip
    if policy:
        print(
            "\nPolicy overhead: greedy and thompson alternating for the same users (HTTP: whole requests; "
            "in-process: the policy's recommend alone, index search included):\n"
        )
        print(
            "| ads | backend | measured | pairs | greedy p50 / p99 ms | thompson p50 / p99 ms | difference p50 / p99 ms "
            "| median paired difference ms |\n|---|---|---|---:|---|---|---|---:|"
        )
        for r, where, timings in policy:
            for variant in ("thompson", "thompson_fresh", "thompson_user"):
                if variant not in timings:
                    continue
                g, t = timings["greedy"] * 1e3, timings[variant] * 1e3
                g50, g99, t50, t99 = (
                    np.percentile(g, 50),
                    np.percentile(g, 99),
                    np.percentile(t, 50),
                    np.percentile(t, 99),
                )
                label = {"thompson": where, "thompson_fresh": f"{where}, {FRESH_ADS:,} fresh ads",
                         "thompson_user": f"{where}, the user's own draw"}[variant]  # fmt: skip
                print(
                    f"| {size_label(r.n_ads)} | {r.backend} | {label} | {len(g)} | {g50:.2f} / {g99:.2f} | "
                    f"{t50:.2f} / {t99:.2f} | {t50 - g50:+.2f} / {t99 - g99:+.2f} | {np.median(t - g):+.2f} |"
                )


def _server(phase: Phase) -> str:
    if not phase.server.count:
        return "-"
    return f"{phase.server.total / phase.server.count * 1e3:.2f} / {phase.server.quantile(0.99) * 1e3:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=[10_000, 100_000, 1_000_000], help="e.g. 10k 100k 1m"
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--requests", type=int, default=10000, help="requests per load phase (all clients together)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time limit per load phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second phase")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (serve --workers); /metrics figures are then one worker's")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests (also bounded by --warmup-seconds)")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument(
        "--recall-users", type=int, default=200, help="known users whose answers are checked against exact"
    )
    parser.add_argument(
        "--add-requests", type=int, default=200, help="POST /v1/ads requests per configuration (0: skip)"
    )
    parser.add_argument("--policy-requests", type=int, default=1000, help="greedy/thompson pairs at 100k ads (0: skip)")
    parser.add_argument("--users", type=int, default=20_000, help="known users in the fake snapshot")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--ivf-nlist", type=int, default=0, help="IVF lists (0: about sqrt(n_ads))")
    parser.add_argument("--ivf-train-per-list", type=int, default=64, help="IVF k-means training rows per list")
    parser.add_argument("--build-threads", type=int, default=2, help="faiss OpenMP threads for the index build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info", help="the server's --log-level")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench" / "serve")
    parser.add_argument(
        "--store-dir", type=Path, help="folder of the servers' SQLite online stores (default <work>/online)"
    )
    parser.add_argument("--store-url", help="serve from this online store instead (e.g. redis://127.0.0.1:6390/0)")
    parser.add_argument("--build-only", action="store_true", help="build (or check) the cached snapshots, then exit")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through finally: servers stop
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / ".gitignore").write_text("*\n")
    started, load_before = time.perf_counter(), os.getloadavg()
    print(f"serve_latency: sizes {[size_label(n) for n in args.sizes]}, backends {args.backends}, work {args.work}; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)  # fmt: skip
    results: list[Result] = []
    try:
        for n_ads in args.sizes:
            print(f"\n{size_label(n_ads)} ads", flush=True)
            built = build_snapshots(args.work, n_ads, args)
            if args.build_only:
                for b in built.values():
                    print(
                        f"  {b.source}: build {b.build_seconds:.1f} s, {b.index_bytes / 2**20:.0f} MB, {b.params}",
                        flush=True,
                    )
                continue
            ref = exact_reference(n_ads, args)
            searches = in_process_searches(args.work, built, ref, args)
            for backend in ("ivf", "hnsw", "flat", "numpy"):
                if backend not in args.backends:
                    continue
                snapshot = built["flat" if backend == "numpy" else backend]
                numpy_stats = searches.get("numpy_index", (snapshot.build_seconds, snapshot.index_bytes))
                build_s, index_bytes = (
                    numpy_stats if backend == "numpy" else (snapshot.build_seconds, snapshot.index_bytes)
                )
                result = Result(n_ads, backend, "numpy" if backend == "numpy" else snapshot.kind, build_s, index_bytes / 2**20,
                                search_ms=searches.get(backend, (float("nan"), float("nan"))),
                                policy_in_process=searches.get(f"policy-{backend}", {}))  # fmt: skip
                results.append(result)
                measure(args.work, snapshot, backend, ref, result, args)
            del ref
    finally:
        if results:
            print_report(results, args, time.perf_counter() - started, load_before)
        else:
            print(f"\nwall {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps([_as_json(r) for r in results], indent=1))


def in_process_searches(
    work: Path, built: dict[str, Built], ref: ExactReference, args: argparse.Namespace
) -> dict[str, Any]:
    """Search latency of each backend in this process, and what building the NumPy index from
    the flat one costs (its "build" at service start) and holds."""
    from adrec_assets.online.index import NumpyIndex
    from adrec_assets.snapshots import SnapshotStore

    out: dict[str, Any] = {}
    for kind in ("ivf", "hnsw", "flat"):
        if kind not in built or not ({kind, "numpy"} & set(args.backends)):
            continue
        index = SnapshotStore(work / "artifacts", built[kind].source).load("ad_index").index
        policy_check = built[kind].n_ads == POLICY_SIZE and args.policy_requests > 0
        if kind in args.backends:
            out[kind] = in_process_search_ms(index, ref.queries, 2.0)
            if policy_check:
                out[f"policy-{kind}"] = in_process_policy_ms(index, ref.queries[:-1, :-1], 3.0)
        if kind == "flat" and "numpy" in args.backends:
            began = time.perf_counter()
            brute = NumpyIndex.from_index(index)
            out["numpy_index"] = (time.perf_counter() - began, brute.nbytes)
            out["numpy"] = in_process_search_ms(brute, ref.queries, 2.0)
            if policy_check:
                out["policy-numpy"] = in_process_policy_ms(brute, ref.queries[:-1, :-1], 3.0)
            del brute
        del index
    return out


def _as_json(r: Result) -> dict[str, Any]:
    def phase(p: Phase | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {"n": int(len(p.latencies)), "errors": p.errors, "wall_s": p.wall, "qps": p.qps, "p50_ms": p.ms(50),
                "p99_ms": p.ms(99), "server_mean_ms": p.server.total / p.server.count * 1e3 if p.server.count else None,
                "server_p99_ms": p.server.quantile(0.99) * 1e3, "server_cores": p.server_cores,
                "client_cores": p.client_cores, "load": p.load}  # fmt: skip

    return {"n_ads": r.n_ads, "backend": r.backend, "kind": r.kind, "build_s": r.build_s, "index_mb": r.index_mb,
            "start_s": r.start_s, "rss_gib": r.rss_gib, "search_ms": r.search_ms, "one": phase(r.one), "many": phase(r.many), "recall_at_10": r.recall,
            "recall_new_user": r.recall_new, "add": phase(r.add), "add_first_ms": r.add_first_ms,
            "policy": {k: v.tolist() for k, v in r.policy.items()},
            "policy_in_process": {k: v.tolist() for k, v in r.policy_in_process.items()}}  # fmt: skip


if __name__ == "__main__":
    main()
