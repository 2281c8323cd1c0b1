"""user_embeddings: a 128-d user space learnt only from who clicked what."""

from dataclasses import asdict

import dagster as dg
import numpy as np

from adrec_assets.assets.common import (
    PARTITIONED,
    epoch_logger,
    load_previous_output,
    params_config,
    refresh_metadata,
    training_metadata,
)
from adrec_assets.ml.params import UserTrainingParams
from adrec_assets.ml.refresh import (
    REUSED,
    WARM_START,
    decide,
    graph_fingerprint,
    known_users,
    user_warm_init,
)
from adrec_assets.ml.training import train_user_embeddings
from adrec_assets.ml.types import (
    ClickGraph,
    TrainingProvenance,
    UserEmbeddings,
    check_unit_rows,
    vectors_fingerprint,
)
from adrec_assets.resources import ArtifactStoreResource

UserEmbeddingConfig = params_config(UserTrainingParams, "UserEmbeddingConfig")


@dg.asset(kinds={"numpy", "pytorch"}, **PARTITIONED)
def user_embeddings(
    context: dg.AssetExecutionContext,
    config: UserEmbeddingConfig,
    artifacts: ArtifactStoreResource,
    click_graph: ClickGraph,
) -> dg.Output[UserEmbeddings]:
    """(n_users, dim) unit vectors keyed by user pseudonym. Users without any co-click
    neighbour get the global-mean vector (the cold-start prior) and are flagged ``isolated``.
    A re-materialization reuses, refines (warm start) or retrains the previous vectors; the
    ``training_path`` metadata says which and why (:mod:`adrec_assets.ml.refresh`)."""
    params = config.to_params()
    previous, why_none = load_previous_output(context, artifacts)
    clicks_fingerprint = graph_fingerprint(click_graph)
    decision = decide(
        previous.provenance if previous is not None else None,
        asdict(params),
        clicks_fingerprint,
        config.warm_start,
        lambda: known_users(click_graph, previous),
        why_none,
    )
    context.log.info(f"user_embeddings: {decision.path} ({decision.reason})")
    if decision.path == REUSED:
        return dg.Output(
            previous,
            metadata={"n_users": len(previous), "dim": previous.dim, "user_space": previous.space,
                      **refresh_metadata(decision), "train_seconds": 0.0},
        )  # fmt: skip
    warm = decision.path == WARM_START
    init, n_known = user_warm_init(click_graph.user_ids, previous) if warm else (None, 0)
    result = train_user_embeddings(
        click_graph,
        params,
        epoch_logger(context, "user_embeddings"),
        init=init,
        epochs=config.refresh_epochs if warm else None,
    )
    check_unit_rows(result.vectors, f"user_embeddings[{context.partition_key}]", dim=params.dim)
    space = f"users:{vectors_fingerprint(result.vectors)}"
    embeddings = UserEmbeddings(
        ids=click_graph.user_ids,
        vectors=result.vectors,
        space=space,
        isolated=result.isolated,
        # the evaluation and later refreshes read exactly these settings and inputs back;
        # the projector may only warm-start from a projector trained on ``warm_started_from``
        provenance=TrainingProvenance(
            asdict(params), clicks_fingerprint, decision.path, previous.space if warm else ""
        ),
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
            "n_new_users_from_global_mean": len(embeddings) - n_known if warm else 0,
            **training_metadata(result.history),
        },
    )
