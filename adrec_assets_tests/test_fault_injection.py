"""Fault injection: whatever fails or dies during a run, readers see the complete old snapshot
or the complete new one, never a mix, and every published artifact loads.

* a failure raised inside each step in turn (in process);
* ``kill -9`` of the run's process at each step boundary and inside publication
  (a forked child per case, so each costs a run, not an interpreter start);
* two runs of one source at the same time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from adrec_assets import snapshots
from adrec_assets.io_managers import SnapshotIOManager
from adrec_assets.snapshots import SnapshotError, SnapshotStore, check_consistency
from adrec_assets_tests.pipeline_fixtures import (
    ASSET_FILES,
    TINY_SOURCE_RUN_CONFIG,
    failure_message,
    materialize_pipeline,
)
from adrec_assets_tests.test_file_sources import write_valid_source

SOURCE = "shop"
STEPS = tuple(ASSET_FILES)  # the artifact steps, in pipeline order


def _state(base: Path) -> tuple[str | None, dict[str, bytes]]:
    """(published snapshot id, asset -> bytes of its object): what every reader sees."""
    store = SnapshotStore(base, SOURCE)
    current = store.current_id()
    if current is None:
        return None, {}
    snapshot = store.snapshot(current)
    return current, {asset: store.path_of(asset, snapshot).read_bytes() for asset in snapshot.artifacts}


def _assert_complete_and_loadable(base: Path) -> None:
    store = SnapshotStore(base, SOURCE)
    snapshot = store.current()
    check_consistency(lambda asset: store.load(asset, snapshot), sorted(snapshot.artifacts), STEPS)


def _change_the_source(root: Path) -> None:
    """New clicks and a new ad: a successful run changes every artifact."""
    folder = root / SOURCE
    with open(folder / "ads.csv", "a") as handle:
        handle.write("ad-new,A brand-new ad for running shoes\n")
    (folder / "clicks" / "part-001.csv").write_text("user_id,ad_id\nuser-00,ad-new\nuser-01,ad-new\nuser-02,ad-0\n")


@pytest.fixture(scope="module")
def published(tmp_path_factory, encoder):
    """A toy source with one published snapshot (the old state), and the new source files."""
    root, base = tmp_path_factory.mktemp("sources"), tmp_path_factory.mktemp("artifacts")
    write_valid_source(root, SOURCE)
    with dg.instance_for_test() as instance:
        assert materialize_pipeline(instance, base, partition=SOURCE, root=str(root)).success
        old = _state(base)
        _change_the_source(root)
        # encode the new ad once here: the children then find every ad in the encoding cache
        # and never load the encoder's weights (they would pay it in every case)
        scratch = tmp_path_factory.mktemp("scratch")
        assert materialize_pipeline(instance, scratch, partition=SOURCE, root=str(root),
                                    selection=["raw_ads", "ad_embeddings_raw"]).success  # fmt: skip
        yield root, base, old


@pytest.fixture
def work(published, tmp_path):
    """A private copy of the published state, so each case starts from the old snapshot."""
    import shutil

    root, base, old = published
    shutil.copytree(root, tmp_path / "sources", symlinks=True)
    shutil.copytree(base, tmp_path / "artifacts")
    return tmp_path / "sources", tmp_path / "artifacts", old


@pytest.mark.parametrize("failing", [*STEPS, "snapshot"])
def test_a_failure_inside_any_step_publishes_nothing(work, failing, monkeypatch):
    root, base, old = work
    real_stage, real_publish = snapshots.SnapshotStore.stage, snapshots.SnapshotStore.publish

    def stage(self, run_id, asset, obj):
        if asset == failing:
            raise RuntimeError(f"injected failure in {asset}")
        return real_stage(self, run_id, asset, obj)

    def publish(self, run_id, validate=None, keep=None):
        raise RuntimeError("injected failure in snapshot")

    monkeypatch.setattr(snapshots.SnapshotStore, "stage", stage)
    if failing == "snapshot":
        monkeypatch.setattr(snapshots.SnapshotStore, "publish", publish)
    with dg.instance_for_test() as instance:
        result = materialize_pipeline(instance, base, partition=SOURCE, root=str(root), raise_on_error=False)
    assert not result.success and f"injected failure in {failing}" in failure_message(result)
    assert _state(base) == old  # the complete old snapshot, byte for byte
    _assert_complete_and_loadable(base)
    monkeypatch.setattr(snapshots.SnapshotStore, "stage", real_stage)
    monkeypatch.setattr(snapshots.SnapshotStore, "publish", real_publish)


# ---------------------------------------------------------------- kill -9


def _run_and_die(base: str, root: str, kill_at: str) -> None:
    """Child process: materialize the source and SIGKILL itself at ``kill_at``:
    ``after:<step>`` once that step's output is staged, ``publish:manifest`` after the new
    manifest is written but before CURRENT moves, ``publish:current`` just after it moved."""
    import torch

    torch.set_num_threads(1)
    real_stage, real_write = snapshots.SnapshotStore.stage, snapshots._write_json

    def stage(self, run_id, asset, obj):
        path = real_stage(self, run_id, asset, obj)
        if kill_at == f"after:{asset}":
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def write_json(path, payload):
        if kill_at == "publish:manifest" and Path(path).name == "CURRENT":
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, payload)
        if kill_at == "publish:current" and Path(path).name == "CURRENT":
            os.kill(os.getpid(), signal.SIGKILL)

    snapshots.SnapshotStore.stage = stage
    snapshots._write_json = write_json
    with dg.instance_for_test() as instance:
        materialize_pipeline(instance, Path(base), partition=SOURCE, root=root, raise_on_error=False)
    os._exit(3)  # not killed: the test fails on the exit code


KILL_POINTS = [*(f"after:{step}" for step in STEPS), "publish:manifest", "publish:current"]


@pytest.fixture(scope="module")
def forked():
    """Children forked from a fork server that has dagster, torch and faiss imported
    (``fault_preload``), so each case costs a run, not an interpreter start."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["adrec_assets_tests.fault_preload"])
    return context


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_9_at_any_step_boundary_leaves_the_old_or_the_new_snapshot_whole(work, forked, kill_at):
    root, base, old = work
    child = forked.Process(target=_run_and_die, args=(str(base), str(root), kill_at))
    child.start()
    child.join(timeout=240)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed at {kill_at} (exit {child.exitcode})"
    current, files = _state(base)
    if kill_at == "publish:current":
        assert current != old[0] and set(files) == set(STEPS)  # the new snapshot, complete
        assert SnapshotStore(base, SOURCE).load("raw_ads").ad_ids[-1] == "ad-new"
    else:
        assert (current, files) == old
    _assert_complete_and_loadable(base)
    # what the killed run left behind is garbage once no run is going
    report = SnapshotStore(base, SOURCE).gc(grace_seconds=0)
    assert not (base / SOURCE / "runs").exists() or not any((base / SOURCE / "runs").iterdir())
    assert not [p for p in base.rglob("*") if ".tmp-" in p.name]
    _assert_complete_and_loadable(base)
    if kill_at.startswith("after:"):
        assert report.runs_removed == 1


