"""Tests for adrec_assets.ml.sampling on small hand-built click graphs."""

from collections import Counter

import numpy as np
import pytest

from adrec_assets.ml.sampling import AdClickerPairSampler, CoClickPairSampler, clicker_centroids
from adrec_assets.ml.types import ClickGraph

# u0..u3 click ad A (4 clickers); u1 and u4 click B; u5 alone clicks C; u6 alone clicks D and E;
# u4 also clicks F, which nobody else clicks. Isolated users: u5, u6.
PAIRS = [
    ("u0", "A"),
    ("u1", "A"),
    ("u2", "A"),
    ("u3", "A"),
    ("u1", "B"),
    ("u4", "B"),
    ("u5", "C"),
    ("u6", "D"),
    ("u6", "E"),
    ("u4", "F"),
]


def _graph(pairs=PAIRS) -> ClickGraph:
    users, ads = zip(*pairs)
    return ClickGraph.from_pairs(np.array(users), np.array(ads))


def _clickers(graph: ClickGraph) -> dict[int, set[int]]:
    """ad index -> set of user indices, from the CSR rows (independent of csc())."""
    out: dict[int, set[int]] = {}
    for u in range(graph.n_users):
        for a in graph.indices[graph.indptr[u] : graph.indptr[u + 1]]:
            out.setdefault(int(a), set()).add(u)
    return out


def _wrap_positives(sampler: CoClickPairSampler, log: list) -> None:
    original = sampler.positives_for

    def spy(clicks):
        log.append(np.array(clicks))
        return original(clicks)

    sampler.positives_for = spy


def test_positive_is_another_clicker_of_the_anchor_ad():
    """positives_for(click) is a user who clicked the click's ad, never the anchor user."""
    g = _graph()
    s = CoClickPairSampler(g, np.random.default_rng(0))
    clickers = _clickers(g)
    click_users = np.repeat(np.arange(g.n_users), np.diff(g.indptr))
    clicks = np.repeat(s.anchor_clicks, 200)
    pos = s.positives_for(clicks)
    for c, p in zip(clicks, pos):
        ad, anchor = int(g.indices[c]), int(click_users[c])
        assert p != anchor
        assert int(p) in clickers[ad]


def test_epoch_pairs_share_an_ad_and_cover_each_anchor_click_once():
    """Each epoch yields every anchor click exactly once, with a co-clicking positive."""
    g = _graph()
    s = CoClickPairSampler(g, np.random.default_rng(3))
    # anchors: 4 clicks on A + 2 on B = 6 (C, D, E, F have a single clicker)
    assert s.n_anchors == 6
    user_ads = {u: set(g.indices[g.indptr[u] : g.indptr[u + 1]].tolist()) for u in range(g.n_users)}
    for batch_size in (2, 3, 6, 100):
        log: list = []
        s2 = CoClickPairSampler(g, np.random.default_rng(batch_size))
        _wrap_positives(s2, log)
        anchors_seen = []
        for anchors, positives in s2.epoch(batch_size):
            assert len(anchors) == len(positives) >= 2
            for a, p in zip(anchors, positives):
                assert a != p
                assert user_ads[int(a)] & user_ads[int(p)], (a, p)
            anchors_seen.extend(anchors.tolist())
        clicks = np.concatenate(log)
        assert sorted(clicks.tolist()) == sorted(s.anchor_clicks.tolist())
        click_users = np.repeat(np.arange(g.n_users), np.diff(g.indptr))
        assert sorted(anchors_seen) == sorted(click_users[s.anchor_clicks].tolist())


def test_epoch_folds_a_trailing_singleton_into_the_previous_batch():
    """When n_anchors % batch_size == 1 the leftover click joins the last full batch
    (a batch of one has no negatives), so every anchor is still visited exactly once."""
    g = _graph()
    s = CoClickPairSampler(g, np.random.default_rng(0))
    batches = [a for a, _ in s.epoch(5)]  # 6 anchors -> one batch of 6, not 5 + 1
    assert [len(b) for b in batches] == [6]
    assert sorted(np.concatenate(batches).tolist()) == sorted(s.click_users[s.anchor_clicks].tolist())


def test_positive_distribution_is_uniform_over_other_clickers():
    """For an ad with 4 clickers, each other clicker is drawn ~1/3 of the time, for every anchor."""
    g = _graph()
    s = CoClickPairSampler(g, np.random.default_rng(42))
    click_users = np.repeat(np.arange(g.n_users), np.diff(g.indptr))
    ad_a = int(np.flatnonzero(g.ad_ids == "A")[0])
    a_clicks = np.flatnonzero(g.indices == ad_a)
    assert len(a_clicks) == 4
    n = 30_000
    for c in a_clicks:
        pos = s.positives_for(np.full(n, c))
        counts = Counter(pos.tolist())
        others = set(click_users[a_clicks].tolist()) - {int(click_users[c])}
        assert len(others) == 3
        assert set(counts) == others
        expected = n / 3
        chi2 = sum((counts[o] - expected) ** 2 / expected for o in others)
        assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_isolated_users_are_exactly_those_without_shared_ads():
    """isolated_users flags users all of whose ads have one clicker (u5, u6), nobody else."""
    g = _graph()
    s = CoClickPairSampler(g, np.random.default_rng(0))
    isolated = set(g.user_ids[s.isolated_users].tolist())
    assert isolated == {"u5", "u6"}
    # u4 has one shared ad (B) and one solo ad (F): not isolated, but F is never an anchor.
    assert s.isolated_users.dtype == bool and len(s.isolated_users) == g.n_users


