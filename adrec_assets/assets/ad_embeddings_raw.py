"""ad_embeddings_raw: every ad of the catalogue through the frozen content encoder."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.encoders.cache import encode_with_cache
from adrec_assets.ml.types import AdCatalog, ContentEmbeddings, check_unit_rows
from adrec_assets.resources import EncoderResource


@dg.asset(kinds={"numpy", "pytorch"}, **PARTITIONED)
def ad_embeddings_raw(
    context: dg.AssetExecutionContext, encoder: EncoderResource, raw_ads: AdCatalog
) -> dg.Output[ContentEmbeddings]:
    """(n_ads, 768) float32, L2-normalized, rows aligned with ``ids``; records the encoder id
    so vectors from different encoders are never combined downstream. Ads whose text, image
    bytes and encoder are unchanged since an earlier run come from the encoding cache."""
    with stopwatch() as load_timing:
        model = encoder.get()
    cache = encoder.encoding_cache()
    cached = encode_with_cache(
        model,
        list(raw_ads.texts),
        [p or None for p in raw_ads.image_paths],
        cache,
        image_root=raw_ads.image_root or None,
        max_image_bytes=encoder.max_image_bytes,
    )
    result = cached.result
    context.log.info(
        f"{cached.n_encoded} ads encoded, {cached.n_cache_hits} from the encoding cache ({cached.cache_path or 'off'})"
    )
    check_unit_rows(result.vectors, f"ad_embeddings_raw[{context.partition_key}]", dim=model.dim)
    for row, path, reason in result.image_failures[:20]:
        context.log.warning(f"ad {raw_ads.ad_ids[row]}: image {path} not used ({reason}); text only")
    embeddings = ContentEmbeddings(
        ids=raw_ads.ad_ids, vectors=result.vectors, encoder_id=model.encoder_id, has_image=result.has_image
    )
    seconds = cached.encode_seconds
    return dg.Output(
        embeddings,
        metadata={
            "encoder_id": model.encoder_id,
            "encoder_selection": getattr(model, "selection_reason", ""),
            "dim": model.dim,
            "n_ads": len(embeddings),
            "n_ads_with_image": int(np.count_nonzero(result.has_image)),
            "n_image_failures": result.n_image_failures,
            "n_cache_hits": cached.n_cache_hits,
            "n_encoded": cached.n_encoded,
            "encoding_cache": str(cached.cache_path) if cached.cache_path is not None else "off",
            "encoder_load_seconds": round(load_timing["seconds"], 3),
            "encode_seconds": round(seconds, 3),  # inside the encoder only
            "cache_seconds": round(cached.cache_seconds, 3),  # content hashing + cache read/write
            # Throughput of the encoder itself: only the ads it encoded, over the time it took
            # (cache hits cost no encoder time, counting them would inflate the rate).
            "ads_per_second": round(cached.n_encoded / seconds, 1) if seconds > 0 else 0.0,
        },
    )
