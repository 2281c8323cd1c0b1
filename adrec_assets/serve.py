"""``python -m adrec_assets.serve --source NAME [--host H] [--port P]``: the online service.

Serves the source's published snapshot (see ``adrec_assets.snapshots``) over HTTP with
uvicorn, reloads it when a newer one is published, and writes served events back into the
source folder. Configuration comes from the environment (``ADREC_ARTIFACTS_DIR``,
``ADREC_SOURCES_DIR``, ``ADREC_ONLINE_STORE``, ``ADREC_API_TOKEN``, ``ADREC_READ_TOKEN``, ``ADREC_ID_KEY``,
``ADREC_EXPERIMENTS``, ``ADREC_SERVE_*``). Plain Python: the orchestrator is not imported.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adrec_assets.settings import SERVE_NO_ENCODER, SERVE_SOURCE

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adrec_assets.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the click source (partition) to serve")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-encoder", action="store_true", help="do not load the encoder (POST /v1/ads answers 503)")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="server processes on this port (each loads the snapshot; they share the online store)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from adrec_assets.online.config import ServingConfig
    from adrec_assets.online.store import open_store

    config = ServingConfig.from_env(args.source, load_encoder=not args.no_encoder)
    if not is_loopback(args.host) and not config.api_token:
        print(
            f"error: refusing to listen on {args.host} without ADREC_API_TOKEN: the write endpoints would be open "
            "to the network. Set ADREC_API_TOKEN (e.g. `openssl rand -hex 32`) or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if not config.api_token:
        logging.getLogger("adrec.serve").warning(
            "ADREC_API_TOKEN is not set: write endpoints accept any caller on this loopback address (requests "
            "addressed to another host name than localhost, 127.0.0.1 or [::1] are refused)"
        )
    import uvicorn

    if args.workers > 1:
        # uvicorn's supervisor starts each worker from an import string: hand the settings over
        # in the environment the workers inherit.
        SERVE_SOURCE.put(args.source)
        SERVE_NO_ENCODER.put("1" if args.no_encoder else "")
        from adrec_assets.online.api.metrics import MULTIPROCESS_ENV

        with _metrics_folder(os.environ.get(MULTIPROCESS_ENV)) as folder:
            os.environ[MULTIPROCESS_ENV] = str(folder)  # /metrics adds up every worker's series
            uvicorn.run(
                "adrec_assets.serve:app_from_env", factory=True, host=args.host, port=args.port, access_log=False,
                log_level=args.log_level, workers=args.workers,
            )  # fmt: skip
        return 0
    store = open_store(config.store_url, namespace=args.source, timeout_s=config.store_timeout_seconds)
    app = _app(config, store)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level, workers=1)
    store.close()
    return 0


@contextmanager
def _metrics_folder(given: str | None) -> Iterator[Path]:
    """The workers' metric files: ``given`` (``$PROMETHEUS_MULTIPROC_DIR``) when the operator
    set it (its files from an earlier run are removed, as prometheus-client requires), else a
    temporary folder removed afterwards."""
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="adrec-metrics-") as temporary:
        yield Path(temporary)


def _app(config: Any, store: Any) -> Any:
    from adrec_assets.online.api import create_app
    from adrec_assets.online.service import RecommendationService, pin_blas_to_one_thread

    pin_blas_to_one_thread()  # this process only serves
    # Without a token main() bound a loopback address; the app also answers only requests
    # addressed to a loopback name, so a web page cannot reach it by DNS rebinding.
    return create_app(RecommendationService(config, store), loopback_only=config.api_token is None)


def app_from_env() -> Any:
    """One worker's app (``--workers`` > 1): its own service and store connection over the
    shared store; live ads and retirements reach the other workers by the store's sync."""
    from adrec_assets.online.config import ServingConfig
    from adrec_assets.online.store import open_store

    source = SERVE_SOURCE.get()
    if source is None:
        raise RuntimeError(
            f"{SERVE_SOURCE.name} is not set: start the service with python -m adrec_assets.serve SOURCE"
        )
    config = ServingConfig.from_env(source, load_encoder=not SERVE_NO_ENCODER.get())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _app(config, open_store(config.store_url, namespace=source, timeout_s=config.store_timeout_seconds))


if __name__ == "__main__":
    sys.exit(main())
