"""evaluation: cold-ad and warm quality of this partition's pipeline, next to the baselines.

The protocols live in :mod:`adrec_assets.ml.evaluation` (cold ads) and
:mod:`adrec_assets.ml.warm_evaluation` (known users, ads with clicks; no Dagster); this asset
runs them with the settings the partition's ``user_embeddings``, ``projector``,
``served_users`` and ``served_ads`` were materialized with (read from their artifacts), so the
numbers describe the pipeline that is actually serving, and publishes the tables, a plot and
numeric metadata the UI charts across materializations.
"""

import base64
import io
import json
from dataclasses import replace

import dagster as dg
import numpy as np
from pydantic import Field

from adrec_assets.assets.common import EVALUATION_GROUP, PARTITION_KWARGS
from adrec_assets.ml.evaluation import (
    METHOD_LABELS,
    METHOD_ORDER,
    PIPELINE,
    EvaluationParams,
    EvaluationReport,
    combine_seeds,
    evaluate_cold_start,
    with_warm,
)
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.params import AdRefitParams, UserRefitParams, UserTrainingParams
from adrec_assets.ml.pipeline import fit_pipeline
from adrec_assets.ml.types import (
    AdCatalog,
    ArtifactError,
    ClickGraph,
    ContentEmbeddings,
    ProjectedAds,
    UserEmbeddings,
    align_rows,
    isin_ids,
)
from adrec_assets.ml.warm_evaluation import WARM_PIPELINE, WarmParams, evaluate_warm, pipeline_scorers

_D = EvaluationParams()
_W = WarmParams()


class EvaluationConfig(dg.Config):
    """Item cold-start protocol: hold out a share of the clicked ads, retrain, rank them."""

    cold_share: float = Field(default=_D.cold_share, description="Share of clicked ads held out as cold.")
    n_strata: int = Field(default=_D.n_strata, description="Popularity strata the cold ads are drawn from.")
    k: int = Field(default=_D.k, description="Cut-off of Recall@k and NDCG@k.")
    seeds: list[int] = Field(
        default=[_D.seed],
        description="One split per seed (split, tie-breaking, random baseline): metrics are means over the seeds "
        "and the chart shows each seed. Each seed retrains the pipeline once (twice with the warm reference).",
    )
    warm_reference: bool = Field(
        default=_D.warm_reference, description="Also retrain with half of each cold ad's clicks visible."
    )
    warm: bool = Field(
        default=True,
        description="Also run the warm protocol: hold out a share of each user's clicks on ads that keep others, "
        "rank the whole catalogue against popularity, EASE and implicit ALS tuned on a validation split.",
    )
    holdout_share: float = Field(
        default=_W.holdout_share, description="Warm protocol: share of each user's clicks held out."
    )

    def to_params(self) -> list[EvaluationParams]:
        common = self.model_dump(exclude={"seeds", "warm", "holdout_share"})
        return [EvaluationParams(**common, seed=seed) for seed in self.seeds]


def recall_ratio(recall: float, baseline: float) -> float:
    """pipeline / baseline, 4 decimals; NaN when the baseline found nothing."""
    return round(recall / baseline, 4) if baseline > 0 else float("nan")


