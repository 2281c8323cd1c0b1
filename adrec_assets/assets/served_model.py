"""served_users + served_ads: the users and ads the service ranks with, fitted together."""

import json
from dataclasses import asdict

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, params_config, stopwatch
from adrec_assets.ml.params import AdRefitParams, UserRefitParams
from adrec_assets.ml.refresh import REUSED, fingerprint, graph_fingerprint
from adrec_assets.ml.served_model import fit_served_model
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
from adrec_assets.resources import ArtifactStoreResource

UserRefitConfig = params_config(UserRefitParams, "UserRefitConfig", base=dg.Config)
AdRefitConfig = params_config(AdRefitParams, "AdRefitConfig", base=dg.Config)


class ServedModelConfig(dg.Config):
    """The user refit against the projections, and the ad refit alternated with user steps."""

    users: UserRefitConfig = UserRefitConfig()
    ads: AdRefitConfig = AdRefitConfig()
    reuse: bool = True  # return the previous snapshot's fit when its inputs and settings are unchanged


def served_inputs_fingerprint(
    click_graph: ClickGraph,
    user_embeddings: UserEmbeddings,
    ad_projected: ProjectedAds,
    user_params: UserRefitParams,
    ad_params: AdRefitParams,
) -> str:
    """Content hash of everything the served fit reads: clicks, user vectors (ids, space,
    isolated flags), every ad's projection and bias (ids, space, encoder) and both settings."""
    return fingerprint(
        np.asarray(graph_fingerprint(click_graph)),
        user_embeddings.ids, user_embeddings.vectors, user_embeddings.isolated, np.asarray(user_embeddings.space),
        ad_projected.ids, ad_projected.vectors, ad_projected.score_bias, np.asarray(ad_projected.space),
        np.asarray(ad_projected.encoder_id),
        np.asarray(json.dumps([asdict(user_params), asdict(ad_params)], sort_keys=True)),
    )  # fmt: skip


def previous_served_model(
    context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource
) -> tuple[UserEmbeddings | None, ProjectedAds | None, str]:
    """(served_users, served_ads, note) of the snapshot this run builds on; (None, None, why)
    when there is none or either is unreadable (reuse is an optimization: the caller fits)."""
    store = artifacts.store(context.partition_key)
    base = store.base_of(context.run_id)
    if base is None:
        return None, None, "no previous materialization of this partition"
    snapshot = store.snapshot(base)
    if not {"served_users", "served_ads"} <= set(snapshot.artifacts):
        return None, None, f"the published snapshot {base} has no served model"
    try:
        return store.load("served_users", snapshot), store.load("served_ads", snapshot), f"published snapshot {base}"
    except Exception as exc:  # noqa: BLE001 - unreadable means: fit again, and say why
        context.log.warning(f"served model of snapshot {base} not reusable: {exc}")
        return None, None, f"served model of snapshot {base} unreadable ({type(exc).__name__})"


