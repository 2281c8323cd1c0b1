"""The click-source sensor and the nightly schedule, evaluated against a real test instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from adrec_assets.automation import DEFAULT_REFRESH_CRON, MAX_RETRIES, REQUEST_TAG
from adrec_assets.definitions import defs
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources.catalog import load_builtin_catalog
from adrec_assets.sources.files import write_source
from adrec_assets.sources.synthetic import SyntheticClickGenerator, SyntheticParams
from adrec_assets_tests.pipeline_fixtures import load_artifact, materialize_pipeline

SENSOR = defs.get_sensor_def("click_source_sensor")
SCHEDULE = defs.get_schedule_def("nightly_refresh")


def write_demo_source(root: Path, name: str, n_users: int = 120, seed: int = 0) -> Path:
    labelled = load_builtin_catalog()
    clicks, _ = SyntheticClickGenerator(labelled, SyntheticParams(n_users=n_users, seed=seed)).generate()
    write_source(root / name, labelled.catalog, clicks)
    return root / name


def tick(instance: dg.DagsterInstance, root: Path, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"click_sources": ClickSourceResource(root=str(root))}
    )
    result = SENSOR(context)
    assert isinstance(result, dg.SensorResult)
    # Apply what the daemon would apply: new partitions, then the cursor.
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_and_schedule_are_on_by_default():
    assert SENSOR.default_status == dg.DefaultSensorStatus.RUNNING
    assert SCHEDULE.default_status == dg.DefaultScheduleStatus.RUNNING
    assert SCHEDULE.cron_schedule == DEFAULT_REFRESH_CRON
    assert SENSOR.job_name == SCHEDULE.job_name == "adrec_pipeline"


def test_new_source_is_registered_and_requested_then_skipped_when_unchanged(tmp_path):
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    with dg.instance_for_test() as instance:
        first = tick(instance, root, None)
        assert [r.partition_key for r in first.run_requests] == ["shop"]
        assert instance.get_dynamic_partitions("click_source") == ["shop"]
        again = tick(instance, root, first.cursor)
        assert again.run_requests == [] and again.skip_reason is not None
        assert again.dynamic_partitions_requests == []


def test_appended_clicks_file_triggers_exactly_one_run_for_that_source_only(tmp_path):
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    write_demo_source(root, "news", seed=1)
    with dg.instance_for_test() as instance:
        first = tick(instance, root, None)
        assert sorted(r.partition_key for r in first.run_requests) == ["news", "shop"]
        extra = (root / "shop" / "clicks" / "clicks.csv").read_text().splitlines()[:5]
        (root / "shop" / "clicks" / "2026-11-26.csv").write_text("\n".join(extra) + "\n")
        second = tick(instance, root, first.cursor)
        assert [r.partition_key for r in second.run_requests] == ["shop"]
        third = tick(instance, root, second.cursor)
        assert third.run_requests == []


def test_lost_cursor_reissues_the_same_run_key_so_the_daemon_dedups(tmp_path):
    """Dagster's sensor daemon launches at most one run per run_key: with the cursor lost,
    unchanged files yield exactly the run keys that already ran."""
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    with dg.instance_for_test() as instance:
        first = tick(instance, root, None)
        replay = tick(instance, root, None)
        assert [r.run_key for r in replay.run_requests] == [r.run_key for r in first.run_requests]
        assert replay.dynamic_partitions_requests == []  # already registered
        (root / "shop" / "clicks" / "more.csv").write_text("user_id,ad_id\nu1,ad-cars-01\n")
        changed = tick(instance, root, None)
        assert changed.run_requests[0].run_key != first.run_requests[0].run_key


def test_folders_without_ads_are_ignored_and_a_builtin_folder_contributes_only_clicks(tmp_path):
    """The service writes served clicks of the built-in source into <root>/synthetic/clicks/:
    they are that source's new clicks (a run is requested); an ads file there is ignored."""
    root = tmp_path / "sources"
    (root / "not_a_source" / "clicks").mkdir(parents=True)
    with dg.instance_for_test() as instance:
        first = tick(instance, root, None)
        assert first.run_requests == []
        assert instance.get_dynamic_partitions("click_source") == []
        served = root / "synthetic" / "clicks"
        served.mkdir(parents=True)
        (served / "served-000000000001-000000000002.csv").write_text(
            "user_pseudonym,ad_id,timestamp,weight\n" + "0" * 32 + ",ad-cars-01,1700000000,1.0\n"
        )
        (root / "synthetic" / "ads.csv").write_text("ad_id,text\nx,ignored\n")
        second = tick(instance, root, first.cursor)
        assert [r.partition_key for r in second.run_requests] == ["synthetic"]
        assert tick(instance, root, second.cursor).run_requests == []


def test_schedule_requests_every_registered_source():
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance)
        assert isinstance(SCHEDULE.evaluate_tick(context).skip_message, str)
        instance.add_dynamic_partitions("click_source", ["synthetic", "shop"])
        night = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=night, repository_def=defs.get_repository_def()
        )
        requests = SCHEDULE.evaluate_tick(context).run_requests
        assert sorted(r.partition_key for r in requests) == ["shop", "synthetic"]
        assert len({r.run_key for r in requests}) == 2
        assert all("2026-11-26T03:00" in r.run_key for r in requests)
        # the nightly run is the full retrain that ends a chain of warm-start refreshes
        for request in requests:
            for op in ("user_embeddings", "projector"):
                assert request.run_config["ops"][op]["config"]["warm_start"] is False


