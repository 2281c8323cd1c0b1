"""What the recommendation service is started with: :class:`ServingConfig` and the choices
its settings take (policies, index backends, fresh-ad scopes).

Plain Python, no I/O but :meth:`ServingConfig.from_env`'s reads of the ``ADREC_*`` variables
declared in :mod:`adrec_assets.settings` (which also holds the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adrec_assets import settings
from adrec_assets.online.policy import MAX_EXPLORATION, POLICIES

INDEX_BACKENDS = ("faiss", "numpy")  # numpy: exact brute force, the baseline / debugging backend
FRESH_SCOPES = ("live", "untrained")
SHARED_MODELS = ("prior", "online")
USER_UPDATES = ("posterior", "ema")
#: ServingConfig field -> the variable that sets it (``from_env``).
SERVE_SETTINGS = {
    "index_backend": settings.SERVE_INDEX, "alpha": settings.SERVE_ALPHA, "default_policy": settings.SERVE_DEFAULT_POLICY,
    "epsilon": settings.SERVE_EPSILON, "randomized_share": settings.SERVE_RANDOMIZED_SHARE,
    "fresh_prior_sd": settings.SERVE_FRESH_PRIOR_SD, "fresh_share": settings.SERVE_FRESH_SHARE,
    "fresh_rotation": settings.SERVE_FRESH_ROTATION,
    "fresh_scope": settings.SERVE_FRESH_SCOPE, "shared_exploration": settings.SERVE_SHARED_EXPLORATION,
    "shared_model": settings.SERVE_SHARED_MODEL, "user_update": settings.SERVE_USER_UPDATE,
    "user_rank": settings.SERVE_USER_RANK, "user_prior_spread": settings.SERVE_USER_PRIOR_SPREAD,
    "user_exploration": settings.SERVE_USER_EXPLORATION, "known_user_spread": settings.SERVE_KNOWN_USER_SPREAD,
    "reload_seconds": settings.SERVE_RELOAD_SECONDS, "flush_seconds": settings.SERVE_FLUSH_SECONDS,
    "settle_seconds": settings.SERVE_SETTLE_SECONDS, "max_image_pixels": settings.SERVE_MAX_IMAGE_PIXELS,
    "store_timeout_seconds": settings.SERVE_STORE_TIMEOUT,
}  # fmt: skip


@dataclass(frozen=True)
class ServingConfig:
    """Everything the service is started with (``from_env`` reads ``ADREC_*`` variables)."""

    source: str
    artifacts_root: Path
    sources_root: Path
    store_url: str | None = None  # None: SQLite under data/online; redis://... for replicas
    api_token: str | None = None  # writes (and reads); None: loopback development mode (serve.py)
    read_token: str | None = None  # None: reads are open, but user_status is told only to a token holder
    alpha: float = settings.SERVE_ALPHA.default  # EMA step of a click at position 1 (before position-bias weighting)
    default_policy: str = settings.SERVE_DEFAULT_POLICY.default
    epsilon: float = settings.SERVE_EPSILON.default
    randomized_share: float = settings.SERVE_RANDOMIZED_SHARE.default  # slates served in random order
    fresh_prior_sd: float = settings.SERVE_FRESH_PRIOR_SD.default  # thompson: fresh ad's logit offset sd (0: none)
    fresh_share: float = settings.SERVE_FRESH_SHARE.default  # thompson: cap on unearned fresh ads' slots per slate
    fresh_scope: str = settings.SERVE_FRESH_SCOPE.default  # "live" (added since the snapshot) or "untrained"
    fresh_rotation: float = settings.SERVE_FRESH_ROTATION.default  # thompson: requests to show each new ad once
    shared_exploration: float = settings.SERVE_SHARED_EXPLORATION.default  # thompson: the shared model's draw spread
    shared_model: str = settings.SERVE_SHARED_MODEL.default  # thompson ranks with the shared "prior" or "online" model
    user_update: str = settings.SERVE_USER_UPDATE.default  # "posterior" (impressions and clicks) or "ema" (clicks)
    user_rank: int = settings.SERVE_USER_RANK.default  # per-user posterior's subspace
    user_prior_spread: float = settings.SERVE_USER_PRIOR_SPREAD.default  # x the population's spread
    user_exploration: float = settings.SERVE_USER_EXPLORATION.default  # thompson: the user draw's spread
    known_user_spread: float = settings.SERVE_KNOWN_USER_SPREAD.default  # known users' prior, x the population's
    experiments_path: Path | None = None
    reload_seconds: float = settings.SERVE_RELOAD_SECONDS.default
    flush_seconds: float = settings.SERVE_FLUSH_SECONDS.default
    flush_batch: int = 5000
    settle_seconds: float = settings.SERVE_SETTLE_SECONDS.default  # impressions wait this long for their click
    request_ttl_seconds: float = 24 * 3600.0
    max_k: int = 1000
    max_text_chars: int = 10_000
    max_image_bytes: int = 5 * 1024 * 1024
    max_image_pixels: int = settings.SERVE_MAX_IMAGE_PIXELS.default  # width x height, from the image's header
    store_timeout_seconds: float = settings.SERVE_STORE_TIMEOUT.default  # one store call's longest wait
    click_weight_cap: float = 10.0
    load_encoder: bool = True  # False: POST /v1/ads answers 503 (a read-only replica, quick tests)
    seed: int | None = None  # fixes request ids and draws (tests, simulations)
    index_backend: str = (
        settings.SERVE_INDEX.default
    )  # the snapshot's FAISS index, or "numpy": exact brute force over its ads

    @classmethod
    def from_env(cls, source: str, **overrides: Any) -> ServingConfig:
        from adrec_assets.artifacts import resolve_root

        values: dict[str, Any] = {
            "source": source,
            "artifacts_root": Path(str(resolve_root())),
            "sources_root": settings.SOURCES_DIR.get(),
            "store_url": settings.ONLINE_STORE.get(),
            "api_token": settings.API_TOKEN.get(),
            "read_token": settings.READ_TOKEN.get(),
            "experiments_path": settings.EXPERIMENTS.get(),
        }
        for name, setting in SERVE_SETTINGS.items():
            if setting.is_set():
                values[name] = setting.get()
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        for name, setting in (("api_token", settings.API_TOKEN), ("read_token", settings.READ_TOKEN)):
            token = getattr(self, name)
            if token is not None and not (token and all("!" <= char <= "~" for char in token)):
                raise ValueError(
                    f"{name} ({setting.name}) must be visible ASCII characters without blanks: an HTTP header "
                    "carries nothing else unchanged"
                )
        if self.read_token is not None and self.api_token is None:
            raise ValueError(
                "read_token (ADREC_READ_TOKEN) needs api_token (ADREC_API_TOKEN): the reads would be closed while "
                "the writes are open"
            )
        if not self.store_timeout_seconds > 0:
            raise ValueError(
                f"store_timeout_seconds (ADREC_SERVE_STORE_TIMEOUT) must be a positive number, got "
                f"{self.store_timeout_seconds}"
            )
        if self.max_image_pixels < 1:
            raise ValueError(
                f"max_image_pixels (ADREC_SERVE_MAX_IMAGE_PIXELS) must be at least 1, got {self.max_image_pixels}"
            )
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha (ADREC_SERVE_ALPHA) must be in (0, 1], got {self.alpha}")
        if self.default_policy not in POLICIES:
            raise ValueError(f"default_policy must be one of {POLICIES}, got {self.default_policy!r}")
        if not 0 <= self.epsilon <= 1 or not 0 <= self.randomized_share <= 1:
            raise ValueError("epsilon and randomized_share must be in [0, 1]")
        if not (math.isfinite(self.fresh_prior_sd) and self.fresh_prior_sd >= 0):
            raise ValueError(
                f"fresh_prior_sd (ADREC_SERVE_FRESH_PRIOR_SD) must be a finite number >= 0, got {self.fresh_prior_sd}"
            )
        if not (math.isfinite(self.fresh_share) and 0 <= self.fresh_share <= 1):
            raise ValueError(
                f"fresh_share (ADREC_SERVE_FRESH_SHARE) must be a share in [0, 1] (1: no cap), got {self.fresh_share}"
            )
        if not (math.isfinite(self.shared_exploration) and 0 <= self.shared_exploration <= MAX_EXPLORATION):
            raise ValueError(
                f"shared_exploration (ADREC_SERVE_SHARED_EXPLORATION) must be a number in [0, {MAX_EXPLORATION:g}] "
                f"(a multiple of the posterior's sd), got {self.shared_exploration}"
            )
        if not (math.isfinite(self.fresh_rotation) and self.fresh_rotation >= 1):
            raise ValueError(
                f"fresh_rotation (ADREC_SERVE_FRESH_ROTATION) must be a number of requests >= 1, got "
                f"{self.fresh_rotation}"
            )
        if self.shared_model not in SHARED_MODELS:
            raise ValueError(
                f"shared_model (ADREC_SERVE_SHARED_MODEL) must be one of {SHARED_MODELS}, got {self.shared_model!r}"
            )
        if self.user_update not in USER_UPDATES:
            raise ValueError(
                f"user_update (ADREC_SERVE_USER_UPDATE) must be one of {USER_UPDATES}, got {self.user_update!r}"
            )
        if isinstance(self.user_rank, bool) or not isinstance(self.user_rank, int) or not 1 <= self.user_rank <= 32:
            raise ValueError(
                f"user_rank (ADREC_SERVE_USER_RANK) must be an integer from 1 to 32 (a 128-d record stays under "
                f"4 KB), got {self.user_rank!r}"
            )
        if not (math.isfinite(self.user_prior_spread) and 0 < self.user_prior_spread <= MAX_EXPLORATION):
            raise ValueError(
                f"user_prior_spread (ADREC_SERVE_USER_PRIOR_SPREAD) must be a number in (0, {MAX_EXPLORATION:g}], "
                f"got {self.user_prior_spread}"
            )
        if not (math.isfinite(self.known_user_spread) and 0 < self.known_user_spread <= 1):
            raise ValueError(
                f"known_user_spread (ADREC_SERVE_KNOWN_USER_SPREAD) must be a number in (0, 1], got "
                f"{self.known_user_spread}"
            )
        if not (math.isfinite(self.user_exploration) and 0 <= self.user_exploration <= MAX_EXPLORATION):
            raise ValueError(
                f"user_exploration (ADREC_SERVE_USER_EXPLORATION) must be a number in [0, {MAX_EXPLORATION:g}], "
                f"got {self.user_exploration}"
            )
        if self.fresh_scope not in FRESH_SCOPES:
            raise ValueError(
                f"fresh_scope (ADREC_SERVE_FRESH_SCOPE) must be one of {FRESH_SCOPES}, got {self.fresh_scope!r}"
            )
        if self.index_backend not in INDEX_BACKENDS:
            raise ValueError(
                f"index_backend (ADREC_SERVE_INDEX) must be one of {INDEX_BACKENDS}, got {self.index_backend!r}"
            )