def _materialize(base: str, root: str, barrier) -> None:
    import torch

    torch.set_num_threads(1)
    real = SnapshotIOManager.load_input

    def load_input(self, context):  # both runs read their inputs before either publishes
        barrier.wait(timeout=120)
        return real(self, context)

    SnapshotIOManager.load_input = load_input
    with dg.instance_for_test() as instance:
        result = materialize_pipeline(
            instance, Path(base), partition=SOURCE, root=root, raise_on_error=False,
            run_config={"ops": {**TINY_SOURCE_RUN_CONFIG["ops"]}},
        )  # fmt: skip
        message = "" if result.success else failure_message(result)
    os._exit(0 if result.success else (4 if "another run published" in message else 5))


def test_two_overlapping_runs_of_one_source_end_consistent(work, forked):
    """Without the run queue (e.g. two CLI materializations), the second publisher is refused
    because its inputs are stale; the published snapshot is one run's complete output."""
    root, base, old = work
    barrier = forked.Barrier(2)
    children = [forked.Process(target=_materialize, args=(str(base), str(root), barrier)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    codes = sorted(child.exitcode for child in children)
    assert codes in ([0, 0], [0, 4]), codes  # both fine (same output) or the loser refused cleanly
    current, files = _state(base)
    assert current != old[0] and set(files) == set(STEPS)
    _assert_complete_and_loadable(base)
    users = SnapshotStore(base, SOURCE).load("served_users")
    assert np.isfinite(users.vectors).all()


def test_a_publisher_is_refused_exactly_when_another_changed_the_snapshot_since_its_base(work):
    """The compare-and-swap does not depend on timing: a run whose base is no longer current
    cannot publish, whatever it staged; a run whose base is still current can."""
    _, base, _ = work
    store = SnapshotStore(base, SOURCE)
    store.base_of("unchanged-meanwhile")
    store.stage("same-content", "global_mean", store.load("global_mean"))
    store.publish("same-content")  # identical content: the snapshot id, and so the base, stays current
    store.stage("unchanged-meanwhile", "global_mean", store.load("global_mean"))
    assert store.publish("unchanged-meanwhile").id == store.current_id()
    store.base_of("stale")
    projected = store.load("ad_projected")
    changed = type(projected)(projected.ids, projected.vectors, projected.space, projected.encoder_id,
                              projected.score_bias + 0.5)  # fmt: skip
    store.stage("winner", "ad_projected", changed)
    winner = store.publish("winner")
    store.stage("stale", "global_mean", store.load("global_mean"))
    with pytest.raises(SnapshotError, match="another run published"):
        store.publish("stale")
    assert store.current_id() == winner.id
