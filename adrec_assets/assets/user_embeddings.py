"""user_embeddings: a 128-d user space learnt only from who clicked what."""

import json
from dataclasses import asdict

import dagster as dg
import numpy as np
from pydantic import Field

from adrec_assets.assets.common import (
    PARTITIONED,
    epoch_logger,
    load_previous_output,
    refresh_metadata,
    training_metadata,
)
from adrec_assets.ml.refresh import (
    FULL_RETRAIN,
    REUSED,
    WARM_START,
    decide_users,
    graph_fingerprint,
    user_warm_init,
)
from adrec_assets.ml.training import UserTrainingParams, train_user_embeddings
from adrec_assets.ml.types import (
    ClickGraph,
    Embeddings,
    check_unit_rows,
    vectors_fingerprint,
)

_D = UserTrainingParams()


class UserEmbeddingConfig(dg.Config):
    """InfoNCE over co-click pairs; one epoch visits every co-clicked (user, ad) pair once."""

    dim: int = Field(default=_D.dim, description="User-space dimension.")
    temperature: float = Field(default=_D.temperature, description="InfoNCE temperature.")
    epochs: int = Field(default=_D.epochs, description="Passes over the co-clicked pairs (at least).")
    min_steps: int = Field(
        default=_D.min_steps, description="Raise the epochs until at least this many optimizer steps run."
    )
    batch_size: int = Field(default=_D.batch_size, description="Pairs per step (in-batch negatives).")
    lr: float = Field(default=_D.lr, description="AdamW learning rate.")
    weight_decay: float = Field(default=_D.weight_decay, description="AdamW weight decay.")
    seed: int = Field(default=_D.seed, description="Seeds init and pair sampling.")
    warm_start: bool = Field(
        default=True,
        description="Refine this partition's previous vectors when the settings are unchanged (new users start "
        "at the global mean); false = full retrain, what the nightly schedule runs.",
    )
    refresh_epochs: int = Field(default=2, description="Epochs of a warm-start refresh.")

    def to_params(self) -> UserTrainingParams:
        return UserTrainingParams(**self.model_dump(exclude={"warm_start", "refresh_epochs"}))


@dg.asset(io_manager_key="numpy_io_manager", kinds={"numpy", "pytorch"}, **PARTITIONED)
def user_embeddings(
    context: dg.AssetExecutionContext, config: UserEmbeddingConfig, click_graph: ClickGraph
) -> dg.Output[Embeddings]:
    """(n_users, dim) unit vectors keyed by user pseudonym. Users without any co-click
    neighbour get the global-mean vector (the cold-start prior) and are flagged ``isolated``.
    A re-materialization reuses, refines (warm start) or retrains the previous vectors; the
    ``training_path`` metadata says which and why (:mod:`adrec_assets.ml.refresh`)."""
    params = config.to_params()
    previous, why_none = load_previous_output(context)
    clicks_fingerprint = graph_fingerprint(click_graph)
    decision = decide_users(config.warm_start, previous, why_none, params, click_graph, clicks_fingerprint)
    context.log.info(f"user_embeddings: {decision.path} ({decision.reason})")
    if decision.path == REUSED:
        return dg.Output(
            previous,
            metadata={"n_users": len(previous), "dim": previous.dim, "user_space": previous.space,
                      **refresh_metadata(decision), "train_seconds": 0.0},
        )
    init, n_known = (None, 0) if decision.path == FULL_RETRAIN else user_warm_init(click_graph.user_ids, previous)
    result = train_user_embeddings(
        click_graph,
        params,
        epoch_logger(context, "user_embeddings"),
        init=init,
        epochs=config.refresh_epochs if decision.path == WARM_START else None,
    )
    check_unit_rows(result.vectors, f"user_embeddings[{context.partition_key}]", dim=params.dim)
    space = f"users:{vectors_fingerprint(result.vectors)}"
    embeddings = Embeddings(
        ids=click_graph.user_ids,
        vectors=result.vectors,
        space=space,
        extra={
            "isolated": result.isolated,
            # provenance: the evaluation asset and warm starts re-use exactly these settings
            "training_params": np.asarray(json.dumps(asdict(params), sort_keys=True)),
            "click_graph_fingerprint": np.asarray(clicks_fingerprint),
            "trained_by": np.asarray(decision.path),
            # the projector may only warm-start from a projector trained on this space
            "warm_started_from": np.asarray(previous.space if decision.path == WARM_START else ""),
        },
    )
    return dg.Output(
        embeddings,
        metadata={
            "n_users": len(embeddings),
            "dim": params.dim,
            "user_space": space,
            "n_isolated_users": int(result.isolated.sum()),
            "share_isolated_users": round(float(np.mean(result.isolated)), 4),
            **refresh_metadata(decision),
            "n_users_warm_started": n_known,
            "n_new_users_from_global_mean": len(embeddings) - n_known if decision.path == WARM_START else 0,
            **training_metadata(result.history),
        },
    )
