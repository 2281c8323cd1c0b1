"""Tests for the projector model, its checkpoint, and both training loops."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from adrec_assets.ml.models import Projector, TrainedProjector
from adrec_assets.ml.params import ProjectorParams, UserTrainingParams
from adrec_assets.ml.training import (
    TrainingDataError,
    fit_popularity_head,
    planned_epochs,
    planned_steps,
    project,
    refresh_steps,
    score_bias,
    train_projector,
    train_user_embeddings,
)
from adrec_assets.ml.types import ArtifactError, ClickGraph
from adrec_assets_tests.metric_helpers import group_cosine_separation


def _trained(model: Projector, encoder_id: str = "e", user_space: str = "u") -> TrainedProjector:
    return TrainedProjector.trained(model, encoder_id, user_space, "inputs", "full_retrain")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------- model


def test_projector_architecture():
    """Linear(768,512) -> LayerNorm(512) -> GELU -> Dropout -> Linear(512,128)."""
    net = Projector(768, 128).net
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Linear]
    assert (net[0].in_features, net[0].out_features) == (768, 512)
    assert tuple(net[1].normalized_shape) == (512,)
    assert net[3].p == pytest.approx(0.1)
    assert (net[4].in_features, net[4].out_features) == (512, 128)


def test_projector_output_shape_and_unit_norm():
    """Output is (n, 128) with unit-length rows."""
    torch.manual_seed(0)
    model = Projector(768, 128).eval()
    out = model(torch.randn(5, 768))
    assert out.shape == (5, 128)
    np.testing.assert_allclose(out.norm(dim=-1).detach().numpy(), 1.0, atol=1e-5)


def test_checkpoint_round_trip_weights_only():
    """to_checkpoint -> torch.save -> torch.load(weights_only=True) rebuilds an identical model."""
    torch.manual_seed(1)
    params = ProjectorParams(hidden_dim=8, dropout=0.2)
    tp = _trained(Projector(16, 4, params).eval(), encoder_id="enc:x", user_space="users:abc")
    buf = io.BytesIO()
    torch.save(tp.to_checkpoint(), buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    back = TrainedProjector.from_checkpoint(ck)
    assert back.encoder_id == "enc:x" and back.user_space == "users:abc"
    assert back.params == params and (back.model.in_dim, back.model.out_dim) == (16, 4)
    assert not back.model.training
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), tp.model(x), rtol=0, atol=0)


def test_checkpoint_wrong_format_raises():
    """A dict without the projector format tag is refused."""
    tp = _trained(Projector(4, 2, ProjectorParams(hidden_dim=4)))
    ck = tp.to_checkpoint()
    ck["format"] = "something.else"
    with pytest.raises(ArtifactError, match="not a adrec.projector.v4 projector checkpoint"):
        TrainedProjector.from_checkpoint(ck)
    ck["format"] = "adrec.projector.v3"  # before the structured-field encoding: must be re-trained
    with pytest.raises(ArtifactError, match="re-materialize the projector"):
        TrainedProjector.from_checkpoint(ck)
    with pytest.raises(ArtifactError):
        TrainedProjector.from_checkpoint({})


# ---------------------------------------------------------------- planted graph


def _planted():
    """2 groups x 30 users; group g clicks its own 5 ads (3 each) + 10% cross-group noise.
    Plus user 'iso' whose only ad 'solo' nobody else clicks."""
    rng = np.random.default_rng(123)
    users, ads, labels = [], [], {}
    for g in range(2):
        for i in range(30):
            uid = f"g{g}-u{i:02d}"
            labels[uid] = g
            for a in rng.choice(5, size=3, replace=False):
                users.append(uid)
                ads.append(f"g{g}-ad{a}")
            if rng.random() < 0.1:
                users.append(uid)
                ads.append(f"g{1 - g}-ad{rng.integers(5)}")
    users.append("iso")
    ads.append("solo")
    graph = ClickGraph.from_pairs(np.array(users), np.array(ads))
    user_labels = np.array([labels.get(u, -1) for u in graph.user_ids])
    ad_labels = np.array([-1 if a == "solo" else int(a[1]) for a in graph.ad_ids])
    return graph, user_labels, ad_labels


GRAPH, USER_LABELS, AD_LABELS = _planted()
USER_PARAMS = UserTrainingParams(dim=32, epochs=20, batch_size=32, lr=0.03, seed=0, min_steps=0)


@pytest.fixture(scope="module")
def user_result():
    return train_user_embeddings(GRAPH, USER_PARAMS)


def test_user_training_recovers_planted_groups(user_result):
    """Users of the same group end up clearly closer than users of different groups."""
    members = USER_LABELS >= 0
    within, across = group_cosine_separation(user_result.vectors[members], USER_LABELS[members])
    assert within > 0.15 and within - across > 0.3, (within, across)


def test_user_vectors_unit_norm_and_shape(user_result):
    """One unit-norm float32 row per graph user."""
    v = user_result.vectors
    assert v.shape == (GRAPH.n_users, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert len(user_result.history.epoch_losses) == 20
    assert user_result.history.epoch_losses[-1] < user_result.history.epoch_losses[0]


def test_isolated_user_gets_normalized_mean(user_result):
    """The user whose only ad has no other clicker is flagged and gets the others' mean direction."""
    iso = GRAPH.user_ids == "iso"
    np.testing.assert_array_equal(user_result.isolated, iso)
    others = user_result.vectors[~iso].astype(np.float64)
    mean = others.mean(axis=0)
    np.testing.assert_allclose(user_result.vectors[iso][0], mean / np.linalg.norm(mean), atol=1e-6)