def test_same_seed_same_batches_different_seed_differs():
    """Two samplers with equally seeded generators produce identical epochs."""
    g = _graph()

    def run(seed):
        s = CoClickPairSampler(g, np.random.default_rng(seed))
        return [(a.copy(), p.copy()) for _ in range(3) for a, p in s.epoch(2)]

    r1, r2, r3 = run(7), run(7), run(8)
    assert len(r1) == len(r2)
    assert all(np.array_equal(a1, a2) and np.array_equal(p1, p2) for (a1, p1), (a2, p2) in zip(r1, r2))
    assert not all(np.array_equal(a1, a3) and np.array_equal(p1, p3) for (a1, p1), (a3, p3) in zip(r1, r3))


def test_sampler_memory_is_linear_in_clicks_for_a_hub_ad():
    """One ad with 20,000 clickers: sampler arrays stay O(clicks), never O(clickers^2)."""
    n = 20_000
    users = np.array([f"u{i:05d}" for i in range(n)] + ["x0", "x1"])
    ads = np.array(["hub"] * n + ["other", "other"])
    g = ClickGraph.from_pairs(users, ads)
    s = CoClickPairSampler(g, np.random.default_rng(0))
    total = sum(v.nbytes for v in vars(s).values() if isinstance(v, np.ndarray))
    assert total < 50 * g.n_clicks * 8
    batches = list(s.epoch(4096))
    assert sum(len(a) for a, _ in batches) == g.n_clicks
    hub_users = np.flatnonzero(np.isin(g.user_ids, users[:n]))
    x_users = np.flatnonzero(np.isin(g.user_ids, ["x0", "x1"]))
    for anchors, positives in batches:
        assert not np.any(anchors == positives)
        on_hub = np.isin(anchors, hub_users)
        assert np.isin(positives[on_hub], hub_users).all()
        assert np.isin(positives[~on_hub], x_users).all()


def test_clicker_centroids_hand_computed():
    """Each ad's centroid is the unweighted mean of its clickers' vectors; unclicked -> zeros."""
    # a: clicked by u0, u1 (weight 5, ignored), u2; b: clicked by u1, u2.
    g = ClickGraph.from_pairs(
        np.array(["u0", "u1", "u1", "u2", "u2"]),
        np.array(["a", "a", "b", "a", "b"]),
        np.array([1.0, 5.0, 1.0, 1.0, 1.0]),
    )
    v = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    c = clicker_centroids(g, v)
    assert c.shape == (2, 2) and c.dtype == np.float32
    np.testing.assert_allclose(c[0], [(1 + 0 + 2) / 3, (0 + 1 + 2) / 3], rtol=1e-6)
    np.testing.assert_allclose(c[1], [(0 + 2) / 2, (1 + 2) / 2], rtol=1e-6)
    # an ad present in ad_ids but never clicked gets a zero centroid
    g2 = ClickGraph(
        np.array(["u0"]),
        np.array(["a", "z"]),
        np.array([0, 1]),
        np.array([0], dtype=np.int32),
        np.array([1.0], dtype=np.float32),
    )
    c2 = clicker_centroids(g2, np.array([[3.0, 4.0]], dtype=np.float32))
    np.testing.assert_array_equal(c2, [[3.0, 4.0], [0.0, 0.0]])


def test_ad_clicker_sampler_covers_every_click_once():
    """AdClickerPairSampler yields every (ad, clicker) pair exactly once per epoch."""
    g = _graph()
    click_users = np.repeat(np.arange(g.n_users), np.diff(g.indptr))
    expected = sorted(zip(g.indices.tolist(), click_users.tolist()))
    s = AdClickerPairSampler(g, np.random.default_rng(0))
    for batch_size in (2, 5, 10):
        got = []
        for ads, users in s.epoch(batch_size):
            assert len(ads) >= 2
            got.extend(zip(ads.tolist(), users.tolist()))
        assert sorted(got) == expected
    # order is shuffled, not the storage order
    orders = [tuple(a.tolist()) for a, _ in s.epoch(10)]
    assert orders[0] != tuple(g.indices.tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_ad_clicker_sampler_deterministic(seed):
    """Equal seeds give equal AdClickerPairSampler epochs."""
    g = _graph()
    a = [x.tolist() for b in AdClickerPairSampler(g, np.random.default_rng(seed)).epoch(3) for x in b]
    b = [x.tolist() for b in AdClickerPairSampler(g, np.random.default_rng(seed)).epoch(3) for x in b]
    assert a == b
