"""The Dagster code location: assets, checks, resources, IO managers and the main job."""

import dagster as dg

from adrec_assets import checks
from adrec_assets.assets.ad_embeddings_raw import ad_embeddings_raw
from adrec_assets.assets.ad_index import ad_index
from adrec_assets.assets.ad_projected import ad_projected
from adrec_assets.assets.click_graph import click_graph
from adrec_assets.assets.evaluation import evaluation
from adrec_assets.assets.experiment_report import experiment_report
from adrec_assets.assets.global_mean import global_mean
from adrec_assets.assets.policy_posterior import policy_posterior
from adrec_assets.assets.position_bias import position_bias
from adrec_assets.assets.projector import projector
from adrec_assets.assets.raw_ads import raw_ads
from adrec_assets.assets.served_model import served_model
from adrec_assets.assets.snapshot import snapshot
from adrec_assets.assets.user_embeddings import user_embeddings
from adrec_assets.automation import (
    build_click_source_sensor,
    build_experiment_report_schedule,
    build_nightly_refresh_schedule,
)
from adrec_assets.io_managers import ReportIOManager, SnapshotIOManager
from adrec_assets.partitions import click_source_partitions
from adrec_assets.resources import ArtifactStoreResource, ClickSourceResource, EncoderResource, ExperimentsResource
from adrec_assets.settings import EXECUTOR

PIPELINE_ASSETS = [
    raw_ads, click_graph, ad_embeddings_raw, user_embeddings, projector, ad_projected, served_model, global_mean,
    ad_index, position_bias, policy_posterior, snapshot,
]  # fmt: skip
ALL_ASSETS = [*PIPELINE_ASSETS, evaluation, experiment_report]

#: Materializes the serving lineage of one click source (pick the partition at launch).
adrec_pipeline_job = dg.define_asset_job(
    "adrec_pipeline",
    selection=dg.AssetSelection.assets(*PIPELINE_ASSETS),
    partitions_def=click_source_partitions,
    description="Encode ads, learn the user space from clicks, train the projector, project every ad, "
    "refit the users to the projected ads and the clicked ads to their clickers; "
    "publish the run's artifacts as the source's new snapshot, all together or not at all.",
)


#: Re-trains on a cold-ad split and scores the partition's pipeline against the baselines.
evaluation_job = dg.define_asset_job(
    "adrec_evaluation",
    selection=dg.AssetSelection.assets(evaluation),
    partitions_def=click_source_partitions,
    description="Cold-start quality report (retrains on a held-out split; minutes on real data).",
)

#: Analyses the A/B experiments of a source from its served log (hourly by schedule).
experiment_report_job = dg.define_asset_job(
    "adrec_experiment_report",
    selection=dg.AssetSelection.assets(experiment_report),
    partitions_def=click_source_partitions,
    description="A/B experiment reports from the served event log (always-valid p-values: safe to look hourly).",
)


def select_executor() -> dg.ExecutorDefinition:
    """In-process by default: on one small machine the steps are CPU-bound and share the
    cores anyway, while a process per step re-imports torch for each (seconds apiece).
    ``ADREC_EXECUTOR=multiprocess`` restores Dagster's multi-or-in-process executor
    (pick either per run in the launchpad's ``execution`` config)."""
    choice = EXECUTOR.get()
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "multiprocess":
        return dg.multi_or_in_process_executor
    raise ValueError(f"{EXECUTOR.name}={choice!r}: use 'in_process' or 'multiprocess'")


def default_resources(artifacts: ArtifactStoreResource | None = None) -> dict[str, object]:
    artifacts = artifacts or ArtifactStoreResource()
    return {
        "artifacts": artifacts,
        "io_manager": SnapshotIOManager(artifacts=artifacts),
        "report_io_manager": ReportIOManager(artifacts=artifacts),
        "click_sources": ClickSourceResource(),
        "encoder": EncoderResource(),
        "experiments": ExperimentsResource(),
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[adrec_pipeline_job, evaluation_job, experiment_report_job],
    sensors=[build_click_source_sensor(adrec_pipeline_job)],
    schedules=[
        build_nightly_refresh_schedule(adrec_pipeline_job),
        build_experiment_report_schedule(experiment_report_job),
    ],
    resources=default_resources(),
    executor=select_executor(),
)