def test_user_training_determinism(user_result):
    """Same seed -> bitwise identical vectors; another seed -> different vectors."""
    again = train_user_embeddings(GRAPH, USER_PARAMS)
    assert np.array_equal(again.vectors, user_result.vectors)
    other = train_user_embeddings(
        GRAPH, UserTrainingParams(dim=32, epochs=20, batch_size=32, lr=0.03, seed=1, min_steps=0)
    )
    assert not np.allclose(other.vectors, user_result.vectors, atol=1e-3)


def _dense_random_graph() -> ClickGraph:
    """50 users x 10 ads, ~430 distinct clicks: each batch repeats every user many times."""
    rng = np.random.default_rng(0)
    return ClickGraph.from_pairs(
        np.array([f"u{i}" for i in rng.integers(0, 50, 1024)]),
        np.array([f"a{i}" for i in rng.integers(0, 10, 1024)]),
    )


def _with_two_threads(fn):
    """Run fn with >= 2 intra-op threads (the module otherwise pins 1), then restore 1."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    try:
        return fn()
    finally:
        torch.set_num_threads(1)


def test_user_training_bitwise_deterministic_with_threads():
    """Same seed -> identical vectors with 2 threads and batches of 512 x 128, big enough for
    torch to split the gradient scatter-add of repeated rows across threads."""
    g = _dense_random_graph()
    params = UserTrainingParams(dim=128, epochs=2, batch_size=512, seed=0, min_steps=0)
    runs = _with_two_threads(lambda: [train_user_embeddings(g, params).vectors for _ in range(3)])
    for other in runs[1:]:
        assert np.array_equal(runs[0], other), float(np.abs(runs[0] - other).max())


def test_projector_bitwise_deterministic_with_threads():
    """Same seed -> identical projector weights with 2 threads and large batches."""
    g = _dense_random_graph()
    rng = np.random.default_rng(1)
    content = rng.normal(size=(g.n_ads, 32)).astype(np.float32)
    users = rng.normal(size=(g.n_users, 128))
    users = (users / np.linalg.norm(users, axis=1, keepdims=True)).astype(np.float32)
    params = ProjectorParams(hidden_dim=32, epochs=2, batch_size=1024, seed=0, min_steps=0)
    runs = _with_two_threads(lambda: [train_projector(g, content, users, params).model.state_dict() for _ in range(2)])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_user_training_leaves_global_rng_untouched():
    """Training neither advances the caller's global torch RNG nor leaves global flags changed."""
    torch.manual_seed(999)
    before = torch.get_rng_state().clone()
    deterministic = torch.are_deterministic_algorithms_enabled()
    train_user_embeddings(GRAPH, UserTrainingParams(dim=8, epochs=2, batch_size=32, seed=5, min_steps=0))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_no_co_click_raises():
    """A graph where every ad has a single clicker cannot train a user space."""
    g = ClickGraph.from_pairs(np.array(["a", "b", "c"]), np.array(["x", "y", "z"]))
    with pytest.raises(TrainingDataError, match="co-click"):
        train_user_embeddings(g, UserTrainingParams(epochs=1, batch_size=4, min_steps=0))


@pytest.mark.parametrize("bs", [0, 1])
def test_batch_size_below_two_raises(bs):
    """In-batch negatives need batch_size >= 2 (both training loops)."""
    with pytest.raises(ValueError, match="batch_size"):
        train_user_embeddings(GRAPH, UserTrainingParams(epochs=1, batch_size=bs, min_steps=0))
    with pytest.raises(ValueError, match="batch_size"):
        train_projector(
            GRAPH,
            np.zeros((GRAPH.n_ads, 8), np.float32),
            np.zeros((GRAPH.n_users, 4), np.float32),
            ProjectorParams(epochs=1, batch_size=bs, min_steps=0),
        )


# ---------------------------------------------------------------- projector