def report_plot_markdown(report: EvaluationReport) -> str:
    """Recall@k and NDCG@k per method (mean over seeds, each seed a dot) and, beside it, the
    pipeline / ridge -> ALS ratio per seed against the 1.0 line: an inline PNG the UI renders."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [m for m in METHOD_ORDER if m in report.results]
    x = np.arange(len(names))
    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90, gridspec_kw={"width_ratios": [3, 1]})
    for offset, column, label in ((-0.2, 0, f"Recall@{report.k}"), (0.2, 1, f"NDCG@{report.k}")):
        values = np.stack([report.per_seed[m][:, column] for m in names])  # (methods, seeds)
        bars = ax.bar(x + offset, values.mean(axis=1), 0.4, label=label)
        if values.shape[1] > 1:
            ax.errorbar(x + offset, values.mean(axis=1), yerr=values.std(axis=1), fmt="none", ecolor="black", capsize=2)
            for i in range(values.shape[1]):
                ax.scatter(x + offset, values[:, i], s=6, color="black", zorder=3)
        bars.set_label(label)
    ax.set_xticks(x, [METHOD_LABELS[m].replace("*", "").split(" (")[0] for m in names], rotation=25, ha="right")
    seeds = f"{len(report.seeds)} seeds" if len(report.seeds) > 1 else f"seed {report.seeds[0] if report.seeds else 0}"
    ax.set_title(f"Cold-ad ranking: {report.n_cold_ads} cold ads, {report.n_eval_users} users, {seeds}")
    ax.legend()
    ratio, per_seed = report.headline()
    ratio_ax.bar(np.arange(len(per_seed)), per_seed, color="tab:green")
    ratio_ax.axhline(1.0, color="black", linewidth=0.8)
    ratio_ax.axhline(ratio, color="tab:green", linestyle="--", linewidth=0.8)
    ratio_ax.set_xticks(np.arange(len(per_seed)), [str(s) for s in report.seeds])
    ratio_ax.set_xlabel("seed")
    ratio_ax.set_title(f"pipeline / {report.als_baseline()[0]}: {ratio:.3f}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return f"![cold-start evaluation](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


@dg.asset(
    io_manager_key="report_io_manager", kinds={"numpy", "pytorch"}, group_name=EVALUATION_GROUP, **PARTITION_KWARGS
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    raw_ads: AdCatalog,
    click_graph: ClickGraph,
    ad_embeddings_raw: ContentEmbeddings,
    user_embeddings: UserEmbeddings,
    projector: TrainedProjector,
    served_users: UserEmbeddings,
    served_ads: ProjectedAds,
) -> dg.Output[EvaluationReport]:
    """Cold-ad Recall@k / NDCG@k / AUC of the pipeline against random, content-kNN, the
    global-mean user, ridge into user space, ridge into ALS item factors (with the ad fields
    too, when the source declares them) and a warm reference, on one seeded split per seed.
    The headline is the pipeline's ratio to the stronger ridge -> ALS baseline. With ``warm``
    each seed also runs the warm protocol, headlined by ``pipeline_vs_best_warm_baseline``."""
    where = f"evaluation[{context.partition_key}]: clicked ads"
    if not served_ads.refit_params:
        raise ArtifactError(f"evaluation[{context.partition_key}]: served_ads holds no ad refit settings; "
                            "re-materialize served_ads")  # fmt: skip
    user_params = UserTrainingParams(**user_embeddings.provenance.params)
    refit_params = UserRefitParams(**served_users.provenance.params)
    ad_params = AdRefitParams(**json.loads(served_ads.refit_params))
    content = ad_embeddings_raw.vectors[align_rows(ad_embeddings_raw.ids, click_graph.ad_ids, where)]
    fields = raw_ads.fields.take(align_rows(raw_ads.ad_ids, click_graph.ad_ids, where))
    # the warm protocol ranks the whole catalogue: the graph's ads first, then those without clicks
    unclicked = np.unique(raw_ads.ad_ids[~isin_ids(raw_ads.ad_ids, click_graph.ad_ids)])  # = np.setdiff1d, linear
    catalogue = np.concatenate([click_graph.ad_ids, unclicked])
    all_content = ad_embeddings_raw.vectors[align_rows(ad_embeddings_raw.ids, catalogue, "evaluation: catalogue")]
    all_fields = raw_ads.fields.take(align_rows(raw_ads.ad_ids, catalogue, "evaluation: catalogue"))

    def one_seed(params: EvaluationParams) -> EvaluationReport:
        report = evaluate_cold_start(
            click_graph, content, user_params, projector.params, params, log=context.log.info, fields=fields,
            refit_params=refit_params, ad_params=ad_params,
        )  # fmt: skip
        if not config.warm:
            return report
        warm = evaluate_warm(
            click_graph, len(catalogue),
            lambda train: pipeline_scorers(fit_pipeline(
                train, all_content, all_fields, replace(user_params, seed=params.seed),
                replace(projector.params, seed=params.seed), refit_params, ad_params,
            )),
            WarmParams(holdout_share=config.holdout_share, k=params.k, seed=params.seed),
            log=context.log.info,
        )  # fmt: skip
        return with_warm(report, warm)

    report = combine_seeds([one_seed(params) for params in config.to_params()])
    pipeline = report.results[PIPELINE]
    best_name, best_recall = report.best_baseline()
    headline, per_seed = report.headline()
    als_name = report.als_baseline()[0]
    numeric: dict[str, dg.RawMetadataValue] = {}
    for name, result in report.results.items():
        numeric[f"{name}_recall_at_{report.k}"] = dg.MetadataValue.float(round(result.recall, 5))
        numeric[f"{name}_ndcg_at_{report.k}"] = dg.MetadataValue.float(round(result.ndcg, 5))
        numeric[f"{name}_auc"] = dg.MetadataValue.float(round(result.auc, 5))
    return dg.Output(
        report,
        metadata={
            "pipeline_vs_ridge_als": dg.MetadataValue.float(round(headline, 4)),
            "headline": f"pipeline / {als_name} Recall@{report.k} = {headline:.3f} over seeds {report.seeds} "
            f"(per seed {', '.join(f'{r:.3f}' for r in per_seed)})",
            "results": dg.MetadataValue.md(report.markdown()),
            "plot": dg.MetadataValue.md(report_plot_markdown(report)),
            **numeric,
            "pipeline_vs_best_content_baseline": dg.MetadataValue.float(recall_ratio(pipeline.recall, best_recall)),
            "best_content_baseline": best_name,
            "ridge_als_baseline": als_name,
            "pipeline_vs_ridge_als_min_seed": dg.MetadataValue.float(round(float(np.nanmin(per_seed)), 4)),
            "n_cold_ads": report.n_cold_ads,
            "n_eval_users": report.n_eval_users,
            "n_train_clicks": report.n_train_clicks,
            "n_held_out_clicks": report.n_held_out_clicks,
            "evaluation_seconds": dg.MetadataValue.float(round(report.seconds, 2)),
            "settings": dg.MetadataValue.json(json.loads(report.settings)),
            **warm_metadata(report),
        },
    )


def warm_metadata(report: EvaluationReport) -> dict[str, object]:
    """The warm table, its headline per seed and the tuned baselines (empty without the warm protocol)."""
    if WARM_PIPELINE not in report.warm_per_seed:
        return {}
    ratio, per_seed, best = report.warm_headline()
    out: dict[str, object] = {
        "pipeline_vs_best_warm_baseline": dg.MetadataValue.float(round(ratio, 4)),
        "pipeline_vs_best_warm_baseline_per_seed": ", ".join(f"{r:.3f}" for r in per_seed),
        "pipeline_vs_best_warm_baseline_min_seed": dg.MetadataValue.float(round(float(np.nanmin(per_seed)), 4)),
        "best_warm_baseline": best,
        "warm_results": dg.MetadataValue.md(report.warm_markdown()),
        "warm_settings": dg.MetadataValue.json(json.loads(report.warm_settings)),
    }
    for name, values in report.warm_per_seed.items():
        out[f"warm_{name}_recall_at_{report.k}"] = dg.MetadataValue.float(round(float(values[:, 0].mean()), 5))
        out[f"warm_{name}_ndcg_at_{report.k}"] = dg.MetadataValue.float(round(float(values[:, 1].mean()), 5))
    return out
