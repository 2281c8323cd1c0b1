"""ad_index: every served ad in a FAISS index whose inner product is the product's score."""

import json

import dagster as dg
import numpy as np
from pydantic import Field

from adrec_assets.assets.common import PARTITIONED, load_previous_output, stopwatch
from adrec_assets.ml.refresh import fingerprint
from adrec_assets.ml.types import ArtifactError, ProjectedAds, UserEmbeddings
from adrec_assets.online.index import ANN_KINDS, IVF, AdIndex, IndexedAds, recall_at_k
from adrec_assets.resources import ArtifactStoreResource

RECALL_K = 10
MIN_RECALL = 0.95  # the blocking check's bar (ad_index_recall_is_high)
#: What the build settings are hashed with: bump when the build itself changes meaning.
INDEX_BUILD_VERSION = 1


class AdIndexConfig(dg.Config):
    """Exact search up to ``exact_max_ads``, ``ann`` (IVF or HNSW) above it (see benchmarks/README.md)."""

    exact_max_ads: int = Field(default=100_000, description="Catalogues up to this size get an exact IndexFlatIP.")
    ann: str = Field(
        default=IVF,
        description="The approximate index above exact_max_ads: 'ivf' (k-means lists, builds in about a minute at "
        "1M ads, nprobe tuned to ivf_recall_target) or 'hnsw' (a graph; ~18 min to build at 1M ads, 2 cores).",
    )
    hnsw_m: int = Field(default=32, description="HNSW graph degree (memory and recall grow with it).")
    ef_construction: int = Field(default=200, description="HNSW build-time beam width.")
    ef_search: int = Field(default=128, description="HNSW query-time beam width (recall vs latency).")
    ivf_nlist: int = Field(default=0, description="IVF lists; 0 = about sqrt(n_ads).")
    ivf_train_per_list: int = Field(default=64, description="IVF k-means training rows sampled per list.")
    ivf_recall_target: float = Field(
        default=0.97,
        description="IVF nprobe = the smallest whose recall@10 on a sample of real users reaches this "
        "(a separate sample then measures the recall the blocking check judges, against 0.95).",
    )
    recall_users: int = Field(default=500, description="Real users sampled to measure recall@10 against exact search.")
    seed: int = Field(default=0, description="Seeds the HNSW levels, the IVF k-means and the user samples.")
    reuse: bool = Field(
        default=True,
        description="Reuse the previous snapshot's index when the ads and these settings are unchanged "
        "(content hash); false = always rebuild.",
    )


def _build_settings(config: AdIndexConfig) -> dict[str, object]:
    """What an index's content depends on besides the ads (not the user samples)."""
    return {
        "version": INDEX_BUILD_VERSION,
        **config.model_dump(include={"exact_max_ads", "ann", "hnsw_m", "ef_construction", "ef_search", "ivf_nlist",
                                     "ivf_train_per_list", "seed"}),
    }  # fmt: skip


def index_inputs_fingerprint(ads: ProjectedAds, config: AdIndexConfig) -> str:
    """Content hash of an index's inputs: ad ids, rows, biases, space, encoder and build settings."""
    return fingerprint(
        ads.ids, ads.vectors, ads.score_bias, np.asarray(ads.space), np.asarray(ads.encoder_id),
        np.asarray(json.dumps(_build_settings(config), sort_keys=True)),
    )  # fmt: skip


def user_queries(users: UserEmbeddings, config: AdIndexConfig) -> tuple[np.ndarray, np.ndarray]:
    """(check, tune): ``[u, 1]`` rows of two seeded samples of the trained users, disjoint when
    there are enough users. ``check`` measures the recall the blocking check judges; ``tune``
    picks IVF's nprobe, so the judged figure is not the one the tuning was fitted to."""
    trained = users.trained_vectors()
    rng = np.random.default_rng(config.seed)
    check = rng.choice(len(trained), size=min(config.recall_users, len(trained)), replace=False)
    rest = np.setdiff1d(np.arange(len(trained)), check)
    if len(rest) == 0:  # too few users for two samples: tune on the same ones
        rest = check
    tune = np.random.default_rng([config.seed, 1]).choice(rest, size=min(config.recall_users, len(rest)), replace=False)

    def rows(pick: np.ndarray) -> np.ndarray:
        return np.concatenate([trained[pick], np.ones((len(pick), 1), np.float32)], axis=1).astype(np.float32)

    return rows(check), rows(tune)


