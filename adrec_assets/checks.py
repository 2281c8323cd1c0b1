"""Blocking data-quality checks: a failing check stops downstream assets in the same run.

The assets already refuse to write non-finite or non-unit vectors (see
``check_unit_rows``); these checks make the same properties visible in the UI and guard
artifacts written by anything else (an older version, a manual copy).
"""

from __future__ import annotations

import dagster as dg
import numpy as np

from adrec_assets.abtest.report import ExperimentReports
from adrec_assets.abtest.stats import SRM_P_THRESHOLD
from adrec_assets.assets.ad_embeddings_raw import ad_embeddings_raw
from adrec_assets.assets.ad_index import MIN_RECALL, RECALL_K, ad_index
from adrec_assets.assets.ad_projected import ad_projected
from adrec_assets.assets.click_graph import click_graph
from adrec_assets.assets.experiment_report import experiment_report
from adrec_assets.assets.global_mean import global_mean
from adrec_assets.assets.policy_posterior import policy_posterior
from adrec_assets.assets.position_bias import position_bias
from adrec_assets.assets.raw_ads import raw_ads
from adrec_assets.assets.user_embeddings import user_embeddings
from adrec_assets.ml.encoders import AD_EMBEDDING_DIM
from adrec_assets.ml.types import (
    AdCatalog,
    ClickGraph,
    ContentEmbeddings,
    GlobalMean,
    ProjectedAds,
    UserEmbeddings,
    isin_ids,
)
from adrec_assets.online.index import IndexedAds
from adrec_assets.online.position_bias import PositionBias
from adrec_assets.online.posterior import PolicyPosterior
from adrec_assets.partitions import click_source_partitions
from adrec_assets.privacy import PSEUDONYM_PATTERN


def unit_rows_result(vectors: np.ndarray, dim: int | None, ids: np.ndarray | None = None) -> dg.AssetCheckResult:
    norms = np.linalg.norm(vectors, axis=1) if vectors.ndim == 2 and len(vectors) else np.zeros(0)
    n_nonfinite = int((~np.isfinite(vectors)).any(axis=-1).sum()) if vectors.size else 0
    max_norm_error = float(np.nanmax(np.abs(norms - 1.0))) if len(norms) else 0.0
    n_duplicate_ids = int(len(ids) - len(np.unique(ids))) if ids is not None else 0
    dim_ok = dim is None or (vectors.ndim == 2 and vectors.shape[1] == dim)
    passed = n_nonfinite == 0 and max_norm_error <= 1e-4 and dim_ok and n_duplicate_ids == 0 and len(norms) > 0
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "n_rows": len(norms),
            "shape": str(tuple(vectors.shape)),
            "expected_dim": dim if dim is not None else "any",
            "n_rows_with_nan_or_inf": n_nonfinite,
            "max_norm_error": max_norm_error,
            "n_duplicate_ids": n_duplicate_ids,
        },
    )


@dg.asset_check(asset=ad_embeddings_raw, blocking=True, partitions_def=click_source_partitions)
def ad_embeddings_are_unit_768(ad_embeddings_raw: ContentEmbeddings) -> dg.AssetCheckResult:
    """Every ad has a finite, unit-length 768-d vector and a unique id."""
    return unit_rows_result(ad_embeddings_raw.vectors, AD_EMBEDDING_DIM, ad_embeddings_raw.ids)


@dg.asset_check(asset=user_embeddings, blocking=True, partitions_def=click_source_partitions)
def user_embeddings_are_unit(user_embeddings: UserEmbeddings) -> dg.AssetCheckResult:
    """Every user has a finite, unit-length vector and a unique pseudonym."""
    return unit_rows_result(user_embeddings.vectors, None, user_embeddings.ids)


@dg.asset_check(asset=dg.AssetKey("served_users"), blocking=True, partitions_def=click_source_partitions)
def served_users_are_unit(served_users: UserEmbeddings) -> dg.AssetCheckResult:
    """Every served user has a finite, unit-length vector and a unique pseudonym."""
    return unit_rows_result(served_users.vectors, None, served_users.ids)


@dg.asset_check(asset=ad_projected, blocking=True, partitions_def=click_source_partitions)
def ad_projected_are_unit(ad_projected: ProjectedAds) -> dg.AssetCheckResult:
    """Every projected ad is a finite unit vector with a unique id."""
    return unit_rows_result(ad_projected.vectors, None, ad_projected.ids)


