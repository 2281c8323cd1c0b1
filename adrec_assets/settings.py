"""Every ``ADREC_*`` environment variable, declared once: its type, default and meaning.

Code reads a variable through its :class:`Setting` (``SOURCES_DIR.get()``) at the moment it
needs it, so an operator's or a test's environment is seen as it is then, and no module keeps
its own copy of a name or a default. ``docs/configuration.md`` is generated from this table
(``python -m adrec_assets.settings > docs/configuration.md``); a test fails when a variable is
read anywhere else, or named anywhere without being declared here.

Plain Python and the ground floor of the house: it imports nothing of adrec.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: The checkout's (or installed package's sibling) data folder: the default of ``ADREC_DATA_DIR``.
REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class SettingError(ValueError):
    """An ``ADREC_*`` variable holds a value of the wrong type."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable. Unset and empty mean the same: the default.

    ``default`` is a value, or a function of the other settings (a folder under
    ``ADREC_DATA_DIR``); ``shown_default`` is how the documentation writes it.
    """

    name: str
    parse: Callable[[str], T]
    default: T | Callable[[], T] | None
    shown_default: str
    meaning: str
    group: str

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        value = (os.environ if environ is None else environ).get(self.name, "")
        return value if value.strip() else None

    def is_set(self, environ: Mapping[str, str] | None = None) -> bool:
        return self.raw(environ) is not None

    def get(self, environ: Mapping[str, str] | None = None) -> T | None:
        raw = self.raw(environ)
        if raw is None:
            return self.default() if callable(self.default) else self.default  # type: ignore[return-value]
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise SettingError(f"{self.name}={raw!r}: {exc}") from None

    def put(self, value: str) -> None:
        """Set it for this process and the processes it starts (the service's workers)."""
        os.environ[self.name] = value


def _flag(raw: str) -> bool:
    return raw == "1"


def _number(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None

    return parse


def _path(raw: str) -> Path:
    return Path(raw)


SETTINGS: dict[str, Setting[Any]] = {}


def _declare(name: str, parse: Callable[[str], T], default: Any, shown: str, meaning: str, group: str) -> Setting[T]:
    setting = Setting(f"ADREC_{name}", parse, default, shown, meaning, group)
    SETTINGS[setting.name] = setting
    return setting


PIPELINE, PRIVACY, ENCODER_GROUP, SERVICE = "pipeline", "privacy", "encoder", "service"

# ----------------------------------------------------------------------------- folders and pipeline
DATA_DIR = _declare(
    "DATA_DIR",
    _path,
    lambda: REPO_DATA_DIR,
    "`data/`",
    "where the built-in catalogue (`catalog/`), the online store's SQLite file and the default sources and caches live",
    PIPELINE,
)
SOURCES_DIR = _declare(
    "SOURCES_DIR",
    _path,
    lambda: DATA_DIR.get() / "sources",
    "`$ADREC_DATA_DIR/sources`",
    "root of the file click sources (one sub-folder per source)",
    PIPELINE,
)
ARTIFACTS_DIR = _declare(
    "ARTIFACTS_DIR",
    str,
    "data/artifacts",
    "`data/artifacts`",
    "root of the artifact store (a local folder or a `upath` URL)",
    PIPELINE,
)
KEEP_SNAPSHOTS = _declare(
    "KEEP_SNAPSHOTS",
    _number(int),
    5,
    "5",
    "published snapshots kept per source for rollback (`artifacts.keep_snapshots`); older ones are garbage-collected",
    PIPELINE,
)
EXECUTOR = _declare(
    "EXECUTOR",
    str,
    "in_process",
    "`in_process`",
    "`multiprocess` = Dagster's multi-or-in-process executor (a process per step; pays a torch import per step, so in-process is faster on one small machine)",
    PIPELINE,
)
REFRESH_CRON = _declare("REFRESH_CRON", str, "0 3 * * *", "`0 3 * * *`", "cron of the nightly full refresh", PIPELINE)
SENSOR_RETRY_SECONDS = _declare(
    "SENSOR_RETRY_SECONDS",
    _number(float),
    300.0,
    "300",
    "first back-off before the click-source sensor retries a failed run of unchanged files (doubling, at most 5 times)",
    PIPELINE,
)
EXPERIMENTS = _declare(
    "EXPERIMENTS",
    _path,
    None,
    "none",
    "TOML file of A/B experiments ([serving](serving.md#experiments)): the service and the `experiment_report` asset",
    PIPELINE,
)

# ----------------------------------------------------------------------------- privacy
ID_KEY = _declare(
    "ID_KEY",
    str,
    None,
    "required (the public dev key, with a warning, under `ADREC_ALLOW_DEV_KEY=1`)",
    "HMAC key of the user pseudonyms (a secret of at least 16 characters)",
    PRIVACY,
)
ALLOW_DEV_KEY = _declare(
    "ALLOW_DEV_KEY",
    _flag,
    False,
    "`1` in the Makefile",
    "`1` allows the public development key, with a warning (never in a deployment)",
    PRIVACY,
)

# ----------------------------------------------------------------------------- encoder
ENCODER = _declare(
    "ENCODER",
    str.strip,
    None,
    "`auto`",
    "overrides the encoder resource: `auto` (Jina CLIP v2 if its files are local, else offline), `jina-clip-v2`, `offline`",
    ENCODER_GROUP,
)
JINA_PATH = _declare(
    "JINA_PATH", str, None, "HF cache", "folder holding a downloaded `jinaai/jina-clip-v2`", ENCODER_GROUP
)
ENCODER_CACHE_DIR = _declare(
    "ENCODER_CACHE_DIR",
    _path,
    lambda: DATA_DIR.get() / "cache" / "encodings",
    "`$ADREC_DATA_DIR/cache/encodings`",
    "content-hash encoding cache (one file per encoder)",
    ENCODER_GROUP,
)

# ----------------------------------------------------------------------------- service
ONLINE_STORE = _declare(
    "ONLINE_STORE",
    str,
    None,
    "SQLite in `$ADREC_DATA_DIR/online/`",
    "online store: a SQLite path, or `redis://…` for replicas",
    SERVICE,
)
API_TOKEN = _declare(
    "API_TOKEN",
    str,
    None,
    "unset (loopback only)",
    "bearer token of the write endpoints (it also opens the reads); unset: loopback development mode, where only "
    "requests addressed to `localhost`, `127.0.0.1` or `[::1]` are answered",
    SERVICE,
)
READ_TOKEN = _declare(
    "READ_TOKEN",
    str,
    None,
    "unset (reads open)",
    "bearer token of the read endpoints (`GET /v1/recommendations`, `GET /v1/ads/…`); the write token also reads. "
    "A response's `user_status` is told only to a caller with either token. Needs `ADREC_API_TOKEN`",
    SERVICE,
)
SERVE_INDEX = _declare(
    "SERVE_INDEX", str, "faiss", "`faiss`", "`numpy`: exact brute force instead of the snapshot's FAISS index", SERVICE
)
SERVE_ALPHA = _declare("SERVE_ALPHA", _number(float), 0.3, "0.3", "EMA step of a click at position 1", SERVICE)
SERVE_DEFAULT_POLICY = _declare(
    "SERVE_DEFAULT_POLICY",
    str,
    "greedy",
    "`greedy`",
    "policy of requests outside experiments: `greedy`, `thompson`, `epsilon_greedy`, `random`",
    SERVICE,
)
SERVE_EPSILON = _declare("SERVE_EPSILON", _number(float), 0.1, "0.1", "exploration rate of `epsilon_greedy`", SERVICE)
SERVE_RANDOMIZED_SHARE = _declare(
    "SERVE_RANDOMIZED_SHARE",
    _number(float),
    0.0,
    "0",
    "share of slates served in random order (position-bias slice; 0.02 recommended)",
    SERVICE,
)
SERVE_FRESH_PRIOR_SD = _declare(
    "SERVE_FRESH_PRIOR_SD",
    _number(float),
    1.0,
    "1.0",
    "Thompson: prior sd of a fresh ad's own logit offset, as a multiple of the spread (sd) of the trained "
    "candidates' scores for the request (0: none)",
    SERVICE,
)
SERVE_FRESH_SHARE = _declare(
    "SERVE_FRESH_SHARE",
    _number(float),
    0.2,
    "0.2",
    "Thompson: at most ceil(share × k) slots of a slate go to fresh ads their clicks have not earned a place "
    "for (one of them rotates over the fresh ads not shown yet); 1: no cap",
    SERVICE,
)
SERVE_FRESH_ROTATION = _declare(
    "SERVE_FRESH_ROTATION",
    _number(float),
    500.0,
    "500",
    "Thompson: a fresh ad never shown waits on average this many of the policy's requests for its first "
    "impression (a slate rotates one in with probability min(share × k, unshown / this, 1); the wait is "
    "exponential: P(over 10× this) = e^-10)",
    SERVICE,
)
SERVE_SHARED_EXPLORATION = _declare(
    "SERVE_SHARED_EXPLORATION",
    _number(float),
    1.0,
    "1.0",
    "Thompson: spread of the draw of the shared click model (a multiple of its posterior sd; 0: its mean, so only "
    "the fresh ads' own effects explore)",
    SERVICE,
)
SERVE_SHARED_MODEL = _declare(
    "SERVE_SHARED_MODEL",
    str,
    "prior",
    "`prior`",
    "Thompson ranks with the shared click model's `prior` (today's score; the model is still learnt and stored) "
    "or its `online` posterior (mean and draws, spread `ADREC_SERVE_SHARED_EXPLORATION`)",
    SERVICE,
)
SERVE_USER_UPDATE = _declare(
    "SERVE_USER_UPDATE",
    str,
    "posterior",
    "`posterior`",
    "how a user's vector learns online: `posterior` (a per-user posterior taught by impressions and clicks, "
    "position-weighted) or `ema` (clicks only, step `ADREC_SERVE_ALPHA`)",
    SERVICE,
)
SERVE_USER_RANK = _declare(
    "SERVE_USER_RANK",
    _number(int),
    16,
    "16",
    "per-user posterior: principal directions of the population's spread it learns in (record: d + 2 + r(r+1)/2 "
    "floats, at most 4 KB)",
    SERVICE,
)
SERVE_USER_PRIOR_SPREAD = _declare(
    "SERVE_USER_PRIOR_SPREAD",
    _number(float),
    0.5,
    "0.5",
    "per-user posterior: prior sd as a multiple of the population's spread of served user vectors",
    SERVICE,
)
SERVE_KNOWN_USER_SPREAD = _declare(
    "SERVE_KNOWN_USER_SPREAD",
    _number(float),
    1.0,
    "1.0",
    "per-user posterior: a known user's prior sd as a multiple of the population's (their trained vector is "
    "surer than a new user's global mean)",
    SERVICE,
)
SERVE_USER_EXPLORATION = _declare(
    "SERVE_USER_EXPLORATION",
    _number(float),
    0.0,
    "0",
    "Thompson: spread of the draw of a user's vector (a multiple of their posterior sd; 0: their mean, "
    "Thompson then explores fresh ads only; draws cost clicks at a few slates per user, benchmarks/README.md)",
    SERVICE,
)
SERVE_FRESH_SCOPE = _declare(
    "SERVE_FRESH_SCOPE",
    str,
    "live",
    "`live`",
    "fresh ads: `live` (added since the snapshot) or `untrained` (also its click-less ads)",
    SERVICE,
)
SERVE_RELOAD_SECONDS = _declare(
    "SERVE_RELOAD_SECONDS",
    _number(float),
    2.0,
    "2",
    "seconds between checks for a new snapshot and new live ads",
    SERVICE,
)
SERVE_FLUSH_SECONDS = _declare(
    "SERVE_FLUSH_SECONDS",
    _number(float),
    5.0,
    "5",
    "seconds between flushes of served events to the source's `events/` and `clicks/`",
    SERVICE,
)
SERVE_SETTLE_SECONDS = _declare(
    "SERVE_SETTLE_SECONDS",
    _number(float),
    60.0,
    "60",
    "seconds an impression waits for its click before it teaches the policy posterior",
    SERVICE,
)
SERVE_MAX_IMAGE_PIXELS = _declare(
    "SERVE_MAX_IMAGE_PIXELS",
    _number(int),
    4096 * 4096,
    "16777216 (4096 × 4096)",
    "`POST /v1/ads`: an image with more pixels (width × height, read from its header before anything decodes it) "
    "is refused with 413",
    SERVICE,
)
SERVE_STORE_TIMEOUT = _declare(
    "SERVE_STORE_TIMEOUT",
    _number(float),
    2.0,
    "2",
    "seconds one online-store call may wait (Redis socket timeout, SQLite busy timeout) before the request answers "
    "503 and `/healthz` turns degraded: a stalled store never holds requests for longer",
    SERVICE,
)
SERVE_SOURCE = _declare(
    "SERVE_SOURCE",
    str,
    None,
    "set by `python -m adrec_assets.serve`",
    "the source the service's workers serve (internal: the launcher hands it to its workers)",
    SERVICE,
)
SERVE_NO_ENCODER = _declare(
    "SERVE_NO_ENCODER",
    _flag,
    False,
    "set by `python -m adrec_assets.serve`",
    "`1`: the workers load no encoder, so `POST /v1/ads` answers 503 (internal: `--no-encoder`)",
    SERVICE,
)


def markdown() -> str:
    """``docs/configuration.md``: every variable by group."""
    lines = [
        "# Configuration",
        "",
        "<!-- generated by `python -m adrec_assets.settings > docs/configuration.md`; edit adrec_assets/settings.py -->",
        "",
        "Every `ADREC_*` environment variable adrec reads, declared in `adrec_assets/settings.py`. Unset and",
        "empty mean the same: the default. Dagster resources and the service's `ServingConfig` take",
        "explicit values first; these variables are their defaults. The service's variables are explained",
        "in context in [serving](serving.md), the PostgreSQL connection of a deployment in [deploy](deploy.md).",
        "`DAGSTER_HOME` (the Dagster instance: runs, events, registered sources) is Dagster's own; the",
        "Makefile sets it to `.dagster_home/`.",
    ]
    titles = {PIPELINE: "Folders and pipeline", PRIVACY: "Privacy", ENCODER_GROUP: "Encoder", SERVICE: "Service"}
    for group, title in titles.items():
        lines += ["", f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{s.name}` | {s.shown_default} | {s.meaning} |" for s in SETTINGS.values() if s.group == group]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