@dg.asset(kinds={"faiss"}, **PARTITIONED)
def ad_index(
    context: dg.AssetExecutionContext,
    config: AdIndexConfig,
    artifacts: ArtifactStoreResource,
    served_ads: ProjectedAds,
    served_users: UserEmbeddings,
) -> dg.Output[IndexedAds]:
    """Each ad stored as ``[p_a, score_bias_a]``, so the query ``[u, 1]`` scores
    ``u . p_a + score_bias_a`` (and an exploration policy's folded query ``[theta_u * u, theta_b]``
    its own score) in one inner-product search. Recall@10 is measured on a seeded sample of
    the partition's own users against exact search; an IVF index's ``nprobe`` is the smallest
    reaching ``ivf_recall_target`` on another sample.

    Reuse: when the ads and build settings hash to the previous snapshot's index's
    ``inputs_fingerprint``, that index is taken instead of building one (``index_path``
    ``reused``); with the same user samples too, the artifact is returned unchanged."""
    if served_ads.space != served_users.space:
        raise ArtifactError(
            f"ad_index[{context.partition_key}]: served_ads lives in {served_ads.space!r} but served_users "
            f"in {served_users.space!r}; re-materialize the pipeline so both come from one run"
        )
    if config.ann not in ANN_KINDS:
        raise ArtifactError(f"ad_index: ann must be one of {list(ANN_KINDS)}, got {config.ann!r}")
    inputs = index_inputs_fingerprint(served_ads, config)
    queries, tune_queries = user_queries(served_users, config)
    recall_inputs = fingerprint(queries, tune_queries, np.asarray(config.ivf_recall_target))
    previous, why_none = load_previous_output(context, artifacts) if config.reuse else (None, "reuse=false")
    reused = previous is not None and previous.inputs_fingerprint == inputs
    path_reason = (
        "same ads and build settings as the previous index" if reused
        else why_none if previous is None else "the ads or the build settings changed"
    )  # fmt: skip
    context.log.info(f"ad_index: {'reused' if reused else 'built'} ({path_reason})")
    tuned: tuple[int, float] | None = None
    seconds = {"build_seconds": 0.0, "tune_seconds": 0.0, "recall_seconds": 0.0}
    if reused and previous.recall_fingerprint == recall_inputs:
        indexed = previous
    else:
        with stopwatch() as timing:
            if reused:
                index = previous.index
            else:
                index = AdIndex.build(
                    served_ads.ids.tolist(), served_ads.vectors, served_ads.score_bias,
                    **config.model_dump(include={"exact_max_ads", "ann", "hnsw_m", "ef_construction", "ef_search",
                                                 "ivf_nlist", "ivf_train_per_list", "seed"}),
                )  # fmt: skip
        seconds["build_seconds"] = timing["seconds"] if not reused else 0.0
        with stopwatch() as timing:
            if index.kind == IVF:
                tuned = index.tune_nprobe(tune_queries, RECALL_K, config.ivf_recall_target)
        seconds["tune_seconds"] = timing["seconds"]
        with stopwatch() as timing:
            recall = recall_at_k(index, queries, RECALL_K)
        seconds["recall_seconds"] = timing["seconds"]
        indexed = IndexedAds(
            index, served_ads.space, served_ads.encoder_id, round(float(recall), 6), inputs, recall_inputs
        )
    index = indexed.index
    return dg.Output(
        indexed,
        metadata={
            "kind": index.kind,
            "n_ads": len(index),
            "index_path": "reused" if reused else "built",
            "index_path_reason": path_reason,
            **{key: round(value, 3) for key, value in seconds.items()},
            "bytes": index.nbytes,
            f"recall_at_{RECALL_K}": indexed.recall_at_10,
            "recall_users": len(queries),
            "nprobe_tuning": dg.MetadataValue.json({"nprobe": tuned[0], "tune_recall": round(tuned[1], 6)})
            if tuned
            else dg.MetadataValue.json({}),
            "params": dg.MetadataValue.json(index.params),
            "inputs_fingerprint": indexed.inputs_fingerprint,
            "user_space": indexed.space,
        },
    )