def _content(seed: int = 7) -> np.ndarray:
    """Per-group random unit direction + noise, 768-d; 'solo' gets pure noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, 768))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = 0.5 * rng.normal(size=(GRAPH.n_ads, 768)) / np.sqrt(768)
    for a, lab in enumerate(AD_LABELS):
        if lab >= 0:
            x[a] += centers[lab]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


PROJ_PARAMS = ProjectorParams(hidden_dim=64, epochs=15, batch_size=32, seed=0, min_steps=0)


@pytest.fixture(scope="module")
def projector_result(user_result):
    return train_projector(GRAPH, _content(), user_result.vectors, PROJ_PARAMS)


def test_projected_ads_land_near_their_group(projector_result, user_result):
    """Every group-A ad is projected closer to group-A users' mean than to group-B's (and vice versa)."""
    projected = project(projector_result.model, _content())
    means = np.stack([user_result.vectors[USER_LABELS == g].mean(axis=0) for g in range(2)])
    sims = projected @ means.T
    for a, lab in enumerate(AD_LABELS):
        if lab >= 0:
            assert sims[a, lab] > sims[a, 1 - lab], (GRAPH.ad_ids[a], sims[a])
    assert projector_result.n_trained_ads == GRAPH.n_ads
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)


def test_projector_determinism(projector_result, user_result):
    """Same seed -> bitwise identical weights and global RNG untouched."""
    torch.manual_seed(31)
    before = torch.get_rng_state().clone()
    again = train_projector(GRAPH, _content(), user_result.vectors, PROJ_PARAMS)
    assert torch.equal(torch.get_rng_state(), before)
    s1, s2 = projector_result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert projector_result.history.epoch_losses == again.history.epoch_losses


def test_projector_mismatched_rows_raise(user_result):
    """Content or user matrices whose rows do not match the graph are rejected."""
    with pytest.raises(ValueError, match="rows"):
        train_projector(GRAPH, _content()[:-1], user_result.vectors, PROJ_PARAMS)
    with pytest.raises(ValueError, match="rows"):
        train_projector(GRAPH, _content(), user_result.vectors[:-1], PROJ_PARAMS)


# ---------------------------------------------------------------- schedule and popularity head


def test_planned_epochs_raise_small_sources_to_the_step_floor():
    """Steps, not passes: 100 pairs / batch 10 = 10 steps per epoch -> 2000 steps = 200 epochs."""
    assert planned_epochs(20, 2000, n_pairs=100, batch_size=10) == 200
    assert planned_epochs(20, 2000, n_pairs=1_000_000, batch_size=500) == 20  # big: epochs rule
    assert planned_epochs(20, 0, n_pairs=100, batch_size=10) == 20
    assert planned_epochs(0, 2000, n_pairs=100, batch_size=10) == 0  # explicit "no training"
    assert planned_epochs(1, 25, n_pairs=101, batch_size=10) == 3  # 11 steps per epoch, ceil


def test_the_step_cap_bounds_large_sources_but_never_cuts_the_user_table_below_one_pass():
    # ml-latest-small's user space: 391 steps per pass, 20 passes capped at 4,000 steps
    assert planned_steps(20, 2000, 4000, n_pairs=200_000, batch_size=512, at_least_one_pass=True) == 4000
    # a million users: one pass (19,532 steps) is more than the cap, and every user needs a visit
    assert planned_steps(20, 2000, 4000, n_pairs=10_000_000, batch_size=512, at_least_one_pass=True) == 19_532
    # the projector is one shared MLP: the cap is its schedule at any size
    assert planned_steps(10, 1500, 4000, n_pairs=10_000_000, batch_size=128, at_least_one_pass=False) == 4000
    # small sources: the floor still raises them; 0 = no cap; 0 epochs = no training
    assert planned_steps(20, 2000, 4000, n_pairs=100, batch_size=10, at_least_one_pass=True) == 2000
    assert planned_steps(20, 2000, 0, n_pairs=200_000, batch_size=512, at_least_one_pass=True) == 20 * 391
    assert planned_steps(0, 2000, 4000, n_pairs=100, batch_size=10, at_least_one_pass=True) == 0


def test_a_refresh_is_its_passes_or_the_same_share_of_a_capped_full_schedule():
    # uncapped: 2 of 20 passes
    assert refresh_steps(20 * 391, 2, 20, n_pairs=200_000, batch_size=512) == 2 * 391
    # capped full schedule (4,000 steps = 10 passes): a refresh is 2/20 of it, not 2 full passes
    assert refresh_steps(4000, 2, 20, n_pairs=200_000, batch_size=512) == 400
    assert refresh_steps(4000, 2, 10, n_pairs=1_000_000, batch_size=128) == 800


def test_training_stops_at_the_step_cap_mid_pass():
    params = UserTrainingParams(dim=8, epochs=50, batch_size=32, min_steps=0, max_steps=0)
    full = train_user_embeddings(GRAPH, params)
    per_pass = full.history.steps // 50
    capped = train_user_embeddings(
        GRAPH, UserTrainingParams(dim=8, epochs=50, batch_size=32, min_steps=0, max_steps=3 * per_pass + 2)
    )
    assert capped.history.steps == 3 * per_pass + 2 and len(capped.history.epoch_losses) == 4
    once = train_user_embeddings(GRAPH, UserTrainingParams(dim=8, epochs=50, batch_size=32, min_steps=0, max_steps=1))
    assert once.history.steps == per_pass  # never below one pass over the users' clicks
    proj = train_projector(
        GRAPH,
        _content(),
        full.vectors,
        ProjectorParams(hidden_dim=16, epochs=50, batch_size=32, min_steps=0, max_steps=7),
    )
    assert proj.history.steps == 7 and proj.history.pairs <= 7 * 32 < 50 * GRAPH.n_clicks


def test_user_training_runs_at_least_min_steps():
    result = train_user_embeddings(GRAPH, UserTrainingParams(dim=8, epochs=1, batch_size=32, min_steps=50))
    losses = result.history.epoch_losses
    assert result.history.steps >= 50 and len(losses) > 1
    earlier = losses[int(round(0.9 * len(losses))) - 1]
    assert result.history.late_improvement() == pytest.approx((earlier - losses[-1]) / earlier)


def _popular_graph_and_content(n_ads: int = 60, seed: int = 0) -> tuple[ClickGraph, np.ndarray]:
    """Ad popularity grows with content coordinate 0: the head must find that."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n_ads, 16))
    content[:, 0] = np.linspace(-1, 1, n_ads)
    clicks_per_ad = np.round(np.exp(2 + 1.5 * content[:, 0])).astype(int)
    users, ads = [], []
    for a, n in enumerate(clicks_per_ad):
        for u in rng.choice(400, size=n, replace=False):
            users.append(f"u{u:03d}")
            ads.append(f"ad{a:03d}")
    graph = ClickGraph.from_pairs(np.array(users), np.array(ads))
    order = [int(a[2:]) for a in graph.ad_ids]
    return graph, content[order].astype(np.float32)


