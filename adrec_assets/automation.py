"""Automation: a sensor that refreshes a source when its files change, and a nightly schedule.

Sensor runs take the default training path (reuse unchanged inputs, warm-start after new
clicks); the nightly schedule asks for a full retrain.

Both are RUNNING by default, so `dagster dev` (or a deployed daemon) acts on them with no
extra switch. Neither relies on declarative automation: each run request targets the whole
pipeline job for one partition, so the full lineage refreshes for that source only.
"""

from __future__ import annotations

import json
import os

import dagster as dg

from adrec_assets.partitions import BUILTIN_SOURCES, click_source_partitions
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources.files import SourceError, list_sources, source_fingerprint

REFRESH_CRON_ENV_VAR = "ADREC_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 3 * * *"  # nightly, 03:00 in the schedule's timezone
SOURCE_TAG = "adrec/source"
#: The nightly run retrains from scratch: sensor-triggered refreshes warm-start from the
#: previous artifacts (fast), and this bounds how long a chain of warm starts can drift.
FULL_RETRAIN_RUN_CONFIG = {
    "ops": {
        "user_embeddings": {"config": {"warm_start": False}},
        "projector": {"config": {"warm_start": False}},
    }
}


def build_click_source_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name="click_source_sensor",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers new source folders as partitions and refreshes a source whose files changed.",
    )
    def click_source_sensor(context: dg.SensorEvaluationContext, click_sources: ClickSourceResource) -> dg.SensorResult:
        """Cursor = {source: fingerprint of its files}. The run key is source + fingerprint,
        so even with a lost cursor the daemon never launches a second run for the same files."""
        root = click_sources.sources_root()
        cursor: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        registered = set(context.instance.get_dynamic_partitions(click_source_partitions.name))
        new_partitions: list[str] = []
        requests: list[dg.RunRequest] = []
        for source in list_sources(root):
            if source in BUILTIN_SOURCES:
                context.log.warning(f"folder {root / source} ignored: {source!r} is a built-in source name")
                continue
            try:
                fingerprint = source_fingerprint(root / source)
            except (OSError, SourceError) as exc:  # a folder vanishing mid-scan: next tick
                context.log.warning(f"source {source!r}: skipped this tick ({exc})")
                continue
            if source not in registered:
                new_partitions.append(source)
            if cursor.get(source) != fingerprint:
                requests.append(
                    dg.RunRequest(
                        run_key=f"{source}:{fingerprint}",
                        partition_key=source,
                        tags={SOURCE_TAG: source, "adrec/fingerprint": fingerprint},
                    )
                )
                cursor[source] = fingerprint
        partition_requests = (
            [click_source_partitions.build_add_request(new_partitions)] if new_partitions else []
        )
        skip = None if requests or new_partitions else f"no new or changed source under {root}"
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=partition_requests,
            cursor=json.dumps(cursor, sort_keys=True),
            skip_reason=skip,
        )

    return click_source_sensor


def build_nightly_refresh_schedule(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="nightly_refresh",
        job=job,
        cron_schedule=os.environ.get(REFRESH_CRON_ENV_VAR, DEFAULT_REFRESH_CRON),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Full retrain (warm_start=false) of every registered source (cron from ${REFRESH_CRON_ENV_VAR}).",
    )
    def nightly_refresh(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        sources = context.instance.get_dynamic_partitions(click_source_partitions.name)
        if not sources:
            return dg.SkipReason("no click source is registered")
        day = context.scheduled_execution_time.strftime("%Y-%m-%dT%H:%M")
        return [
            dg.RunRequest(
                run_key=f"nightly:{source}:{day}",
                partition_key=source,
                run_config=FULL_RETRAIN_RUN_CONFIG,
                tags={SOURCE_TAG: source, "adrec/training": "full_retrain"},
            )
            for source in sources
        ]

    return nightly_refresh
