"""The snapshot store on its own (no Dagster): staging, all-or-nothing publication, reads that
stay within one run, compare-and-swap against a concurrent publisher, rollback and gc."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from adrec_assets.ml.types import GlobalMean, ProjectedAds
from adrec_assets.snapshots import SnapshotError, SnapshotStore, check_consistency, snapshot_id


def prior(value: float, space: str = "users:a") -> GlobalMean:
    vector = np.array([value, np.sqrt(1 - value**2)], dtype=np.float32)
    return GlobalMean(vector, 3, 0.5, space)


def ads(space: str = "users:a") -> ProjectedAds:
    return ProjectedAds(np.array(["x", "y"]), np.eye(2, dtype=np.float32), space, "enc", np.zeros(2, np.float32))


def publish_prior(store: SnapshotStore, run: str, value: float) -> str:
    store.stage(run, "global_mean", prior(value))
    return store.publish(run).id


def test_nothing_is_visible_before_publication(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    store.stage("run-1", "global_mean", prior(0.6))
    with pytest.raises(SnapshotError, match="no published snapshot.*make run SOURCE=shop"):
        store.current()
    snapshot = store.publish("run-1")
    assert store.current_id() == snapshot.id and store.history() == [snapshot.id]
    np.testing.assert_allclose(store.load("global_mean").vector, prior(0.6).vector)
    assert not (tmp_path / "shop" / "runs" / "run-1").exists()  # the staging record is gone


def test_a_run_reads_its_own_outputs_and_otherwise_the_snapshot_it_started_from(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    first = publish_prior(store, "run-1", 0.6)
    store.stage("run-2", "ad_projected", ads())
    assert store.load_for_run("run-2", "global_mean").vector[0] == pytest.approx(0.6)  # base: run-1's
    assert store.base_of("run-2") == first
    # another run publishes meanwhile: run-2 keeps reading its base, never a mix
    publish_prior(store, "run-3", 0.8)
    assert store.load_for_run("run-2", "global_mean").vector[0] == pytest.approx(0.6)
    assert store.load_for_run("run-2", "ad_projected").space == "users:a"


def test_publishing_over_a_newer_snapshot_is_refused_and_changes_nothing(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    publish_prior(store, "run-1", 0.6)
    store.stage("slow", "global_mean", prior(0.7))
    assert store.base_of("slow") is not None
    winner = publish_prior(store, "fast", 0.8)
    with pytest.raises(SnapshotError, match="another run published.*re-run"):
        store.publish("slow")
    assert store.current_id() == winner
    assert store.load("global_mean").vector[0] == pytest.approx(0.8)


def test_validation_refuses_a_snapshot_whose_artifacts_do_not_fit(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    store.stage("run-1", "global_mean", prior(0.6, space="users:a"))
    store.stage("run-1", "ad_projected", ads(space="users:b"))
    required = ("global_mean", "ad_projected")
    with pytest.raises(SnapshotError, match="user spaces differ between global_mean, ad_projected"):
        store.publish("run-1", lambda load, assets: check_consistency(load, assets, required))
    assert store.current_id() is None
    store.stage("run-2", "global_mean", prior(0.6, space="users:b"))
    with pytest.raises(SnapshotError, match=r"would lack \['ad_projected'\]"):
        store.publish("run-2", lambda load, assets: check_consistency(load, assets, required))


def test_snapshot_ids_are_content_hashes_so_identical_outputs_publish_nothing_new(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    first = publish_prior(store, "run-1", 0.6)
    again = publish_prior(store, "run-2", 0.6)
    assert again == first and store.history() == [first]
    assert snapshot_id({"a": "1.npz"}) != snapshot_id({"a": "2.npz"})


def test_rollback_goes_back_one_snapshot_and_history_is_bounded(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    ids = [publish_prior(store, f"run-{i}", 0.1 * (i + 1)) for i in range(7)]
    assert store.history() == ids[::-1][:5]  # keeps the last five by default
    previous = store.rollback()
    assert previous.id == ids[-2] and store.current_id() == ids[-2]
    assert store.load("global_mean").vector[0] == pytest.approx(0.6)
    for _ in range(3):
        store.rollback()
    with pytest.raises(SnapshotError, match="no earlier snapshot"):
        store.rollback()


def test_gc_removes_forgotten_snapshots_dead_runs_and_temp_files_but_keeps_live_ones(tmp_path):
    store = SnapshotStore(tmp_path, "shop")
    ids = [publish_prior(store, f"run-{i}", 0.1 * (i + 1)) for i in range(7)]
    store.stage("crashed", "global_mean", prior(0.95))  # a run killed before publishing
    stray = tmp_path / "shop" / "objects" / ".abc.npz.tmp-1-deadbeef"
    stray.write_bytes(b"torn")
    in_flight = store.stage("running", "global_mean", prior(0.99))
    old = time.time() - 7200
    for path in [*(tmp_path / "shop").rglob("*")]:
        if "running" not in str(path) and path != in_flight:
            os.utime(path, (old, old))
    report = store.gc(grace_seconds=3600)
    assert report.runs_removed == 1 and report.temp_files_removed == 1
    assert report.snapshots_removed == 2 and report.objects_removed >= 3
    assert not stray.exists() and in_flight.exists()  # a live run keeps its objects
    for snapshot in store.history():
        store.load("global_mean", store.snapshot(snapshot))  # every kept snapshot still loads
    assert store.history() == ids[::-1][:5]


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_source_and_run_names_cannot_climb_out_of_the_root(tmp_path, bad):
    with pytest.raises(SnapshotError, match="not a safe name"):
        SnapshotStore(tmp_path, bad)
    with pytest.raises(SnapshotError, match="not a safe name"):
        SnapshotStore(tmp_path, "shop").stage(bad, "global_mean", prior(0.5))
