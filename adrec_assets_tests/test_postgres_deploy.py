"""Production deployment files under ``deploy/``.

* ``deploy/dagster.yaml`` against a real PostgreSQL server (Debian's, started here on loopback):
  register ``synthetic`` and materialize the pipeline assets with the multiprocess
  executor through the CLI, then read runs, events and dynamic partitions back with SQL.
* ``adrec_assets.deploy`` / ``deploy/k8s``: the Kubernetes code location's executor config is
  valid, and the step pod built for ``ad_embeddings_raw`` requests a GPU (no cluster needed).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from adrec_assets_tests.service_helpers import (
    BIN_DIR,
    PIPELINE_ASSETS,
    PIPELINE_STEPS,
    REPO_ROOT,
    PostgresCluster,
    pipeline_env,
    postgres_cluster,
    report,
)

DEPLOY = REPO_ROOT / "deploy"
PARTITIONS_DEF = "click_source"
MATERIALIZE_TIMEOUT_S = 900  # bounded; ~1 min with a process per step on 2 idle cores
#: A smaller synthetic click source than the default 1,000 users and short training (no step
#: floor): this test is about storage and parallel steps, not model quality (the full-size run
#: is covered by the browser test and CI's `make run`).
RUN_CONFIG = (
    "resources:\n  click_sources:\n    config:\n      synthetic_n_users: 300\n"
    "ops:\n"
    "  user_embeddings:\n    config:\n      min_steps: 0\n      epochs: 5\n"
    "  projector:\n    config:\n      min_steps: 0\n      epochs: 5\n"
)


@dataclass
class PgRun:
    cluster: PostgresCluster
    home: Path
    run_id: str
    seconds: float


def query(cluster: PostgresCluster, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(cluster.dsn()) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


@pytest.fixture(scope="module")
def pg_run(tmp_path_factory, pytestconfig: pytest.Config) -> Iterator[PgRun]:
    """One materialization of the ``adrec`` group for ``synthetic`` on a throw-away PostgreSQL,
    with ``DAGSTER_HOME`` holding an unmodified copy of ``deploy/dagster.yaml``."""
    pytest.importorskip("dagster_postgres", reason="dagster-postgres (the `dev` extra) is not installed: `make setup`")
    pytest.importorskip("psycopg2", reason="psycopg2 (comes with dagster-postgres) is not installed: `make setup`")
    root = tmp_path_factory.mktemp("pg")
    home, artifacts, sources = root / "dagster_home", root / "artifacts", root / "sources"
    for folder in (home, artifacts, sources):
        folder.mkdir()
    shutil.copyfile(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    (root / "run_config.yaml").write_text(RUN_CONFIG)
    with postgres_cluster() as cluster:
        # Two step processes at once on a 2-core machine: one torch thread each, no oversubscription.
        env = pipeline_env(
            home, artifacts, sources, ADREC_EXECUTOR="multiprocess", OMP_NUM_THREADS="1", **cluster.env()
        )
        register = subprocess.run(
            [str(BIN_DIR / "python"), "-m", "adrec_assets.cli", "register", "synthetic"],
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert register.returncode == 0, register.stdout + register.stderr
        started = time.monotonic()
        run = subprocess.run(
            [
                str(BIN_DIR / "dagster"),
                "asset",
                "materialize",
                "-m",
                "adrec_assets.definitions",
                "--select",
                "group:adrec",
                "--partition",
                "synthetic",
                "--config",
                str(root / "run_config.yaml"),
            ],
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=MATERIALIZE_TIMEOUT_S,
        )
        seconds = time.monotonic() - started
        (root / "materialize.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
        report(
            pytestconfig,
            f"\n  multiprocess materialization on PostgreSQL: {seconds:.0f} s (log {root / 'materialize.log'})",
        )
        runs = query(cluster, "SELECT run_id FROM runs")
        assert len(runs) == 1, f"expected the one CLI run in PostgreSQL, found {runs}"
        yield PgRun(cluster, home, runs[0][0], seconds)


def test_deploy_yaml_used_verbatim_and_nothing_in_sqlite(pg_run: PgRun) -> None:
    assert filecmp.cmp(DEPLOY / "dagster.yaml", pg_run.home / "dagster.yaml", shallow=False)
    sqlite_files = sorted(str(p) for p in pg_run.home.rglob("*.db"))
    assert sqlite_files == [], f"instance fell back to SQLite: {sqlite_files}"
    tables = {row[0] for row in query(pg_run.cluster, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    # run storage, event log storage (incl. dynamic partitions), schedule storage
    assert {"runs", "run_tags", "event_logs", "dynamic_partitions", "asset_keys", "instigators", "job_ticks"} <= tables


def test_run_stored_in_postgres(pg_run: PgRun) -> None:
    status = query(pg_run.cluster, "SELECT status FROM runs WHERE run_id = %s", (pg_run.run_id,))
    assert status == [("SUCCESS",)]
    tags = dict(query(pg_run.cluster, "SELECT key, value FROM run_tags WHERE run_id = %s", (pg_run.run_id,)))
    assert tags.get("dagster/partition") == "synthetic", tags


def test_materializations_stored_in_postgres(pg_run: PgRun) -> None:
    rows = query(
        pg_run.cluster,
        "SELECT asset_key, partition FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
        (pg_run.run_id,),
    )
    materialized = {tuple(json.loads(key)): partition for key, partition in rows}
    assert set(materialized) == {(asset,) for asset in PIPELINE_ASSETS}, materialized
    assert set(materialized.values()) == {"synthetic"}
    checks = query(
        pg_run.cluster,
        "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_CHECK_EVALUATION'",
        (pg_run.run_id,),
    )
    assert checks[0][0] >= len(PIPELINE_ASSETS) - 1  # every asset but projector has a check


def test_dynamic_partition_stored_in_postgres(pg_run: PgRun) -> None:
    rows = query(
        pg_run.cluster, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s", (PARTITIONS_DEF,)
    )
    assert rows == [("synthetic",)]


def step_intervals(pg_run: PgRun) -> dict[str, tuple[datetime, datetime, int]]:
    """step key -> (STEP_START time, STEP_SUCCESS time, pid of the step's process)."""
    rows = query(
        pg_run.cluster,
        "SELECT step_key, dagster_event_type, timestamp, event FROM event_logs "
        "WHERE run_id = %s AND dagster_event_type IN ('STEP_START', 'STEP_SUCCESS')",
        (pg_run.run_id,),
    )
    starts: dict[str, tuple[datetime, int]] = {}
    ends: dict[str, datetime] = {}
    for step, kind, ts, event in rows:
        if kind == "STEP_START":
            starts[step] = (ts, json.loads(event)["dagster_event"]["pid"])
        else:
            ends[step] = ts
    assert set(PIPELINE_STEPS) <= set(starts) and set(starts) == set(ends), (starts, ends)
    return {step: (starts[step][0], ends[step], starts[step][1]) for step in starts}


def test_steps_ran_in_parallel_processes(pg_run: PgRun) -> None:
    """The multiprocess executor ran each step in its own process, and independent steps at once."""
    intervals = step_intervals(pg_run)
    pids = {pid for _, _, pid in intervals.values()}
    assert len(pids) == len(intervals), f"steps shared processes: {intervals}"
    overlapping = sorted(
        (a, b)
        for a in intervals
        for b in intervals
        if a < b and intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]
    )
    print("overlapping steps:", overlapping)
    assert overlapping, f"no two steps overlapped in time: {intervals}"
    # Some two asset steps with no dependency between them ran at once. Which pair depends on
    # when each process got a core (e.g. the content branch and the click branch after
    # raw_ads, or position_bias, which reads only the event log, beside raw_ads).
    from adrec_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    ancestors = {
        k.to_user_string(): {a.to_user_string() for a in graph.get_ancestor_asset_keys(k)}
        for k in graph.get_all_asset_keys()
    }
    independent = [(a, b) for a, b in overlapping if a in ancestors and b in ancestors
                   and a not in ancestors[b] and b not in ancestors[a]]  # fmt: skip
    assert independent, (overlapping, intervals)