def test_popularity_head_predicts_click_counts_as_z_scores():
    graph, content = _popular_graph_and_content()
    model = Projector(16, 4, ProjectorParams(hidden_dim=8, popularity_weight=0.25))
    assert score_bias(model, content).tolist() == [0.0] * graph.n_ads  # unfitted head: no claim
    fit_popularity_head(model, graph, content, seed=0)
    with torch.no_grad():
        z = model.popularity_z(torch.from_numpy(content)).numpy()
    target = np.log1p(graph.ad_degrees())
    assert abs(z.mean()) < 0.05 and 0.8 < z.std() <= 1.0  # standardized target, well predicted
    assert np.corrcoef(z, target)[0, 1] > 0.9
    np.testing.assert_allclose(z, (target - target.mean()) / target.std(), atol=0.5)
    np.testing.assert_allclose(score_bias(model, content), 0.25 * z, rtol=1e-5, atol=1e-6)


def test_popularity_head_is_part_of_training_and_checkpoint():
    graph, content = _popular_graph_and_content()
    users = np.random.default_rng(1).normal(size=(graph.n_users, 4)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    params = ProjectorParams(hidden_dim=8, epochs=1, batch_size=64, min_steps=0, popularity_weight=0.5)
    model = train_projector(graph, content, users, params).model
    bias = score_bias(model, content)
    assert np.corrcoef(bias, np.log1p(graph.ad_degrees()))[0, 1] > 0.9
    back = TrainedProjector.from_checkpoint(_trained(model).to_checkpoint())
    np.testing.assert_array_equal(score_bias(back.model, content), bias)
    assert back.params.popularity_weight == 0.5


def test_popularity_that_content_cannot_predict_gives_a_small_bias():
    """Clicks unrelated to content: the head must not inflate noise to unit variance."""
    graph, content = _popular_graph_and_content()
    noise = np.random.default_rng(9).normal(size=content.shape).astype(np.float32)
    model = Projector(16, 4, ProjectorParams(hidden_dim=8, popularity_weight=1.0))
    fit_popularity_head(model, graph, noise, seed=0)
    assert score_bias(model, noise).std() < 0.5


def test_too_few_clicked_ads_leave_the_popularity_head_at_zero():
    graph = ClickGraph.from_pairs(np.array(["u1", "u2", "u1"]), np.array(["a", "a", "b"]))
    model = Projector(4, 2, ProjectorParams(hidden_dim=4))
    fit_popularity_head(model, graph, np.eye(2, 4, dtype=np.float32), seed=0)
    assert score_bias(model, np.eye(2, 4, dtype=np.float32)).tolist() == [0.0, 0.0]
