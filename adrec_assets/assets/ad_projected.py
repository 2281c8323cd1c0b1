"""ad_projected: every ad of the catalogue, clicked or brand-new, in the user space."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.training import project_with_bias
from adrec_assets.ml.types import AdCatalog, ArtifactError, ContentEmbeddings, ProjectedAds, align_rows, check_unit_rows


@dg.asset(kinds={"numpy", "pytorch"}, **PARTITIONED)
def ad_projected(
    context: dg.AssetExecutionContext,
    raw_ads: AdCatalog,
    ad_embeddings_raw: ContentEmbeddings,
    projector: TrainedProjector,
) -> dg.Output[ProjectedAds]:
    """(n_ads, 128) unit vectors plus a per-ad ``score_bias`` (popularity_weight x the
    content-predicted popularity z-score); score = cos(user, projected ad) + score_bias.
    Inputs: each ad's content vector and its structured fields (from ``raw_ads``)."""
    if projector.encoder_id != ad_embeddings_raw.encoder_id:
        raise ArtifactError(
            f"ad_projected[{context.partition_key}]: projector was trained on encoder "
            f"{projector.encoder_id!r} but ad_embeddings_raw comes from {ad_embeddings_raw.encoder_id!r}; "
            "re-materialize projector so both use the same encoder"
        )
    rows = align_rows(
        raw_ads.ad_ids, ad_embeddings_raw.ids,
        f"ad_projected[{context.partition_key}]: ads of ad_embeddings_raw missing from raw_ads; re-materialize ad_embeddings_raw",
    )  # fmt: skip
    cells = raw_ads.fields.take(rows).cells
    with stopwatch() as timing:
        vectors, bias = project_with_bias(projector.model, ad_embeddings_raw.vectors, cells)
    check_unit_rows(vectors, f"ad_projected[{context.partition_key}]", dim=projector.model.out_dim)
    if not np.isfinite(bias).all():
        raise ArtifactError(f"ad_projected[{context.partition_key}]: non-finite score_bias; re-materialize projector")
    projected = ProjectedAds(
        ids=ad_embeddings_raw.ids,
        vectors=vectors,
        space=projector.user_space,
        encoder_id=projector.encoder_id,
        score_bias=bias.astype(np.float32),
    )
    return dg.Output(
        projected,
        metadata={
            "n_ads": len(projected),
            "dim": projected.dim,
            "user_space": projected.space,
            "encoder_id": projected.encoder_id,
            "project_seconds": round(timing["seconds"], 4),
            "popularity_weight": projector.params.popularity_weight,
            "score_bias_range": f"[{bias.min():+.3f}, {bias.max():+.3f}]" if len(bias) else "empty",
            "mean_pairwise_cosine_sample": round(float(_mean_cosine(vectors)), 4),
        },
    )


def _mean_cosine(vectors: np.ndarray, sample: int = 2000) -> float:
    """Collapse detector: a projector mapping every ad to one point scores near 1."""
    v = vectors[:sample]
    if len(v) < 2:
        return 1.0
    sims = v @ v.T
    return (sims.sum() - np.trace(sims)) / (len(v) * (len(v) - 1))
