"""Incremental refresh: reuse on unchanged inputs, warm start after new clicks, full retrain
on request (and from the nightly schedule), and a failed refresh that leaves the previous
artifacts intact. Decisions are unit-tested in the ML core; the paths end to end on a toy
file source through real materializations."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.ml.refresh import (
    FULL_RETRAIN,
    REUSED,
    WARM_START,
    RefreshDecision,
    decide,
    graph_fingerprint,
    known_users,
    projector_continues,
    user_warm_init,
)
from adrec_assets.ml.training import normalized_mean, train_user_embeddings
from adrec_assets.ml.types import ClickGraph, TrainingProvenance, UserEmbeddings
from adrec_assets.snapshots import SnapshotStore
from adrec_assets_tests.pipeline_fixtures import ASSET_FILES, load_artifact, materialize_pipeline, published_files
from adrec_assets_tests.test_file_sources import write_valid_source

PARAMS = UserTrainingParams(dim=8, epochs=3, min_steps=0, batch_size=8)


def toy_graph(extra_users: int = 0) -> ClickGraph:
    users = [f"u{u}" for u in range(12 + extra_users) for _ in range(3)]
    ads = [f"a{(u * 2 + k) % 9}" for u in range(12 + extra_users) for k in range(3)]
    return ClickGraph.from_pairs(np.array(users), np.array(ads))


def previous_users(
    graph: ClickGraph, params: UserTrainingParams = PARAMS, trained_by: str = FULL_RETRAIN
) -> UserEmbeddings:
    result = train_user_embeddings(graph, params)
    return UserEmbeddings(
        ids=graph.user_ids,
        vectors=result.vectors,
        space="users:prev",
        isolated=result.isolated,
        provenance=TrainingProvenance(asdict(params), graph_fingerprint(graph), trained_by),
    )


def decide_users(warm_start: bool, previous: UserEmbeddings | None, why_none: str, params, graph) -> RefreshDecision:
    """What the user_embeddings asset asks: the one ``decide`` with the users' precondition."""
    return decide(
        previous.provenance if previous is not None else None, asdict(params), graph_fingerprint(graph),
        warm_start, lambda: known_users(graph, previous), why_none,
    )  # fmt: skip


# ---------------------------------------------------------------- ML core: decisions and init


def test_user_decisions_cover_every_path():
    graph = toy_graph()
    prev = previous_users(graph)
    assert decide_users(True, None, "no previous", PARAMS, graph) == RefreshDecision(FULL_RETRAIN, "no previous")
    assert decide_users(True, prev, "", PARAMS, graph).path == REUSED
    assert decide_users(False, prev, "", PARAMS, graph).path == REUSED  # it came from a full retrain
    warm_prev = previous_users(graph, trained_by=WARM_START)
    decision = decide_users(False, warm_prev, "", PARAMS, graph)
    assert decision.path == FULL_RETRAIN and "warm_start=false" in decision.reason
    changed = decide_users(True, prev, "", replace(PARAMS, lr=0.01), graph)
    assert changed.path == FULL_RETRAIN and "settings differ" in changed.reason
    grown = toy_graph(extra_users=2)
    assert decide_users(True, prev, "", PARAMS, grown).path == WARM_START
    assert decide_users(False, prev, "", PARAMS, grown).path == FULL_RETRAIN
    mostly_new = toy_graph(extra_users=20)
    decision = decide_users(True, prev, "", PARAMS, mostly_new)
    assert decision.path == FULL_RETRAIN and "of users are in the previous artifact" in decision.reason


def test_warm_init_keeps_known_users_and_starts_new_ones_at_the_global_mean():
    graph = toy_graph()
    prev = previous_users(graph)
    grown = toy_graph(extra_users=3)
    init, n_known = user_warm_init(grown.user_ids, prev)
    assert n_known == graph.n_users
    for row, user in enumerate(grown.user_ids):
        if user in set(graph.user_ids):
            np.testing.assert_array_equal(init[row], prev.vectors[list(graph.user_ids).index(user)])
        else:
            np.testing.assert_allclose(init[row], normalized_mean(prev.vectors[~prev.isolated])[0])


