"""evaluation: item cold-start quality of this partition's pipeline, next to the baselines.

The protocol lives in :mod:`adrec_assets.ml.evaluation` (no Dagster); this asset runs it
with the training settings the partition's ``user_embeddings`` and ``projector`` were
materialized with (read from their artifacts), so the numbers describe the pipeline that is
actually serving, and publishes the table, a plot and numeric metadata the UI charts
across materializations.
"""

import base64
import io
import json

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
    evaluate_cold_start,
)
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.params import UserTrainingParams
from adrec_assets.ml.types import ClickGraph, ContentEmbeddings, UserEmbeddings, align_rows

_D = EvaluationParams()


class EvaluationConfig(dg.Config):
    """Item cold-start protocol: hold out a share of the clicked ads, retrain, rank them."""

    cold_share: float = Field(default=_D.cold_share, description="Share of clicked ads held out as cold.")
    n_strata: int = Field(default=_D.n_strata, description="Popularity strata the cold ads are drawn from.")
    k: int = Field(default=_D.k, description="Cut-off of Recall@k and NDCG@k.")
    seed: int = Field(default=_D.seed, description="Seeds the split, tie-breaking and the random baseline.")
    warm_reference: bool = Field(
        default=_D.warm_reference, description="Also retrain with half of each cold ad's clicks visible."
    )

    def to_params(self) -> EvaluationParams:
        return EvaluationParams(**self.model_dump())


def recall_ratio(recall: float, baseline: float) -> float:
    """pipeline / baseline, 4 decimals; NaN when the baseline found nothing."""
    return round(recall / baseline, 4) if baseline > 0 else float("nan")


def report_plot_markdown(report: EvaluationReport) -> str:
    """Bar chart of Recall@k and NDCG@k per method, as an inline PNG the UI renders."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [m for m in METHOD_ORDER if m in report.results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=90)
    ax.bar(x - 0.2, [report.results[m].recall for m in names], 0.4, label=f"Recall@{report.k}")
    ax.bar(x + 0.2, [report.results[m].ndcg for m in names], 0.4, label=f"NDCG@{report.k}")
    ax.set_xticks(x, [METHOD_LABELS[m].replace("*", "").split(" (")[0] for m in names], rotation=20, ha="right")
    ax.set_title(f"Cold-ad ranking: {report.n_cold_ads} cold ads, {report.n_eval_users} users")
    ax.legend()
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
    click_graph: ClickGraph,
    ad_embeddings_raw: ContentEmbeddings,
    user_embeddings: UserEmbeddings,
    projector: TrainedProjector,
) -> dg.Output[EvaluationReport]:
    """Cold-ad Recall@k / NDCG@k / AUC of the pipeline against random, content-kNN, the
    global-mean user, ridge into user space, ridge into ALS item factors and a warm
    reference, all on one seeded split."""
    content = ad_embeddings_raw.vectors[
        align_rows(ad_embeddings_raw.ids, click_graph.ad_ids, f"evaluation[{context.partition_key}]: clicked ads")
    ]
    report = evaluate_cold_start(
        click_graph,
        content,
        UserTrainingParams(**user_embeddings.provenance.params),
        projector.params,
        config.to_params(),
        log=context.log.info,
    )
    pipeline = report.results[PIPELINE]
    best_name, best_recall = report.best_baseline()
    numeric: dict[str, dg.RawMetadataValue] = {}
    for name, result in report.results.items():
        numeric[f"{name}_recall_at_{report.k}"] = dg.MetadataValue.float(round(result.recall, 5))
        numeric[f"{name}_ndcg_at_{report.k}"] = dg.MetadataValue.float(round(result.ndcg, 5))
        numeric[f"{name}_auc"] = dg.MetadataValue.float(round(result.auc, 5))
    return dg.Output(
        report,
        metadata={
            "results": dg.MetadataValue.md(report.markdown()),
            "plot": dg.MetadataValue.md(report_plot_markdown(report)),
            **numeric,
            "pipeline_vs_best_content_baseline": dg.MetadataValue.float(recall_ratio(pipeline.recall, best_recall)),
            "best_content_baseline": best_name,
            "pipeline_vs_ridge_als": dg.MetadataValue.float(
                recall_ratio(pipeline.recall, report.results["ridge_als"].recall)
            ),
            "n_cold_ads": report.n_cold_ads,
            "n_eval_users": report.n_eval_users,
            "n_train_clicks": report.n_train_clicks,
            "n_held_out_clicks": report.n_held_out_clicks,
            "evaluation_seconds": dg.MetadataValue.float(round(report.seconds, 2)),
            "settings": dg.MetadataValue.json(json.loads(report.settings)),
        },
    )
