"""Soak test of the service: mixed traffic against 2 workers over Redis, with faults injected.

Bounded in time and requests, loopback only (127.0.0.1), and it stops only what it started:
its own ``redis-server`` (AOF, ``appendfsync always``), its own ``python -m adrec_assets.serve
--workers 2`` and, as root, a small tmpfs it mounts for the source folder the service flushes
into. Over ``--seconds`` of traffic (clients loop: recommend, post impressions and sometimes a
click, re-post a batch now and then as a retrying client would) it injects, in turn:

1. ``SIGKILL`` of one worker (uvicorn's supervisor starts another), twice;
2. a Redis restart (stopped, then started again on its data: an outage window);
3. a full disk: the source folder's tmpfs filled, so flushes fail, then freed.

At the end it waits until the queue is flushed and checks, by event id, that every event the
service acknowledged (a 200 to its ``POST /v1/events``) appears exactly once in the flushed
``events/`` files and every acknowledged click exactly once in ``clicks/``; it counts 5xx
answers inside and outside the outage windows (a Redis restart; a worker's death shows as a
refused connection, not a 5xx). Exit status 1 if a check fails.

    .venv/bin/python benchmarks/serve_soak.py --seconds 150
    .venv/bin/python benchmarks/serve_soak.py --artifacts /tmp/soak-artifacts  # built once, reused after
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE = "synthetic"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def published(tmp: Path, given: str | None) -> Path:
    """An artifacts folder with a published snapshot of ``synthetic``: ``given`` if it holds
    one, else one materialized with the CLI (what ``make run`` runs) into ``given`` (kept for
    the next run) or a temporary folder."""
    if given and (Path(given) / SOURCE).is_dir():
        return Path(given)
    home, artifacts = tmp / "dagster_home", Path(given) if given else tmp / "artifacts"
    home.mkdir()
    (home / "dagster.yaml").touch()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ADREC_ARTIFACTS_DIR": str(artifacts), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "adrec_assets.cli", "register", SOURCE], env=env, cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    began = time.monotonic()
    done = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "adrec_assets.definitions", "--select",
                           "group:adrec", "--partition", SOURCE], env=env, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"materialization failed:\n{done.stderr[-3000:]}")
    print(f"materialized {SOURCE} in {time.monotonic() - began:.0f} s", flush=True)
    return artifacts


class Redis:
    """Our own redis-server with AOF (every write fsynced) so a restart keeps the queue."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    """A tmpfs at ``path`` as root (the full-disk episode), else a plain folder (no episode)."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    ).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def worker_pids(parent: int) -> list[int]:
    """The uvicorn workers under ``parent``: spawned children that run (not multiprocessing's
    resource tracker, not a zombie)."""
    pids = []
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline and state != "Z":
                pids.append(int(pid))
    return pids


