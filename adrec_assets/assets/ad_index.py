"""ad_index: every served ad in a FAISS index whose inner product is the product's score."""

import dagster as dg
import numpy as np
from pydantic import Field

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.types import ArtifactError, ProjectedAds, UserEmbeddings
from adrec_assets.online.index import AdIndex, IndexedAds, recall_at_k

RECALL_K = 10
MIN_RECALL = 0.95  # the blocking check's bar (ad_index_recall_is_high)


class AdIndexConfig(dg.Config):
    """Exact search up to ``exact_max_ads``, HNSW above it (see benchmarks/README.md)."""

    exact_max_ads: int = Field(default=100_000, description="Catalogues up to this size get an exact IndexFlatIP.")
    hnsw_m: int = Field(default=32, description="HNSW graph degree (memory and recall grow with it).")
    ef_construction: int = Field(default=200, description="HNSW build-time beam width.")
    ef_search: int = Field(default=128, description="HNSW query-time beam width (recall vs latency).")
    recall_users: int = Field(default=500, description="Real users sampled to measure recall@10 against exact search.")
    seed: int = Field(default=0, description="Seeds the HNSW levels and the user sample.")


@dg.asset(kinds={"faiss"}, **PARTITIONED)
def ad_index(
    context: dg.AssetExecutionContext, config: AdIndexConfig, served_ads: ProjectedAds, served_users: UserEmbeddings
) -> dg.Output[IndexedAds]:
    """Each ad stored as ``[p_a, score_bias_a]``, so the query ``[u, 1]`` scores
    ``u . p_a + score_bias_a`` (and an exploration policy's folded query ``[theta_u * u, theta_b]``
    its own score) in one inner-product search. Recall@10 is measured on a seeded sample of
    the partition's own users against exact search."""
    if served_ads.space != served_users.space:
        raise ArtifactError(
            f"ad_index[{context.partition_key}]: served_ads lives in {served_ads.space!r} but served_users "
            f"in {served_users.space!r}; re-materialize the pipeline so both come from one run"
        )
    with stopwatch() as timing:
        index = AdIndex.build(
            served_ads.ids.tolist(),
            served_ads.vectors,
            served_ads.score_bias,
            exact_max_ads=config.exact_max_ads,
            hnsw_m=config.hnsw_m,
            ef_construction=config.ef_construction,
            ef_search=config.ef_search,
            seed=config.seed,
        )
    trained = served_users.trained_vectors()
    rng = np.random.default_rng(config.seed)
    sample = trained[rng.choice(len(trained), size=min(config.recall_users, len(trained)), replace=False)]
    queries = np.concatenate([sample, np.ones((len(sample), 1), np.float32)], axis=1).astype(np.float32)
    with stopwatch() as recall_timing:
        recall = recall_at_k(index, queries, RECALL_K)
    indexed = IndexedAds(index, served_ads.space, served_ads.encoder_id, round(float(recall), 6))
    return dg.Output(
        indexed,
        metadata={
            "kind": index.kind,
            "n_ads": len(index),
            "build_seconds": round(timing["seconds"], 3),
            "bytes": index.nbytes,
            f"recall_at_{RECALL_K}": indexed.recall_at_10,
            "recall_users": len(sample),
            "recall_seconds": round(recall_timing["seconds"], 3),
            "params": dg.MetadataValue.json(index.params),
            "user_space": indexed.space,
        },
    )
