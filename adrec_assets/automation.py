"""Automation: a sensor that refreshes a source when its files change, and a nightly schedule.

Sensor runs take the default training path (reuse unchanged inputs, warm-start after new
clicks); the nightly schedule asks for a full retrain.

Both are RUNNING by default, so `dagster dev` (or a deployed daemon) acts on them with no
extra switch. Neither relies on declarative automation: each run request targets the whole
pipeline job for one partition, so the full lineage refreshes for that source only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg

from adrec_assets.partitions import BUILTIN_SOURCES, click_source_partitions
from adrec_assets.resources import ClickSourceResource
from adrec_assets.settings import REFRESH_CRON, SENSOR_RETRY_SECONDS
from adrec_assets.sources.files import ADS_FILENAMES, SourceError, click_files, list_sources, source_fingerprint

DEFAULT_REFRESH_CRON = REFRESH_CRON.default  # nightly, 03:00 in the schedule's timezone
SOURCE_TAG = "adrec/source"
REQUEST_TAG = "adrec/request"  # the run key of the request a run answers (first try or retry)
MAX_RETRIES = 5
_FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def retry_delay_seconds(attempt: int) -> float:
    """Back-off before retry number ``attempt + 1`` of the same files: doubling from the base."""
    return SENSOR_RETRY_SECONDS.get() * 2**attempt


def _last_run_failed(instance: dg.DagsterInstance, run_key: str) -> bool:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: run_key}), limit=1)
    return bool(runs) and runs[0].status in _FAILED


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
        """Cursor = {source: {fp, attempt, at}}: the fingerprint of its files, how many retries
        of them were requested and when. The run key is source + fingerprint (+ retry number),
        so even with a lost cursor the daemon never launches a second run for the same files;
        a run of unchanged files that failed is retried after a doubling back-off, at most
        ``MAX_RETRIES`` times (a transient failure heals, a broken file does not loop)."""
        root = click_sources.sources_root()
        cursor = _load_cursor(context.cursor)
        now = time.time()
        registered = set(context.instance.get_dynamic_partitions(click_source_partitions.name))
        new_partitions: list[str] = []
        requests: list[dg.RunRequest] = []
        served_builtins = [b for b in BUILTIN_SOURCES if click_files(root / b)]  # clicks the service wrote back
        for source in sorted({*list_sources(root), *served_builtins}):
            if source in BUILTIN_SOURCES and ads_file_present(root / source):
                context.log.warning(
                    f"ads file in {root / source} ignored: {source!r} is a built-in source (only its clicks/ are read)"
                )
            try:
                fingerprint = source_fingerprint(root / source)
            except (OSError, SourceError) as exc:  # a folder vanishing mid-scan: next tick
                context.log.warning(f"source {source!r}: skipped this tick ({exc})")
                continue
            if source not in registered:
                new_partitions.append(source)
            entry = cursor.get(source)
            if entry is None or entry["fp"] != fingerprint:
                entry = {"fp": fingerprint, "attempt": 0, "at": now}
            elif (
                entry["attempt"] < MAX_RETRIES
                and now - entry["at"] >= retry_delay_seconds(entry["attempt"])
                and _last_run_failed(context.instance, _run_key(source, entry))
            ):
                entry = {"fp": fingerprint, "attempt": entry["attempt"] + 1, "at": now}
                context.log.info(f"source {source!r}: the run for these files failed; retry {entry['attempt']}")
            else:
                continue
            cursor[source] = entry
            run_key = _run_key(source, entry)
            requests.append(
                dg.RunRequest(
                    run_key=run_key,
                    partition_key=source,
                    tags={SOURCE_TAG: source, "adrec/fingerprint": fingerprint, REQUEST_TAG: run_key},
                )
            )
        partition_requests = [click_source_partitions.build_add_request(new_partitions)] if new_partitions else []
        skip = None if requests or new_partitions else f"no new or changed source under {root}"
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=partition_requests,
            cursor=json.dumps(cursor, sort_keys=True),
            skip_reason=skip,
        )

    return click_source_sensor


def ads_file_present(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ADS_FILENAMES)


def _run_key(source: str, entry: dict) -> str:
    base = f"{source}:{entry['fp']}"
    return base if entry["attempt"] == 0 else f"{base}:retry{entry['attempt']}"


def _load_cursor(raw: str | None) -> dict[str, dict]:
    """The sensor cursor; a cursor of the older form {source: fingerprint} reads as first tries."""
    cursor = json.loads(raw) if raw else {}
    return {
        source: entry if isinstance(entry, dict) else {"fp": entry, "attempt": 0, "at": 0.0}
        for source, entry in cursor.items()
    }


def build_nightly_refresh_schedule(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="nightly_refresh",
        job=job,
        cron_schedule=REFRESH_CRON.get(),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Full retrain (warm_start=false) of every registered source (cron from ${REFRESH_CRON.name}).",
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


def build_experiment_report_schedule(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="hourly_experiment_reports",
        job=job,
        cron_schedule="15 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-analyses the A/B experiments of every registered source from its served log, hourly.",
    )
    def hourly_experiment_reports(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        sources = context.instance.get_dynamic_partitions(click_source_partitions.name)
        if not sources:
            return dg.SkipReason("no click source is registered")
        hour = context.scheduled_execution_time.strftime("%Y-%m-%dT%H")
        return [dg.RunRequest(run_key=f"experiments:{source}:{hour}", partition_key=source) for source in sources]

    return hourly_experiment_reports