class Traffic:
    """Client threads: recommend, post the slate's impressions (and a click now and then),
    sometimes post the same batch again. Records every answer and every acknowledged event."""

    def __init__(self, base: str, users: int, seed: int) -> None:
        self.base, self.users, self.seed = base, users, seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, str, int]] = []  # (time, route, status); status 0: no connection
        self.acked: collections.Counter[str] = collections.Counter()  # event id -> acknowledged posts
        self.acked_clicks: set[str] = set()

    def note(self, route: str, status: int) -> None:
        with self.lock:
            self.answers.append((time.monotonic(), route, status))

    def client(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while not self.stop.is_set():
                user = f"user-{rng.randrange(self.users):07d}"
                try:
                    answer = http.get("/v1/recommendations", params={"user_id": user, "k": 5})
                except httpx.TransportError:
                    self.note("recommend", 0)
                    time.sleep(0.05)
                    continue
                self.note("recommend", answer.status_code)
                if answer.status_code != 200 or not answer.json().get("recorded", True):
                    continue
                slate = answer.json()
                events = [{"request_id": slate["request_id"], "user_id": user, "ad_id": item["ad_id"],
                           "position": item["position"], "type": "impression", "timestamp": time.time()}
                          for item in slate["items"]]  # fmt: skip
                if rng.random() < 0.3:
                    clicked = dict(events[rng.randrange(len(events))], type="click")
                    events.append(clicked)
                for _attempt in range(2 if rng.random() < 0.2 else 1):  # a retrying client posts twice
                    try:
                        posted = http.post("/v1/events", json={"events": events})
                    except httpx.TransportError:
                        self.note("events", 0)
                        continue
                    self.note("events", posted.status_code)
                    if posted.status_code == 200:
                        with self.lock:
                            for event in events:
                                key = f"{event['request_id']}:{event['position']}:{event['type']}"
                                self.acked[key] += 1
                                if event["type"] == "click":
                                    self.acked_clicks.add(key)


def flushed(folder: Path, kind: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted((folder / kind).glob("*.parquet")):
        counts.update(pq.read_table(path, columns=["event_id"])["event_id"].to_pylist())
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="traffic duration (faults at fixed shares of it)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--users", type=int, default=2000, help="user ids drawn (the synthetic source has 2,000)")
    parser.add_argument("--artifacts", help="a folder with a published snapshot of `synthetic` (else one is built, "
                        "into this folder when given)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is absent: make system-deps")
    tmp = Path(tempfile.mkdtemp(prefix="adrec-soak-"))
    redis, service = Redis(tmp / "redis"), None
    windows: list[tuple[float, float, str]] = []
    try:
        artifacts = published(tmp, args.artifacts)
        redis.start()
        with small_disk(tmp / "sources", 8) as disk_episode:
            port = free_port()
            env = {**os.environ, "ADREC_ARTIFACTS_DIR": str(artifacts), "ADREC_SOURCES_DIR": str(tmp / "sources"),
                   "ADREC_ONLINE_STORE": f"redis://127.0.0.1:{redis.port}/0", "ADREC_SERVE_FLUSH_SECONDS": "1",
                   "ADREC_SERVE_RELOAD_SECONDS": "2", "ADREC_SERVE_SETTLE_SECONDS": "1",
                   "ADREC_SERVE_STORE_TIMEOUT": "1"}  # fmt: skip
            log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed with the service below
            service = subprocess.Popen(
                [sys.executable, "-m", "adrec_assets.serve", "--source", SOURCE, "--port", str(port), "--workers",
                 "2", "--no-encoder", "--log-level", "warning"], env=env, cwd=REPO, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                if service.poll() is not None:
                    sys.exit(f"the service exited: {(tmp / 'serve.log').read_text()[-3000:]}")
                time.sleep(0.5)
            traffic = Traffic(base, args.users, args.seed)
            threads = [threading.Thread(target=traffic.client, args=(i,), daemon=True) for i in range(args.clients)]
            began = time.monotonic()
            for thread in threads:
                thread.start()

            def at(share: float) -> None:
                time.sleep(max(0.0, began + share * args.seconds - time.monotonic()))

            for share in (0.15, 0.3):
                at(share)
                victims = worker_pids(service.pid)
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    print(f"{time.monotonic() - began:6.1f} s  SIGKILL worker {victims[0]}", flush=True)
            at(0.45)
            start = time.monotonic()
            redis.stop()
            print(f"{start - began:6.1f} s  redis stopped", flush=True)
            time.sleep(3)
            redis.start()
            windows.append((start, time.monotonic() + 2.0, "redis restart"))
            print(f"{time.monotonic() - began:6.1f} s  redis started again", flush=True)
            if disk_episode:
                at(0.65)
                filler = tmp / "sources" / "filler"
                with open(filler, "wb") as out, contextlib.suppress(OSError):
                    while True:
                        out.write(b"\0" * (1 << 16))
                print(f"{time.monotonic() - began:6.1f} s  source disk full", flush=True)
                time.sleep(max(5.0, 0.1 * args.seconds))
                health = httpx.get(base + "/healthz", timeout=5).json()
                print(f"           /healthz during it: {health['status']} {health['reasons']}", flush=True)
                filler.unlink()
                print(f"{time.monotonic() - began:6.1f} s  source disk freed", flush=True)
            else:
                print("not root or no tmpfs: no full-disk episode", flush=True)
            at(1.0)
            traffic.stop.set()
            for thread in threads:
                thread.join(30)
            drained = time.monotonic() + 60
            while time.monotonic() < drained:
                with contextlib.suppress(httpx.TransportError, KeyError, json.JSONDecodeError):
                    health = httpx.get(base + "/healthz", timeout=5).json()
                    if health["pending_events"] == 0:
                        break
                time.sleep(1)
            os.killpg(service.pid, signal.SIGTERM)
            service.wait(60)
            service = None
            events = flushed(tmp / "sources" / SOURCE, "events")
            clicks = flushed(tmp / "sources" / SOURCE, "clicks")
        return report(traffic, events, clicks, windows, began)
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    traffic: Traffic, events: collections.Counter, clicks: collections.Counter, windows: list, began: float
) -> int:
    def inside(moment: float) -> bool:
        return any(start <= moment <= end for start, end, _ in windows)

    by_status = collections.Counter(status for _, _, status in traffic.answers)
    errors_out = [(t, r, s) for t, r, s in traffic.answers if s >= 500 and not inside(t)]
    errors_in = [(t, r, s) for t, r, s in traffic.answers if s >= 500 and inside(t)]
    acked = set(traffic.acked)
    missing = acked - set(events)
    doubled = [key for key, n in events.items() if n > 1]
    lost_clicks = traffic.acked_clicks - set(clicks)
    doubled_clicks = [key for key, n in clicks.items() if n > 1]
    print(f"requests: {len(traffic.answers)} answers by status {dict(sorted(by_status.items()))} "
          f"(0: no connection, a worker killed or restarting)")  # fmt: skip
    print(
        f"5xx outside the outage windows: {len(errors_out)}; inside: {len(errors_in)} "
        f"({', '.join(f'{n} {s:.0f}-{e:.0f} s' for s, e, n in ((s - began, e - began, n) for s, e, n in windows))})"
    )
    print(f"events acknowledged: {len(acked)} ids ({sum(traffic.acked.values())} acknowledgements, retries included); "
          f"in the flushed files: {len(events)} ids, {sum(events.values())} rows")  # fmt: skip
    print(f"  acknowledged but missing: {len(missing)}; in the files more than once: {len(doubled)}")
    print(f"clicks acknowledged: {len(traffic.acked_clicks)}; in clicks/: {len(clicks)} ids; lost: {len(lost_clicks)}; "
          f"more than once: {len(doubled_clicks)}")  # fmt: skip
    ok = not (errors_out or missing or doubled or lost_clicks or doubled_clicks) and acked
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