# --- Kubernetes: adrec_assets.deploy and deploy/k8s (no cluster involved) -------------------------


def k8s_modules():
    pytest.importorskip("dagster_k8s", reason="dagster-k8s (the `dev`/`deploy` extras) is not installed: `make setup`")
    from adrec_assets import deploy

    return deploy


def test_k8s_executor_config_is_valid_for_k8s_job_executor() -> None:
    deploy = k8s_modules()
    import dagster as dg
    from dagster_k8s import k8s_job_executor

    @dg.op
    def noop() -> None:
        return None

    @dg.job(executor_def=k8s_job_executor)
    def probe() -> None:
        noop()

    # Public validation of the same dict the code location bakes into its executor.
    assert dg.validate_run_config(probe, {"execution": {"config": deploy.K8S_EXECUTOR_CONFIG}})
    job = deploy.defs.resolve_job_def("adrec_pipeline")
    assert job.executor_def.name == "adrec_k8s"
    ops = {node.name for node in job.nodes}
    assert set(deploy.K8S_EXECUTOR_CONFIG["per_step_k8s_config"]) <= ops
    local = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert set(PIPELINE_ASSETS) <= local


def step_pod(deploy, op_name: str):
    """The Kubernetes Job the executor would create for one step (same merge as K8sStepHandler)."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
    )

    cfg = deploy.K8S_EXECUTOR_CONFIG
    context = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg["step_k8s_config"])).merge(
        K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg["per_step_k8s_config"].get(op_name, {}))
        )
    )
    job_config = DagsterK8sJobConfig(job_image="registry.example/adrec:test", dagster_home="/opt/dagster/dagster_home")
    return construct_dagster_k8s_job(
        job_config,
        ["dagster", "api", "execute_step"],
        f"dagster-step-{op_name.replace('_', '-')}",
        user_defined_k8s_config=context.run_k8s_config,
    )


def test_k8s_encoder_step_gets_a_gpu_pod_and_others_do_not() -> None:
    deploy = k8s_modules()
    gpu_job = step_pod(deploy, deploy.GPU_STEP)
    container = gpu_job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    tolerations = gpu_job.spec.template.spec.tolerations or []
    assert any(t.key == "nvidia.com/gpu" for t in tolerations)
    for op_name in ("projector", "user_embeddings"):
        cpu_container = step_pod(deploy, op_name).spec.template.spec.containers[0]
        assert "nvidia.com/gpu" not in (cpu_container.resources.limits or {})
        assert cpu_container.resources.requests["cpu"] == "2"


def test_k8s_files_are_consistent() -> None:
    """Helm values load the k8s code location with the secrets and volume the manifests create."""
    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    manifests = [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        if path.name != "values.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in manifests}
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "adrec_assets.deploy"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert ("Secret", values["global"]["postgresqlSecretName"]) in names
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for ref in [*launcher["envSecrets"], *deployment["envSecrets"]]:
        assert ("Secret", ref["name"]) in names, ref
    for volume in [*launcher["volumes"], *deployment["volumes"]]:
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert ("PersistentVolumeClaim", claim) in names, claim
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"  # exposed only through the auth proxy


def test_k8s_isolates_sources_shares_the_encoding_cache_and_fences_the_webserver() -> None:
    """One run per source at a time with a maximum run time; every pod that encodes reads the
    same encoding cache on the shared volume; only the ingress reaches the webserver."""
    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    daemon = values["dagsterDaemon"]
    limits = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    assert daemon["runMonitoring"]["enabled"] and daemon["runMonitoring"]["maxRuntimeSeconds"] > 0
    mount = values["runLauncher"]["config"]["k8sRunLauncher"]["volumeMounts"][0]["mountPath"]
    cache = next(v for v in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"] if "ENCODER_CACHE" in v)
    assert cache.split("=", 1)[1].startswith(mount + "/")
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["env"]["ADREC_ENCODER_CACHE_DIR"].startswith(mount + "/")
    (policy,) = yaml.safe_load_all((DEPLOY / "k8s" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"] == {
        "component": "dagster-webserver"
    }
    assert policy["spec"]["policyTypes"] == ["Ingress"] and len(policy["spec"]["ingress"]) == 1


def test_k8s_service_replicas_share_redis_and_only_api_clients_reach_them() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "serve.yaml").read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    serve = by_kind[("Deployment", "adrec-serve")]
    assert serve["spec"]["replicas"] >= 2
    (container,) = serve["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ADREC_ONLINE_STORE"].startswith("redis://adrec-redis:")
    assert ("Service", "adrec-redis") in by_kind
    assert "--appendonly" in by_kind[("Deployment", "adrec-redis")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"secretRef": {"name": "adrec-secrets"}} in container["envFrom"]  # ADREC_API_TOKEN for a 0.0.0.0 bind
    secrets = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "secrets.example.yaml").read_text()) if d
    }
    assert "ADREC_API_TOKEN" in secrets["adrec-secrets"]["stringData"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert by_kind[("Service", "adrec-serve")]["spec"]["type"] == "ClusterIP"
    policy = by_kind[("NetworkPolicy", "adrec-serve-from-api-clients-only")]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "adrec-serve"}
    nginx = (DEPLOY / "nginx" / "adrec-serve.conf").read_text()
    assert "auth_basic_user_file" in nginx and "$request_method $uri" in nginx and "$request_uri" not in nginx
