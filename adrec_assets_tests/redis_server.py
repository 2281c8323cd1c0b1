"""A throw-away ``redis-server`` for tests: loopback only, a free port, a temp dir, no
persistence; stopped by its PID. Skips (saying why) where Debian's redis-server is absent."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_SERVER = Path("/usr/bin/redis-server")
SKIP_REASON = f"{REDIS_SERVER} is absent: install it with `make system-deps` (Debian redis-server)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Yield ``redis://127.0.0.1:<port>/0`` of a fresh server; skip if redis-server is absent."""
    if not REDIS_SERVER.exists():
        pytest.skip(SKIP_REASON)
    workdir = tempfile.mkdtemp(prefix="adrec-test-redis-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):  # the free port may be taken between probe and bind
            port = _free_port()
            proc = subprocess.Popen(
                [
                    str(REDIS_SERVER),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dir",
                    workdir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--daemonize",
                    "no",
                    "--logfile",
                    str(Path(workdir) / "redis.log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + startup_timeout_s
            while proc.poll() is None and time.monotonic() < deadline and not _answers(port):
                time.sleep(0.05)
            if proc.poll() is None and _answers(port):
                yield f"redis://127.0.0.1:{port}/0"
                return
            _stop(proc)
        log = Path(workdir, "redis.log")
        raise RuntimeError(f"redis-server did not start; log: {log.read_text()[-2000:] if log.exists() else '(none)'}")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop exactly the server this helper started (by its PID)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