@dg.asset_check(
    asset=ad_projected,
    additional_ins={"ad_embeddings_raw": dg.AssetIn("ad_embeddings_raw")},
    blocking=True,
    partitions_def=click_source_partitions,
)
def ad_projected_covers_catalogue(
    ad_projected: ProjectedAds, ad_embeddings_raw: ContentEmbeddings
) -> dg.AssetCheckResult:
    """Brand-new ads are recommendable: every encoded ad, clicked or not, has a projection
    from the same encoder, in the same order."""
    same_ids = len(ad_projected) == len(ad_embeddings_raw) and bool((ad_projected.ids == ad_embeddings_raw.ids).all())
    missing = len(set(map(str, ad_embeddings_raw.ids)) - set(map(str, ad_projected.ids)))
    same_encoder = ad_projected.encoder_id == ad_embeddings_raw.encoder_id
    return dg.AssetCheckResult(
        passed=same_ids and same_encoder,
        metadata={
            "n_encoded_ads": len(ad_embeddings_raw),
            "n_projected_ads": len(ad_projected),
            "n_missing_ads": missing,
            "same_encoder": same_encoder,
        },
    )


@dg.asset_check(
    asset=dg.AssetKey("served_ads"),
    additional_ins={"ad_projected": dg.AssetIn("ad_projected"), "click_graph": dg.AssetIn("click_graph")},
    blocking=True,
    partitions_def=click_source_partitions,
)
def served_ads_keep_cold_ads(
    served_ads: ProjectedAds, ad_projected: ProjectedAds, click_graph: ClickGraph
) -> dg.AssetCheckResult:
    """Every projected ad is served, in the same order, with finite vectors; an ad without a
    click is served exactly as projected (item cold start unchanged by the ad refit)."""
    same_ids = len(served_ads) == len(ad_projected) and bool((served_ads.ids == ad_projected.ids).all())
    n_nonfinite = int(
        (~np.isfinite(served_ads.vectors)).any(axis=1).sum() + (~np.isfinite(served_ads.score_bias)).sum()
    )
    cold = ~isin_ids(ad_projected.ids, click_graph.ad_ids[click_graph.ad_degrees() > 0])
    n_cold_changed = (
        int(((served_ads.vectors[cold] != ad_projected.vectors[cold]).any(axis=1)
             | (served_ads.score_bias[cold] != ad_projected.score_bias[cold])).sum())
        if same_ids else -1
    )  # fmt: skip
    return dg.AssetCheckResult(
        passed=same_ids and n_nonfinite == 0 and n_cold_changed == 0 and len(served_ads) > 0,
        metadata={
            "n_ads": len(served_ads),
            "same_ads_as_ad_projected": same_ids,
            "n_nonfinite": n_nonfinite,
            "n_ads_without_clicks": int(cold.sum()),
            "n_ads_without_clicks_changed": n_cold_changed,
        },
    )


@dg.asset_check(asset=global_mean, blocking=True, partitions_def=click_source_partitions)
def global_mean_is_unit(global_mean: GlobalMean) -> dg.AssetCheckResult:
    """The cold-start prior is a finite unit vector."""
    return unit_rows_result(global_mean.vector[None, :], None)


@dg.asset_check(asset=click_graph, blocking=True, partitions_def=click_source_partitions)
def click_graph_holds_only_pseudonyms(click_graph: ClickGraph) -> dg.AssetCheckResult:
    """Privacy: every stored user id is a keyed pseudonym, never a raw identifier."""
    not_pseudonym = [u for u in click_graph.user_ids if not PSEUDONYM_PATTERN.fullmatch(str(u))]
    return dg.AssetCheckResult(
        passed=not not_pseudonym and click_graph.n_users > 0,
        metadata={"n_users": click_graph.n_users, "n_ids_not_pseudonyms": len(not_pseudonym)},
    )


@dg.asset_check(asset=raw_ads, blocking=True, partitions_def=click_source_partitions)
def raw_ads_are_usable(raw_ads: AdCatalog) -> dg.AssetCheckResult:
    """Every ad has a unique id and non-empty text; images are absolute paths (resolved and
    confined to the source folder when read) or empty."""
    empty_text = int(sum(1 for t in raw_ads.texts if not str(t).strip()))
    duplicates = int(len(raw_ads.ad_ids) - len(np.unique(raw_ads.ad_ids)))
    relative_images = int(sum(1 for p in raw_ads.image_paths if p and not str(p).startswith("/")))
    return dg.AssetCheckResult(
        passed=len(raw_ads) > 0 and empty_text == 0 and duplicates == 0 and relative_images == 0,
        metadata={
            "n_ads": len(raw_ads),
            "n_empty_text": empty_text,
            "n_duplicate_ids": duplicates,
            "n_unresolved_image_paths": relative_images,
        },
    )


