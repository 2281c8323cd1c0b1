"""Tests for adrec_assets.ml.metrics: recall@k with random tie-breaking, group separation."""

import numpy as np
import pytest

from adrec_assets.ml.metrics import (
    auc_per_row,
    ndcg_at_k,
    rank_with_random_ties,
    recall_at_k,
)
from adrec_assets_tests.metric_helpers import group_cosine_separation


def test_recall_hand_computed():
    """Top-2 of [.9,.1,.5,.3] is {0, 2}; relevant {1, 2} -> 1 of 2 found."""
    r = recall_at_k(np.array([[0.9, 0.1, 0.5, 0.3]]), np.array([[0, 1, 1, 0]]), k=2)
    assert r.tolist() == [0.5]


def test_recall_several_rows_and_k():
    """Per-row recall on a small matrix, several k, checked by hand."""
    scores = np.array([[0.1, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6], [0.0, 1.0, 0.5, 0.2]])
    relevant = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]])
    # row 0 order: 1,2,3,0 ; row 1 order: 0,1,2,3 ; row 2 order: 1,2,3,0
    np.testing.assert_allclose(recall_at_k(scores, relevant, 1), [0.0, 0.0, 1 / 3])
    np.testing.assert_allclose(recall_at_k(scores, relevant, 3), [0.5, 0.0, 2 / 3])
    np.testing.assert_allclose(recall_at_k(scores, relevant, 4), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(recall_at_k(scores, relevant, 10), [1.0, 1.0, 1.0])


def test_recall_no_relevant_is_nan():
    """A row with no relevant item is NaN (undefined), not 0; other rows unaffected."""
    r = recall_at_k(np.array([[0.3, 0.2], [0.3, 0.2]]), np.array([[0, 0], [1, 0]]), k=1)
    assert np.isnan(r[0]) and r[1] == 1.0
    assert np.nanmean(r) == 1.0


def test_recall_ties_broken_at_random():
    """All-equal scores: recall@1 for 1 relevant of 4 averages ~0.25 over seeds, not 0 or 1."""
    scores = np.zeros((1, 4))
    relevant = np.array([[0, 0, 1, 0]])
    hits = [recall_at_k(scores, relevant, 1, np.random.default_rng(s))[0] for s in range(2000)]
    assert set(hits) == {0.0, 1.0}
    assert np.mean(hits) == pytest.approx(0.25, abs=0.04)
    # vectorised over many identical rows within a single call as well
    many = recall_at_k(np.zeros((4000, 4)), np.tile(relevant, (4000, 1)), 1, np.random.default_rng(0))
    assert many.mean() == pytest.approx(0.25, abs=0.03)


def test_ties_only_shuffle_within_equal_scores():
    """Random tie-breaking never reorders items with different scores."""
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]])
    for seed in range(20):
        order = rank_with_random_ties(scores, np.random.default_rng(seed))[0].tolist()
        assert set(order[:2]) == {1, 4} and set(order[2:4]) == {0, 2} and order[4] == 3


def test_recall_shape_mismatch_raises():
    """scores and relevant must have the same shape."""
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 4)), 1)


def test_group_cosine_separation_hand_made():
    """Within/across mean cosines on hand-made unit vectors; diagonal excluded from within."""
    s = np.sqrt(0.5)
    v = np.array([[1.0, 0.0], [s, s], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    within, across = group_cosine_separation(v, labels)
    # within pairs: (0,1)=s, (2,3)=0 (each counted twice) -> mean s/2
    # across pairs: (0,2)=0, (0,3)=-1, (1,2)=s, (1,3)=-s -> mean -1/4
    assert within == pytest.approx(s / 2)
    assert across == pytest.approx(-0.25)


# ---------------------------------------------------------------- NDCG@k and AUC


def test_ndcg_hand_computed():
    """Top-2 of [.9,.1,.5,.3] is (0, 2); relevant {1, 2}: DCG = 1/log2(3), ideal = 1 + 1/log2(3)."""
    got = ndcg_at_k(np.array([[0.9, 0.1, 0.5, 0.3]]), np.array([[0, 1, 1, 0]]), k=2)
    expected = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    np.testing.assert_allclose(got, [expected])


def test_ndcg_perfect_and_worst_and_ideal_capped_at_k():
    """A perfect order gives 1; all hits below the cut give 0; with 3 relevant and k=2 the
    ideal DCG counts only 2 hits, so finding 2 of 3 at the top is still 1."""
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    assert ndcg_at_k(scores, np.array([[1, 1, 0, 0]]), k=2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(scores, np.array([[0, 0, 1, 1]]), k=2)[0] == 0.0
    assert ndcg_at_k(scores, np.array([[1, 1, 1, 0]]), k=2)[0] == pytest.approx(1.0)
    # one hit at rank 3 of k=3 with 1 relevant: 1/log2(4) = 0.5
    assert ndcg_at_k(scores, np.array([[0, 0, 1, 0]]), k=3)[0] == pytest.approx(0.5)


def test_ndcg_no_relevant_is_nan_and_ties_random():
    """No relevant item -> NaN; all-equal scores, 1 relevant of 4, k=1 -> 0.25 on average."""
    r = ndcg_at_k(np.zeros((2, 3)), np.array([[0, 0, 0], [0, 1, 0]]), k=1)
    assert np.isnan(r[0])
    many = ndcg_at_k(np.zeros((4000, 4)), np.tile([[0, 0, 1, 0]], (4000, 1)), 1, np.random.default_rng(0))
    assert set(np.unique(many)) == {0.0, 1.0}
    assert many.mean() == pytest.approx(0.25, abs=0.03)


def test_auc_hand_computed():
    """Positives score .1 and .5, negatives .9 and .3: only (.5 > .3) of 4 pairs wins -> 0.25."""
    got = auc_per_row(np.array([[0.9, 0.1, 0.5, 0.3]]), np.array([[0, 1, 1, 0]]))
    assert got.tolist() == [0.25]


def test_auc_ties_count_half():
    """Positive .5 vs negatives .5 (tie, 1/2) and .2 (win, 1) -> 0.75; all equal -> 0.5."""
    assert auc_per_row(np.array([[0.5, 0.5, 0.2]]), np.array([[1, 0, 0]]))[0] == pytest.approx(0.75)
    assert auc_per_row(np.zeros((1, 5)), np.array([[1, 0, 1, 0, 0]]))[0] == pytest.approx(0.5)


def test_auc_candidates_and_undefined_rows():
    """Excluded candidates do not count; rows with only one class are NaN."""
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    candidates = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)  # drop the .9 negative
    got = auc_per_row(scores, relevant, candidates)
    assert got[0] == pytest.approx(0.5)  # (.1 vs .3) loses, (.5 vs .3) wins
    assert np.isnan(got[1]) and np.isnan(got[2])


def test_auc_matches_pairwise_definition_on_random_data():
    """Mid-rank AUC equals the brute-force pairwise count (with ties) on random integer scores."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(20, 30)).astype(float)
    relevant = rng.random((20, 30)) < 0.3
    got = auc_per_row(scores, relevant)
    for row in range(20):
        pos, neg = scores[row, relevant[row]], scores[row, ~relevant[row]]
        if len(pos) == 0 or len(neg) == 0:
            assert np.isnan(got[row])
            continue
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert got[row] == pytest.approx(wins / (len(pos) * len(neg)))