@dg.multi_asset(
    outs={
        "served_users": dg.AssetOut(
            kinds={"numpy"}, description="The user vectors the service ranks with (unit rows)."
        ),
        "served_ads": dg.AssetOut(
            kinds={"numpy"},
            description="Every catalogue ad as served: ads with clicks pulled from their projection toward their "
            "clickers, ads without clicks exactly as projected.",
        ),
    },
    **PARTITIONED,
)
def served_model(
    context: dg.AssetExecutionContext,
    config: ServedModelConfig,
    artifacts: ArtifactStoreResource,
    click_graph: ClickGraph,
    user_embeddings: UserEmbeddings,
    ad_projected: ProjectedAds,
) -> tuple[dg.Output[UserEmbeddings], dg.Output[ProjectedAds]]:
    """Users refitted to the projections, then ads with clicks and users alternately fitted to
    each other, each ad's prior mean its content projection (``adrec_assets.ml.served_model``).
    Score = ``u . v_a + score_bias_a`` for the index, the service, the ``Recommender``, the
    policy posterior and the evaluation alike.

    When the content hash of the inputs and settings (:func:`served_inputs_fingerprint`,
    recorded as ``served_users``' provenance) equals the previous snapshot's, both previous
    artifacts are returned as they are (``fit_path`` ``reused``) and nothing is fitted."""
    key = context.partition_key
    if len(user_embeddings) != click_graph.n_users or (user_embeddings.ids != click_graph.user_ids).any():
        raise ArtifactError(
            f"served_model[{key}]: user_embeddings does not match click_graph (different users); "
            "re-materialize user_embeddings for this partition first"
        )
    if ad_projected.space != user_embeddings.space:
        raise ArtifactError(
            f"served_model[{key}]: ad_projected lives in {ad_projected.space!r} but user_embeddings in "
            f"{user_embeddings.space!r}; re-materialize projector and ad_projected after user_embeddings"
        )
    rows = align_rows(
        ad_projected.ids, click_graph.ad_ids,
        f"served_model[{key}]: clicked ads missing from ad_projected (re-materialize raw_ads and ad_projected)",
    )  # fmt: skip
    user_params, ad_params = config.users.to_params(), config.ads.to_params()
    inputs = served_inputs_fingerprint(click_graph, user_embeddings, ad_projected, user_params, ad_params)
    reused = _reusable(context, config, artifacts, inputs, user_params, ad_params)
    if reused is not None:
        return reused
    projected = ad_projected.vectors[rows]
    with stopwatch() as timing:
        model = fit_served_model(
            click_graph, user_embeddings.vectors, projected, ad_projected.score_bias[rows], user_params, ad_params
        )
    check_unit_rows(model.users, f"served_users[{key}]", dim=user_embeddings.dim)
    vectors, bias = ad_projected.vectors.copy(), ad_projected.score_bias.copy()
    vectors[rows], bias[rows] = model.ads.vectors, model.ads.score_bias
    if not (np.isfinite(vectors).all() and np.isfinite(bias).all()):
        raise ArtifactError(
            f"served_ads[{key}]: non-finite ad vectors; check the ad refit settings {asdict(ad_params)}"
        )
    users = UserEmbeddings(
        user_embeddings.ids,
        model.users,
        user_embeddings.space,
        user_embeddings.isolated,
        TrainingProvenance(
            asdict(user_params),
            inputs,
            FULL_RETRAIN,
        ),
    )
    ads = ProjectedAds(
        ad_projected.ids, vectors, ad_projected.space, ad_projected.encoder_id, bias, json.dumps(asdict(ad_params))
    )
    warm = rows[model.ads.refitted]
    toward = np.einsum("ij,ij->i", vectors[warm], ad_projected.vectors[warm])
    norms = np.linalg.norm(vectors[warm], axis=1)
    moved = np.einsum("ij,ij->i", model.users, user_embeddings.vectors)
    seconds = round(timing["seconds"], 3)
    return (
        dg.Output(
            users,
            output_name="served_users",
            metadata={
                "n_users": len(users),
                "n_users_refitted": int((click_graph.indptr[1:] > click_graph.indptr[:-1]).sum()),
                "fit_seconds": seconds,
                "fit_path": "fitted",
                "inputs_fingerprint": inputs,
                "mean_cosine_to_user_embeddings": round(float(moved.mean()), 4) if len(moved) else 1.0,
                "user_space": users.space,
                **{f"refit_{name}": value for name, value in asdict(user_params).items()},
            },
        ),
        dg.Output(
            ads,
            output_name="served_ads",
            metadata={
                "n_ads": len(ads),
                "n_ads_refitted": len(warm),
                "n_ads_kept_projection": len(ads) - len(warm),
                "projection_scale": round(model.ads.scale, 5),
                "mean_cosine_to_projection": round(float((toward / np.maximum(norms, 1e-12)).mean()), 4)
                if len(warm)
                else 1.0,
                "mean_norm_refitted": round(float(norms.mean()), 4) if len(warm) else 0.0,
                "fit_seconds": seconds,
                "fit_path": "fitted",
                "user_space": ads.space,
                **{f"refit_{name}": value for name, value in asdict(ad_params).items()},
            },
        ),
    )


def _reusable(
    context: dg.AssetExecutionContext,
    config: ServedModelConfig,
    artifacts: ArtifactStoreResource,
    inputs: str,
    user_params: UserRefitParams,
    ad_params: AdRefitParams,
) -> tuple[dg.Output[UserEmbeddings], dg.Output[ProjectedAds]] | None:
    """The previous snapshot's served model as this run's outputs when it was fitted from
    exactly these inputs and settings; None (fit again) otherwise, with the reason logged."""
    if not config.reuse:
        context.log.info("served_model: fitting (reuse=false)")
        return None
    users, ads, note = previous_served_model(context, artifacts)
    if users is None or ads is None:
        context.log.info(f"served_model: fitting ({note})")
        return None
    same = (
        users.provenance.inputs_fingerprint == inputs
        and dict(users.provenance.params) == asdict(user_params)
        and ads.refit_params == json.dumps(asdict(ad_params))
    )
    if not same:
        context.log.info(f"served_model: fitting (inputs or settings differ from {note})")
        return None
    context.log.info(f"served_model: {REUSED} ({note}: same inputs and settings)")
    common = {"fit_path": REUSED, "fit_path_reason": f"same inputs and settings as {note}", "fit_seconds": 0.0}
    return (
        dg.Output(
            users,
            output_name="served_users",
            metadata={"n_users": len(users), "user_space": users.space, "inputs_fingerprint": inputs, **common},
        ),
        dg.Output(ads, output_name="served_ads", metadata={"n_ads": len(ads), "user_space": ads.space, **common}),
    )
