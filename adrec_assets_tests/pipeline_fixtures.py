"""Helpers to materialize the whole pipeline into a temp dir with a test instance."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from adrec_assets.definitions import ALL_ASSETS, PIPELINE_ASSETS, default_resources, defs
from adrec_assets.partitions import click_source_partitions
from adrec_assets.resources import ArtifactStoreResource, ClickSourceResource, EncoderResource
from adrec_assets.snapshots import SnapshotStore

TEST_ID_KEY = "test-key-0123456789abcdef"
ALL_CHECKS = list(defs.asset_checks or [])
#: The checks a default pipeline run evaluates: those on the artifacts it publishes (the
#: reports' checks, e.g. experiment_report's, run with the reports).
PIPELINE_CHECKS = [
    c for c in ALL_CHECKS if all(k.asset_key in {key for a in PIPELINE_ASSETS for key in a.keys} for k in c.check_keys)
]


#: The artifacts a pipeline run publishes in one snapshot, and their file types.
ASSET_FILES = {
    "raw_ads": "npz",
    "click_graph": "npz",
    "ad_embeddings_raw": "npz",
    "user_embeddings": "npz",
    "global_mean": "npz",
    "projector": "pt",
    "ad_projected": "npz",
    "served_users": "npz",
    "served_ads": "npz",
    "ad_index": "npz",
    "position_bias": "npz",
    "policy_posterior": "npz",
}


def load_artifact(base: Path, asset: str, partition: str = "synthetic"):
    """An artifact of the partition's published snapshot (or its report, for ``evaluation``),
    read with the same code the IO managers use."""
    if asset == "evaluation":
        from adrec_assets.artifacts import load_file

        return load_file(SnapshotStore(base, partition).folder / "reports" / "evaluation.npz")
    return SnapshotStore(base, partition).load(asset)


def load_from_run(base: Path, result: dg.ExecuteInJobResult, asset: str, partition: str = "synthetic"):
    """What a run staged as ``asset`` (a run of a few steps stages them without publishing)."""
    return SnapshotStore(base, partition).load_for_run(result.run_id, asset)


def published_files(base: Path, partition: str = "synthetic") -> dict[str, Path]:
    """asset -> the object file of the partition's published snapshot."""
    store = SnapshotStore(base, partition)
    snapshot = store.current()
    return {asset: store.path_of(asset, snapshot) for asset in snapshot.artifacts}


def resources_for(base_dir: Path, encoder_cache_dir: Path | None = None, **source_config) -> dict[str, object]:
    """``encoder_cache_dir``: the encoding cache's folder; default the session's throw-away
    ``$ADREC_ENCODER_CACHE_DIR`` (set in conftest). Never inside ``base_dir``: tests compare
    the artifact files there one by one."""
    return {
        **default_resources(ArtifactStoreResource(base_dir=str(base_dir))),
        "click_sources": ClickSourceResource(**source_config),
        "encoder": EncoderResource(cache_dir=str(encoder_cache_dir) if encoder_cache_dir is not None else None),
    }


@contextmanager
def id_key(value: str = TEST_ID_KEY) -> Iterator[None]:
    previous = os.environ.get("ADREC_ID_KEY")
    os.environ["ADREC_ID_KEY"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ADREC_ID_KEY", None)
        else:
            os.environ["ADREC_ID_KEY"] = previous


#: Run config for the tests' tiny file sources (a few dozen clicks): the training step floor
#: (``min_steps``) exists so that small real sources converge, but on a toy source it would
#: only make every one of these plumbing tests train as long as the synthetic source.
TINY_SOURCE_RUN_CONFIG = {
    "ops": {
        "user_embeddings": {"config": {"min_steps": 0}},
        "projector": {"config": {"min_steps": 0}},
    }
}


def _default_run_config(partition: str, selection) -> dict:
    """Real defaults for ``synthetic``; for toy file sources, TINY_SOURCE_RUN_CONFIG limited to
    the selected training ops (Dagster rejects config for ops outside the run)."""
    if partition == "synthetic":
        return {}
    if selection is None:
        return TINY_SOURCE_RUN_CONFIG
    if isinstance(selection, list) and all(isinstance(s, str) for s in selection):
        ops = {op: cfg for op, cfg in TINY_SOURCE_RUN_CONFIG["ops"].items() if op in selection}
        return {"ops": ops} if ops else {}
    return {}


def materialize_pipeline(
    instance: dg.DagsterInstance,
    base_dir: Path,
    partition: str = "synthetic",
    selection: list | None = None,
    run_config: dict | None = None,
    raise_on_error: bool = True,
    encoder_cache_dir: Path | None = None,
    **source_config,
) -> dg.ExecuteInJobResult:
    if partition not in instance.get_dynamic_partitions(click_source_partitions.name):
        instance.add_dynamic_partitions(click_source_partitions.name, [partition])
    with id_key():
        return dg.materialize(
            [*ALL_ASSETS, *ALL_CHECKS],
            # default: the serving pipeline and its checks, not the (slow) evaluation report
            selection=selection if selection is not None else dg.AssetSelection.assets(*PIPELINE_ASSETS),
            partition_key=partition,
            resources=resources_for(base_dir, encoder_cache_dir, **source_config),
            instance=instance,
            # The built-in synthetic source runs with the real defaults; file sources in tests
            # are toys (see TINY_SOURCE_RUN_CONFIG) unless a test passes its own config.
            run_config=run_config if run_config is not None else _default_run_config(partition, selection),
            raise_on_error=raise_on_error,
        )


def failure_message(result: dg.ExecuteInJobResult) -> str:
    """The full text of the first step failure, causes included (Dagster wraps user errors)."""
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    parts = []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)
