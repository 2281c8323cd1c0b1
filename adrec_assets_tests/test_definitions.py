"""The code location loads, the graph has the promised lineage, configs match the core."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import pytest

from adrec_assets.assets.projector import ProjectorConfig
from adrec_assets.assets.user_embeddings import UserEmbeddingConfig
from adrec_assets.definitions import ALL_ASSETS, defs, select_executor
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.partitions import click_source_partitions

REPO = Path(__file__).resolve().parents[1]

EXPECTED_DEPS = {
    "raw_ads": set(),
    "click_graph": {"raw_ads"},  # the clicks are read against the catalogue raw_ads holds
    "ad_embeddings_raw": {"raw_ads"},
    "user_embeddings": {"click_graph"},
    # served_model: users and ads fitted together (users to the projections, clicked ads to their clickers)
    "served_users": {"click_graph", "user_embeddings", "ad_projected"},
    "global_mean": {"served_users"},
    "projector": {"raw_ads", "ad_embeddings_raw", "click_graph", "user_embeddings"},  # raw_ads: the ad fields
    "ad_projected": {"raw_ads", "ad_embeddings_raw", "projector"},
    "served_ads": {"click_graph", "user_embeddings", "ad_projected"},
    "ad_index": {"served_ads", "served_users"},  # recall is measured on the partition's users
    "position_bias": set(),  # reads the served event log
    "policy_posterior": {"click_graph", "served_users", "global_mean", "served_ads", "position_bias"},
    "snapshot": {
        "raw_ads",
        "click_graph",
        "ad_embeddings_raw",
        "user_embeddings",
        "global_mean",
        "projector",
        "ad_projected",
        "served_users",
        "served_ads",
        "ad_index",
        "position_bias",
        "policy_posterior",
    },  # published together
    "evaluation": {
        "raw_ads",
        "click_graph",
        "ad_embeddings_raw",
        "user_embeddings",
        "projector",
        "served_users",
        "served_ads",
    },
    "experiment_report": set(),  # reads the served event log and the experiments file
}
REPORTS = {"evaluation", "experiment_report"}  # written beside the snapshots, outside the pipeline job


def test_graph_has_the_pipeline_assets_and_the_evaluation_with_the_promised_lineage():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_DEPS)
    for asset, parents in EXPECTED_DEPS.items():
        node = graph.get(dg.AssetKey(asset))
        assert {p.to_user_string() for p in node.parent_keys} == parents, asset
        assert node.partitions_def == click_source_partitions, asset


def test_partitions_are_dynamic_so_sources_need_no_code_change():
    assert isinstance(click_source_partitions, dg.DynamicPartitionsDefinition)
    assert all(a.partitions_def == click_source_partitions for a in ALL_ASSETS)


def test_every_vector_asset_has_a_blocking_check():
    checked = {c.asset_key.to_user_string() for c in defs.resolve_asset_graph().asset_check_keys}
    assert set(EXPECTED_DEPS) - {"projector", "snapshot", *REPORTS} <= checked


def test_the_snapshot_publishes_exactly_the_pipeline_artifacts():
    """The list the publisher validates is the pipeline job's artifact assets: none left out."""
    from adrec_assets.snapshots import PIPELINE_ARTIFACTS

    selected = defs.resolve_job_def("adrec_pipeline").asset_layer.selected_asset_keys
    assert set(PIPELINE_ARTIFACTS) == {k.to_user_string() for k in selected} - {"snapshot"}


def test_the_pipeline_job_leaves_the_evaluation_out():
    """Serving refreshes (sensor, schedule) must not pay for the evaluation's retraining."""
    graph = defs.resolve_asset_graph()
    selected = defs.resolve_job_def("adrec_pipeline").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in selected} == set(EXPECTED_DEPS) - REPORTS
    evaluation = defs.resolve_job_def("adrec_evaluation").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in evaluation} == {"evaluation"}
    assert graph.get(dg.AssetKey("evaluation")).group_name == "evaluation"


def test_config_defaults_equal_the_core_defaults():
    """The launchpad shows the same defaults the training code uses."""
    assert UserEmbeddingConfig().to_params() == UserTrainingParams()
    assert ProjectorConfig().to_params() == ProjectorParams()
    # tuned on ml-latest-small (benchmarks/README.md): bigger batches, higher lr, step floor
    expected = {"dim": 128, "temperature": 0.07, "epochs": 20, "batch_size": 512, "lr": 3e-3, "min_steps": 2000}
    assert {k: v for k, v in asdict(UserTrainingParams()).items() if k in expected} == expected
    projector_expected = {
        "epochs": 10, "batch_size": 128, "centroid_weight": 0.1, "hidden_dim": 512, "popularity_weight": 0.25,
    }  # fmt: skip
    assert {k: v for k, v in asdict(ProjectorParams()).items() if k in projector_expected} == projector_expected


def test_config_fields_are_generated_from_the_core_params_with_their_descriptions():
    """One declaration: every params field appears in the launchpad with its description,
    and nothing else is added but the run-level switches."""
    from dataclasses import fields

    for config, params in ((UserEmbeddingConfig, UserTrainingParams), (ProjectorConfig, ProjectorParams)):
        declared = {f.name: f.metadata["help"] for f in fields(params)}
        generated = config.model_fields
        assert set(generated) == set(declared) | {"warm_start", "refresh_epochs"}
        assert all(generated[name].description == text for name, text in declared.items())
    assert ProjectorConfig(lr=0.5, warm_start=False).to_params() == ProjectorParams(lr=0.5)


def test_executor_choice(monkeypatch):
    monkeypatch.setenv("ADREC_EXECUTOR", "multiprocess")
    assert select_executor() is dg.multi_or_in_process_executor
    monkeypatch.delenv("ADREC_EXECUTOR")
    assert select_executor() is dg.in_process_executor
    monkeypatch.setenv("ADREC_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="ADREC_EXECUTOR"):
        select_executor()


def _dagster_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dagster_definitions_validate_passes(tmp_path):
    result = _dagster_cli("definitions", "validate", "-m", "adrec_assets.definitions", home=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation successful" in result.stderr + result.stdout


def test_cli_registers_builtin_and_folder_sources_in_the_instance(tmp_path):
    sources = tmp_path / "sources"
    (sources / "shop").mkdir(parents=True)
    (sources / "shop" / "ads.csv").write_text("ad_id,text\na1,Red shoes\n")
    (sources / "empty_folder").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ADREC_SOURCES_DIR": str(sources)}
    run = subprocess.run(
        [sys.executable, "-m", "adrec_assets.cli", "register"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with dg.DagsterInstance.from_ref(dg._core.instance.InstanceRef.from_dir(str(home))) as instance:  # noqa: SLF001
        assert instance.get_dynamic_partitions("click_source") == ["synthetic", "shop"]
    # Registering again is a no-op, not an error.
    again = subprocess.run(
        [sys.executable, "-m", "adrec_assets.cli", "register", "synthetic"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "['shop', 'synthetic']" in again.stdout
