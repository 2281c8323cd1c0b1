"""served_users: the user vectors the service ranks with, refitted against the projected ads."""

from dataclasses import asdict

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, params_config, stopwatch
from adrec_assets.ml.params import UserRefitParams
from adrec_assets.ml.refresh import fingerprint, graph_fingerprint
from adrec_assets.ml.types import (
    FULL_RETRAIN,
    ArtifactError,
    ClickGraph,
    ProjectedAds,
    TrainingProvenance,
    UserEmbeddings,
    align_rows,
    check_unit_rows,
)
from adrec_assets.ml.user_refit import refit_users

UserRefitConfig = params_config(UserRefitParams, "UserRefitConfig", base=dg.Config)


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def served_users(
    context: dg.AssetExecutionContext,
    config: UserRefitConfig,
    click_graph: ClickGraph,
    user_embeddings: UserEmbeddings,
    ad_projected: ProjectedAds,
) -> dg.Output[UserEmbeddings]:
    """Each user's InfoNCE vector mixed with one implicit-ALS step fitted to the projections
    of the ads they clicked (``adrec_assets.ml.user_refit``): cold ads exist only as
    projections, so users fitted to that space rank them better. Same users, same space;
    recomputed in closed form on every run (about 30 s for 1M users and 10M clicks on two cores)."""
    key = context.partition_key
    if len(user_embeddings) != click_graph.n_users or (user_embeddings.ids != click_graph.user_ids).any():
        raise ArtifactError(
            f"served_users[{key}]: user_embeddings does not match click_graph (different users); "
            "re-materialize user_embeddings for this partition first"
        )
    if ad_projected.space != user_embeddings.space:
        raise ArtifactError(
            f"served_users[{key}]: ad_projected lives in {ad_projected.space!r} but user_embeddings in "
            f"{user_embeddings.space!r}; re-materialize projector and ad_projected after user_embeddings"
        )
    rows = align_rows(
        ad_projected.ids, click_graph.ad_ids,
        f"served_users[{key}]: clicked ads missing from ad_projected (re-materialize raw_ads and ad_projected)",
    )  # fmt: skip
    params = config.to_params()
    projected = ad_projected.vectors[rows]
    with stopwatch() as timing:
        vectors = refit_users(click_graph, user_embeddings.vectors, projected, params)
    check_unit_rows(vectors, f"served_users[{key}]", dim=user_embeddings.dim)
    served = UserEmbeddings(
        user_embeddings.ids,
        vectors,
        user_embeddings.space,
        user_embeddings.isolated,
        TrainingProvenance(
            asdict(params), fingerprint(np.asarray(graph_fingerprint(click_graph)), user_embeddings.vectors, projected),
            FULL_RETRAIN,
        ),
    )
    moved = np.einsum("ij,ij->i", vectors, user_embeddings.vectors)
    return dg.Output(
        served,
        metadata={
            "n_users": len(served),
            "n_users_refitted": int((click_graph.indptr[1:] > click_graph.indptr[:-1]).sum()),
            "refit_seconds": round(timing["seconds"], 3),
            "mean_cosine_to_user_embeddings": round(float(moved.mean()), 4) if len(moved) else 1.0,
            "user_space": served.space,
            **{f"refit_{name}": value for name, value in asdict(params).items()},
        },
    )