def test_training_starts_from_init_and_runs_the_given_epochs():
    graph = toy_graph()
    rng = np.random.default_rng(3)
    init = rng.normal(size=(graph.n_users, PARAMS.dim)).astype(np.float32)
    init_copy = init.copy()
    untouched = train_user_embeddings(graph, PARAMS, init=init, epochs=0)
    expected = init / np.linalg.norm(init, axis=1, keepdims=True)
    np.testing.assert_allclose(untouched.vectors[~untouched.isolated], expected[~untouched.isolated], atol=1e-6)
    refined = train_user_embeddings(graph, PARAMS, init=init, epochs=2)
    assert len(refined.history.epoch_losses) == 2
    assert not np.allclose(refined.vectors, untouched.vectors)
    again = train_user_embeddings(graph, PARAMS, init=init, epochs=2)
    np.testing.assert_array_equal(again.vectors, refined.vectors)  # seeded: same inputs, same numbers
    np.testing.assert_array_equal(init, init_copy)  # training works on its own copy


def test_projector_decisions_cover_every_path():
    params = asdict(ProjectorParams())
    prev = TrainingProvenance(params, "inputs-1", FULL_RETRAIN)
    prov = TrainingProvenance({}, "clicks", FULL_RETRAIN)
    users = UserEmbeddings(np.array(["u"]), np.ones((1, 8), np.float32), "users:prev", np.array([False]), prov)
    refined = UserEmbeddings(np.array(["u"]), np.ones((1, 8), np.float32), "users:new", np.array([False]),
                             TrainingProvenance({}, "clicks", WARM_START, "users:prev"))  # fmt: skip
    retrained = UserEmbeddings(np.array(["u"]), np.ones((1, 8), np.float32), "users:other", np.array([False]), prov)

    def decide_projector(warm, previous, encoder, users, inputs, settings=params):
        return decide(
            previous, settings, inputs, warm, lambda: projector_continues("enc-a", encoder, "users:prev", users)
        )

    assert decide(None, params, "inputs-1", True, lambda: None, "none") == RefreshDecision(FULL_RETRAIN, "none")
    assert decide_projector(True, prev, "enc-a", users, "inputs-1").path == REUSED
    encoder = decide_projector(True, prev, "enc-b", users, "inputs-2")
    assert encoder.path == FULL_RETRAIN and "encoder changed" in encoder.reason
    settings = decide_projector(True, prev, "enc-a", users, "inputs-1", {**params, "lr": 0.1})
    assert settings.path == FULL_RETRAIN and "settings differ" in settings.reason
    assert decide_projector(True, prev, "enc-a", refined, "inputs-2").path == WARM_START
    assert decide_projector(False, prev, "enc-a", refined, "inputs-2").path == FULL_RETRAIN
    unrelated = decide_projector(True, prev, "enc-a", retrained, "inputs-2")
    assert unrelated.path == FULL_RETRAIN and "retrained" in unrelated.reason


def test_the_precondition_is_only_evaluated_when_a_warm_start_is_possible():
    prev = TrainingProvenance({"a": 1}, "inputs-1", FULL_RETRAIN)

    def never():
        raise AssertionError("precondition evaluated")

    assert decide(prev, {"a": 1}, "inputs-1", True, never).path == REUSED
    assert decide(prev, {"a": 1}, "inputs-2", False, never).path == FULL_RETRAIN
    assert decide(prev, {"a": 2}, "inputs-2", True, never).path == FULL_RETRAIN


# ---------------------------------------------------------------- the assets, end to end

FULL = {"ops": {op: {"config": {"min_steps": 0, "warm_start": False}} for op in ("user_embeddings", "projector")}}
DEFAULT = {"ops": {op: {"config": {"min_steps": 0}} for op in ("user_embeddings", "projector")}}


