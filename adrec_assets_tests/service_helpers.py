"""Real services for the operations tests: ``dagster dev`` on loopback, Debian's Chromium and a
throw-away PostgreSQL cluster. Every process started here is stopped by its PID / process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
#: Pipeline assets of group "adrec" and their lineage (upstream -> downstream); the last,
#: ``snapshot``, publishes the twelve artifacts together.
ARTIFACT_ASSETS = (
    "raw_ads", "click_graph", "ad_embeddings_raw", "user_embeddings", "projector", "ad_projected", "served_users",
    "served_ads", "global_mean", "ad_index", "position_bias", "policy_posterior",
)  # fmt: skip
PIPELINE_ASSETS = (*ARTIFACT_ASSETS, "snapshot")
#: The run's steps: one per asset, but one multi-asset step (served_model) for served_users + served_ads.
PIPELINE_STEPS = tuple(
    dict.fromkeys("served_model" if a in ("served_users", "served_ads") else a for a in PIPELINE_ASSETS)
)
PIPELINE_EDGES = (
    ("raw_ads", "ad_embeddings_raw"),
    ("raw_ads", "click_graph"),
    ("click_graph", "user_embeddings"),
    ("click_graph", "projector"),
    ("raw_ads", "projector"),
    ("ad_embeddings_raw", "projector"),
    ("user_embeddings", "projector"),
    ("ad_embeddings_raw", "ad_projected"),
    ("raw_ads", "ad_projected"),
    ("projector", "ad_projected"),
    ("click_graph", "served_users"),
    ("user_embeddings", "served_users"),
    ("ad_projected", "served_users"),
    ("click_graph", "served_ads"),
    ("user_embeddings", "served_ads"),
    ("ad_projected", "served_ads"),
    ("served_users", "global_mean"),
    ("served_ads", "ad_index"),
    ("served_users", "ad_index"),
    ("click_graph", "policy_posterior"),
    ("served_users", "policy_posterior"),
    ("global_mean", "policy_posterior"),
    ("served_ads", "policy_posterior"),
    ("position_bias", "policy_posterior"),
    *((asset, "snapshot") for asset in ARTIFACT_ASSETS),
)
#: Where tests leave files for a person to look at (git-ignored).
ARTIFACTS_ROOT = Path(os.environ.get("ADREC_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
#: Flags Debian's Chromium needs headless as root on a box without outside network
#: (without the background-networking ones it stalls on refused connections).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: Pseudonym key for the pipelines these tests run (never a real secret).
TEST_ID_KEY = "adrec-ops-test-key-0123456789abcdef"
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pipeline_env(dagster_home: Path, artifacts: Path, sources: Path, **extra: str) -> dict[str, str]:
    """Environment of a Dagster process under test: its own instance, artifacts and (empty)
    source folder, so the click-source sensor sees no folder of this checkout; no model hub."""
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(dagster_home),
        ADREC_ARTIFACTS_DIR=str(artifacts),
        ADREC_SOURCES_DIR=str(sources),
        ADREC_ENCODER="offline",
        ADREC_ID_KEY=TEST_ID_KEY,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def stop_process_group(proc: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session``), then
    SIGKILL whatever is left of it after ``grace_seconds``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # code servers / run workers left behind
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


def report(config: pytest.Config, message: str) -> None:
    """Print past pytest's output capture (where artifacts went, how long a run took)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(message)
        return
    with capture.global_and_fixture_disabled():
        print(message)


def tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return f"(no log at {path})"


@dataclass
class DagsterDev:
    url: str
    proc: subprocess.Popen
    log: Path


@contextmanager
def dagster_dev(env: dict[str, str], log: Path, startup_timeout: float = 300.0) -> Iterator[DagsterDev]:
    """``dagster dev`` (webserver + daemon) on 127.0.0.1 at a free port; stopped by its PID."""
    port = free_port()
    cmd = [str(BIN_DIR / "dagster"), "dev", "-m", "adrec_assets.definitions", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/server_info", proc, log, startup_timeout)
        yield DagsterDev(url=url, proc=proc, log=log)
    finally:
        stop_process_group(proc)


def chromium_executable() -> str:
    """Debian's Chromium, or skip the test saying how to get it (Playwright never downloads one)."""
    for candidate in (os.environ.get("ADREC_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "no system Chromium (/usr/bin/chromium): `apt-get install -y chromium` (make system-deps) could not run here"
    )


@dataclass
class PostgresCluster:
    host: str
    port: int
    user: str
    password: str
    db: str
    socket_dir: Path

    def env(self) -> dict[str, str]:
        """The variables ``deploy/dagster.yaml`` reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db,
        }

    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.db}"


def postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL server install, or skip saying how to get one."""
    for bin_dir in PG_BIN_DIRS:
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists() and (bin_dir / "postgres").exists():
            return bin_dir
    pytest.skip(
        "no PostgreSQL server (/usr/lib/postgresql/*/bin/initdb): `apt-get install -y postgresql` (make system-deps) could not run here"
    )


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """initdb/pg_ctl refuse to run as root: run them as the Debian ``postgres`` user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser`: cannot start PostgreSQL as an unprivileged user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no `postgres` user (it comes with Debian's postgresql package)")
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run_checked(cmd: list[str], what: str, timeout: float, **kwargs) -> None:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{what} failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")


@contextmanager
def postgres_cluster(password: str = "adrec-test-pw", startup_timeout: float = 60.0) -> Iterator[PostgresCluster]:
    """A throw-away cluster in a fresh folder under the system temp dir (pytest's own temp dirs
    are private to root, and the server runs as ``postgres``): password auth on 127.0.0.1 at a
    free port, unix socket in that folder; stopped and the folder removed when the block ends."""
    bin_dir = postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="adrec-pg-"))
    data, sock, pwfile, log = root / "data", root / "sock", root / "pwfile", root / "postgres.log"
    sock.mkdir()
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        for path in (root, sock, pwfile):
            shutil.chown(path, "postgres", "postgres")
    user = "adrec"
    started = False
    try:
        _run_checked(
            _as_postgres_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    user,
                    "--pwfile",
                    str(pwfile),
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            "initdb",
            timeout=180,
        )
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sock} -c fsync=off"
        started = True
        try:
            _run_checked(
                _as_postgres_user(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(log),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        str(int(startup_timeout)),
                        "start",
                    ]
                ),
                "pg_ctl start",
                timeout=startup_timeout + 30,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{tail(log)}") from None
        _run_checked(
            [
                str(bin_dir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                user,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "CREATE DATABASE adrec_dagster",
            ],
            "CREATE DATABASE",
            timeout=60,
            env={**os.environ, "PGPASSWORD": password},
        )
        yield PostgresCluster("127.0.0.1", port, user, password, "adrec_dagster", sock)
    finally:
        if started:
            for mode in ("fast", "immediate"):
                stop = subprocess.run(
                    _as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "30", "stop"]),
                    check=False,
                    capture_output=True,
                    timeout=60,
                )
                if stop.returncode == 0:
                    break
        shutil.rmtree(root, ignore_errors=True)
