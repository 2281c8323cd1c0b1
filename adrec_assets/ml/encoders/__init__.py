"""Frozen ad encoders behind one interface (:class:`AdEncoder`) and a name -> builder registry.

New encoders (Jina CLIP v2, ...) register a builder here; callers only ever use
:func:`build_encoder` and the interface, so swapping encoders is a config change.
"""

from __future__ import annotations

from collections.abc import Callable

from adrec_assets.ml.encoders.base import AD_EMBEDDING_DIM, AdEncoder, EncodeResult


def _build_offline(**kwargs) -> AdEncoder:
    from adrec_assets.ml.encoders.offline import OfflineEncoder

    return OfflineEncoder(**kwargs)


ENCODER_BUILDERS: dict[str, Callable[..., AdEncoder]] = {"offline": _build_offline}


def build_encoder(name: str, **kwargs) -> AdEncoder:
    try:
        builder = ENCODER_BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown encoder {name!r}; choose one of {sorted(ENCODER_BUILDERS)}"
        ) from None
    return builder(**kwargs)


__all__ = ["AD_EMBEDDING_DIM", "AdEncoder", "EncodeResult", "ENCODER_BUILDERS", "build_encoder"]
