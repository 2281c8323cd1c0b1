"""ad_embeddings_raw: every ad of the catalogue through the frozen content encoder."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.types import AdCatalog, Embeddings, check_unit_rows
from adrec_assets.resources import EncoderResource


@dg.asset(io_manager_key="numpy_io_manager", kinds={"numpy", "pytorch"}, **PARTITIONED)
def ad_embeddings_raw(
    context: dg.AssetExecutionContext, encoder: EncoderResource, raw_ads: AdCatalog
) -> dg.Output[Embeddings]:
    """(n_ads, 768) float32, L2-normalized, rows aligned with ``ids``; records the encoder id
    so vectors from different encoders are never combined downstream."""
    with stopwatch() as load_timing:
        model = encoder.get()
    with stopwatch() as timing:
        result = model.encode(list(raw_ads.texts), [p or None for p in raw_ads.image_paths])
    check_unit_rows(result.vectors, f"ad_embeddings_raw[{context.partition_key}]", dim=model.dim)
    for row, path, reason in result.image_failures[:20]:
        context.log.warning(f"ad {raw_ads.ad_ids[row]}: image {path} not used ({reason}); text only")
    embeddings = Embeddings(
        ids=raw_ads.ad_ids,
        vectors=result.vectors,
        space=f"content:{model.encoder_id}",
        encoder_id=model.encoder_id,
        extra={"has_image": result.has_image},
    )
    seconds = timing["seconds"]
    return dg.Output(
        embeddings,
        metadata={
            "encoder_id": model.encoder_id,
            "encoder_selection": getattr(model, "selection_reason", ""),
            "dim": model.dim,
            "n_ads": len(embeddings),
            "n_ads_with_image": int(np.count_nonzero(result.has_image)),
            "n_image_failures": result.n_image_failures,
            "encoder_load_seconds": round(load_timing["seconds"], 3),
            "encode_seconds": round(seconds, 3),
            "ads_per_second": round(len(embeddings) / seconds, 1) if seconds > 0 else 0.0,
        },
    )