@dg.asset_check(
    asset=ad_index,
    additional_ins={"served_ads": dg.AssetIn("served_ads")},
    blocking=True,
    partitions_def=click_source_partitions,
)
def ad_index_recall_is_high(ad_index: IndexedAds, served_ads: ProjectedAds) -> dg.AssetCheckResult:
    """The index finds what exact search finds (recall@10 on real users >= 0.95), holds every
    served ad, and stores each ad's score exactly (a sample of rows against ``served_ads``)."""
    index = ad_index.index
    n_missing = len(set(served_ads.ids.tolist()) - {index.ad_id(s) for s in index.live_slots().tolist()})
    rows = np.random.default_rng(0).choice(len(served_ads), size=min(100, len(served_ads)), replace=False)
    stored = index.vectors(np.asarray([index.slot_of(str(a)) for a in served_ads.ids[rows]], dtype=np.int64))
    expected = np.concatenate([served_ads.vectors[rows], served_ads.score_bias[rows, None]], axis=1)
    max_row_error = float(np.abs(stored - expected).max()) if len(rows) else 0.0
    passed = ad_index.recall_at_10 >= MIN_RECALL and n_missing == 0 and max_row_error < 1e-6
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            f"recall_at_{RECALL_K}": ad_index.recall_at_10,
            "min_recall": MIN_RECALL,
            "n_projected_ads_missing": n_missing,
            "max_stored_row_error": max_row_error,
            "kind": index.kind,
        },
    )


@dg.asset_check(asset=position_bias, blocking=True, partitions_def=click_source_partitions)
def position_bias_is_a_valid_examination_curve(position_bias: PositionBias) -> dg.AssetCheckResult:
    """theta is finite, non-negative and normalized (theta[0] = 1): the service divides by it."""
    theta = np.asarray(position_bias.theta, dtype=np.float64)
    passed = bool(len(theta) and np.isfinite(theta).all() and (theta >= 0).all() and abs(theta[0] - 1.0) < 1e-9)
    return dg.AssetCheckResult(passed=passed, metadata={"theta": dg.MetadataValue.json(theta.round(4).tolist()),
                                                        "method": position_bias.method})  # fmt: skip


@dg.asset_check(
    asset=policy_posterior,
    additional_ins={"served_users": dg.AssetIn("served_users")},
    blocking=True,
    partitions_def=click_source_partitions,
)
def policy_posterior_is_usable(policy_posterior: PolicyPosterior, served_users: UserEmbeddings) -> dg.AssetCheckResult:
    """The posterior lives in this run's user space, has a finite mean and a positive-definite
    precision (every Thompson draw factors it)."""
    mean = policy_posterior.posterior.mean()
    precision = policy_posterior.posterior.precision()
    try:
        np.linalg.cholesky(precision)
        positive_definite = True
    except np.linalg.LinAlgError:
        positive_definite = False
    same_space = policy_posterior.space == served_users.space
    passed = bool(np.isfinite(mean).all() and np.isfinite(precision).all() and positive_definite and same_space)
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "positive_definite": positive_definite,
            "same_user_space": same_space,
            "n_impressions_learnt": policy_posterior.n_impressions,
        },  # fmt: skip
    )


@dg.asset_check(asset=experiment_report, partitions_def=click_source_partitions)
def experiment_sample_ratios_match(experiment_report: ExperimentReports) -> dg.AssetCheckResult:
    """Fails when an experiment's users are split unlike its configured shares (χ² p < 0.001):
    users were lost unevenly, and none of that experiment's numbers can be trusted."""
    by_experiment = {row["experiment"]: float(row["srm_p_value"]) for row in experiment_report.figures}
    failing = sorted(name for name, p in by_experiment.items() if p < SRM_P_THRESHOLD)
    return dg.AssetCheckResult(
        passed=not failing,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"srm_p_values": dg.MetadataValue.json(by_experiment), "mismatched": ", ".join(failing) or "none"},
    )