def meta(result: dg.ExecuteInJobResult, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def digests(base: Path) -> dict[str, str]:
    """asset -> digest of its object in the published snapshot of ``shop``."""
    return {
        asset: hashlib.sha256(path.read_bytes()).hexdigest() for asset, path in published_files(base, "shop").items()
    }


@pytest.fixture
def shop(tmp_path):
    root, base = tmp_path / "sources", tmp_path / "artifacts"
    write_valid_source(root, "shop")
    with dg.instance_for_test() as instance:

        def run(config: dict = DEFAULT, **kwargs) -> dg.ExecuteInJobResult:
            return materialize_pipeline(instance, base, partition="shop", run_config=config, root=str(root), **kwargs)

        yield root, base, run


def add_clicks(root: Path) -> None:
    """Two known users click more, and one new user appears."""
    rows = "user_id,ad_id\nuser-00,ad-5\nuser-01,ad-0\nuser-new,ad-0\nuser-new,ad-1\n"
    (root / "shop" / "clicks" / "part-001.csv").write_text(rows)


def test_rematerializing_unchanged_inputs_reuses_the_artifacts(shop):
    root, base, run = shop
    first = run()
    assert meta(first, "user_embeddings")["training_path"] == FULL_RETRAIN
    assert meta(first, "user_embeddings")["training_path_reason"] == "no previous materialization of this partition"
    before = digests(base)
    projector_before = load_artifact(base, "projector", "shop")
    second = run()
    assert meta(second, "user_embeddings")["training_path"] == REUSED
    assert meta(second, "projector")["training_path"] == REUSED
    # same inputs and config: byte-identical .npz artifacts, the same projector weights
    after = digests(base)
    assert {k: v for k, v in after.items() if k != "projector"} == {k: v for k, v in before.items() if k != "projector"}
    assert meta(second, "snapshot")["snapshot_id"] == meta(first, "snapshot")["snapshot_id"]  # nothing changed
    projector_after = load_artifact(base, "projector", "shop")
    for name, tensor in projector_before.model.state_dict().items():
        assert torch.equal(tensor, projector_after.model.state_dict()[name]), name


def test_new_clicks_warm_start_and_new_users_begin_at_the_previous_spaces_mean(shop):
    root, base, run = shop
    run()
    old_users = load_artifact(base, "user_embeddings", "shop")
    old_mean = normalized_mean(old_users.trained_vectors())[0]
    add_clicks(root)
    result = run(
        {"ops": {op: {"config": {"min_steps": 0, "refresh_epochs": 0}} for op in ("user_embeddings", "projector")}}
    )
    users_meta, projector_meta = meta(result, "user_embeddings"), meta(result, "projector")
    assert users_meta["training_path"] == WARM_START and projector_meta["training_path"] == WARM_START
    assert users_meta["n_new_users_from_global_mean"] == 1
    assert users_meta["n_users_warm_started"] == len(old_users)
    assert users_meta["epochs_run"] == 0
    new_users = load_artifact(base, "user_embeddings", "shop")
    # zero refresh epochs: known users keep their vectors, the new one is the old space's mean
    for row, user in enumerate(new_users.ids):
        if user in set(old_users.ids):
            np.testing.assert_allclose(
                new_users.vectors[row], old_users.vectors[list(old_users.ids).index(user)], atol=1e-6
            )
        else:
            np.testing.assert_allclose(new_users.vectors[row], old_mean, atol=1e-6)
    assert new_users.provenance.warm_started_from == old_users.space
    projector = load_artifact(base, "projector", "shop")
    assert projector.provenance.trained_by == WARM_START and projector.user_space == new_users.space


def test_warm_start_false_retrains_and_matches_a_fresh_materialization(shop, tmp_path):
    root, base, run = shop
    run()
    add_clicks(root)
    result = run(FULL)
    assert meta(result, "user_embeddings")["training_path"] == FULL_RETRAIN
    assert "warm_start=false" in meta(result, "user_embeddings")["training_path_reason"]
    assert meta(result, "projector")["training_path"] == FULL_RETRAIN
    # a full retrain does not depend on the history: same vectors as a fresh instance
    fresh_base = tmp_path / "fresh"
    with dg.instance_for_test() as other:
        materialize_pipeline(other, fresh_base, partition="shop", run_config=FULL, root=str(root))
    np.testing.assert_array_equal(
        load_artifact(base, "user_embeddings", "shop").vectors,
        load_artifact(fresh_base, "user_embeddings", "shop").vectors,
    )


def test_a_failed_refresh_leaves_the_previous_artifacts_intact(shop, monkeypatch):
    root, base, run = shop
    run()
    before = digests(base)
    assert set(before) == set(ASSET_FILES)
    published = SnapshotStore(base, "shop").current_id()
    add_clicks(root)

    def diverge(*args, **kwargs):
        raise FloatingPointError("simulated divergence during the warm start")

    monkeypatch.setattr("adrec_assets.assets.projector.train_projector", diverge)
    result = run(raise_on_error=False)
    assert not result.success
    assert meta(result, "user_embeddings")["training_path"] == WARM_START  # the step before it succeeded
    # nothing of the failed run is visible: the same snapshot, byte for byte, not even the
    # user vectors that did train (they would not fit the old projector)
    assert SnapshotStore(base, "shop").current_id() == published
    assert digests(base) == before
    monkeypatch.undo()
    # the next run picks up from what is stored: the projector's previous file is still usable
    retry = run()
    assert retry.success and meta(retry, "projector")["training_path"] == WARM_START