def test_drop_files_tick_run_artifacts_appear(tmp_path):
    """The whole flow: a folder is dropped, the sensor ticks, its runs succeed, artifacts appear."""
    root = tmp_path / "sources"
    base = tmp_path / "artifacts"
    write_demo_source(root, "shop", n_users=150)
    with dg.instance_for_test() as instance:
        result = tick(instance, root, None)
        (request,) = result.run_requests
        run = materialize_pipeline(instance, base, partition=request.partition_key, root=str(root))
        assert run.success
        projected = load_artifact(base, "ad_projected", "shop")
        assert projected.vectors.shape == (220, 128)
        graph = load_artifact(base, "click_graph", "shop")
        assert 0 < graph.n_users <= 150
        assert json.loads(result.cursor)["shop"]["fp"]


def _record_run(instance: dg.DagsterInstance, request: dg.RunRequest, status: dg.DagsterRunStatus) -> None:
    """What the daemon leaves behind after launching ``request``: a run with its tags, ended."""
    run = instance.create_run_for_job(
        job_def=defs.resolve_job_def("adrec_pipeline"),
        tags=request.tags,
        run_config={},
        status=status,
    )
    assert run.tags[REQUEST_TAG] == request.run_key


def test_a_failed_run_of_unchanged_files_is_retried_after_a_doubling_back_off(tmp_path, monkeypatch):
    """A transient failure (a busy disk, a killed pod) must not leave a source stale until its
    files change; a run that keeps failing must not loop either."""
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    clock = [1_000_000.0]
    monkeypatch.setattr("adrec_assets.automation.time.time", lambda: clock[0])
    monkeypatch.setenv("ADREC_SENSOR_RETRY_SECONDS", "60")
    with dg.instance_for_test() as instance:
        first = tick(instance, root, None)
        (request,) = first.run_requests
        _record_run(instance, request, dg.DagsterRunStatus.FAILURE)
        clock[0] += 59
        assert tick(instance, root, first.cursor).run_requests == []  # within the back-off
        clock[0] += 1
        retry = tick(instance, root, first.cursor)
        (again,) = retry.run_requests
        assert again.run_key == f"{request.run_key}:retry1" and again.partition_key == "shop"
        _record_run(instance, again, dg.DagsterRunStatus.FAILURE)
        clock[0] += 60
        assert tick(instance, root, retry.cursor).run_requests == []  # the second wait is 120 s
        clock[0] += 60
        second = tick(instance, root, retry.cursor)
        assert [r.run_key for r in second.run_requests] == [f"{request.run_key}:retry2"]
        _record_run(instance, second.run_requests[0], dg.DagsterRunStatus.SUCCESS)
        clock[0] += 10_000
        assert tick(instance, root, second.cursor).run_requests == []  # it succeeded: nothing more


def test_retries_stop_after_the_limit(tmp_path, monkeypatch):
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    clock = [0.0]
    monkeypatch.setattr("adrec_assets.automation.time.time", lambda: clock[0])
    monkeypatch.setenv("ADREC_SENSOR_RETRY_SECONDS", "1")
    with dg.instance_for_test() as instance:
        result, keys = tick(instance, root, None), []
        for _ in range(MAX_RETRIES + 3):
            for request in result.run_requests:
                keys.append(request.run_key)
                _record_run(instance, request, dg.DagsterRunStatus.FAILURE)
            clock[0] += 10_000
            result = tick(instance, root, result.cursor)
        assert len(keys) == 1 + MAX_RETRIES and len(set(keys)) == len(keys)


def test_the_cursor_of_an_older_release_reads_as_first_tries(tmp_path):
    root = tmp_path / "sources"
    write_demo_source(root, "shop")
    with dg.instance_for_test() as instance:
        current = json.loads(tick(instance, root, None).cursor)["shop"]["fp"]
        old_style = json.dumps({"shop": current})
        assert tick(instance, root, old_style).run_requests == []  # same files: nothing to do


@pytest.mark.parametrize("config", ["deploy/dagster.yaml", "deploy/dagster.dev.yaml"])
def test_the_instances_queue_runs_and_allow_one_run_per_source_at_a_time(config):
    """Isolation is Dagster's: the run queue admits at most one run per partition (source),
    so a second request for a source waits; a maximum run time stops a hung run."""
    text = (Path(__file__).resolve().parents[1] / config).read_text()
    settings = yaml.safe_load(text)
    coordinator = settings["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in coordinator[
        "config"
    ]["tag_concurrency_limits"]
    assert settings["run_monitoring"]["enabled"] and settings["run_monitoring"]["max_runtime_seconds"] > 0


def test_experiment_reports_are_requested_hourly_for_every_source():
    schedule = defs.get_schedule_def("hourly_experiment_reports")
    assert (
        schedule.default_status == dg.DefaultScheduleStatus.RUNNING and schedule.job_name == "adrec_experiment_report"
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("click_source", ["synthetic", "shop"])
        at = datetime(2026, 11, 26, 14, 15, tzinfo=UTC)
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=at,
                                            repository_def=defs.get_repository_def())  # fmt: skip
        requests = schedule.evaluate_tick(context).run_requests
        assert sorted(r.partition_key for r in requests) == ["shop", "synthetic"]
        assert all(r.run_key.endswith("2026-11-26T14") for r in requests)
