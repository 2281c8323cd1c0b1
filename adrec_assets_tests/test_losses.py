"""Tests for adrec_assets.ml.losses: info_nce, duplicate_mask, centroid_mse."""

import numpy as np
import pytest
import torch

from adrec_assets.ml.losses import centroid_mse, duplicate_mask, info_nce


def _np_info_nce(q: np.ndarray, k: np.ndarray, t: float, mask: np.ndarray | None = None) -> float:
    """Independent reference: cosine logits, explicit log-sum-exp, symmetric average."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / t

    def ce(mat: np.ndarray, m: np.ndarray | None) -> float:
        if m is not None:
            mat = np.where(m, -np.inf, mat)
        total = 0.0
        for i in range(len(mat)):
            row = mat[i]
            mx = row[np.isfinite(row)].max()
            lse = mx + np.log(np.sum(np.exp(row[np.isfinite(row)] - mx)))
            total += lse - row[i]
        return total / len(mat)

    return 0.5 * (ce(logits, mask) + ce(logits.T, None if mask is None else mask.T))


def test_info_nce_matches_hand_computed_3x2():
    """Loss on a tiny 3x2 batch equals an explicit numpy log-sum-exp computation."""
    q = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k = np.array([[0.5, 0.5], [0.0, 1.0], [3.0, -1.0]])
    t = 0.5
    got = info_nce(torch.tensor(q), torch.tensor(k), t).item()
    # Fully explicit for row 0 of the q->k direction as a spot check of the reference.
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    row0 = qn[0] @ kn.T / t
    assert np.isclose(-row0[0] + np.log(np.exp(row0).sum()), -np.log(np.exp(row0[0]) / np.exp(row0).sum()))
    assert got == pytest.approx(_np_info_nce(q, k, t), rel=1e-9, abs=1e-12)


def test_info_nce_is_symmetric_average_not_one_direction():
    """An asymmetric batch gives different directional losses; info_nce is their mean."""
    q = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k = np.array([[0.5, 0.5], [0.0, 1.0], [3.0, -1.0]])
    t = 0.3
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = qn @ kn.T / t
    lq = np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(logits)])
    lk = np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(logits.T)])
    assert abs(lq - lk) > 1e-3
    got = info_nce(torch.tensor(q), torch.tensor(k), t).item()
    assert got == pytest.approx(0.5 * (lq + lk), rel=1e-9)


def test_info_nce_lower_for_aligned_than_shuffled():
    """Matching queries with their own keys gives a lower loss than a shuffled pairing."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(16, 8, generator=gen)
    k = q + 0.1 * torch.randn(16, 8, generator=gen)
    perm = torch.roll(torch.arange(16), 1)
    aligned = info_nce(q, k, 0.1).item()
    shuffled = info_nce(q, k[perm], 0.1).item()
    assert aligned < shuffled
    assert aligned < np.log(16) < shuffled


def test_duplicate_mask_repeated_keys_and_queries():
    """Repeated keys and repeated queries are masked off-diagonal; diagonal never masked."""
    q = torch.tensor([10, 11, 10, 12])
    k = torch.tensor([20, 21, 22, 21])
    m = duplicate_mask(q, k).numpy()
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, 2] = expected[2, 0] = True  # same query 10
    expected[1, 3] = expected[3, 1] = True  # same key 21
    assert np.array_equal(m, expected)
    assert not np.diag(m).any()


def test_duplicate_mask_shared_namespace():
    """With shared_namespace, key j equal to query i is masked (only then)."""
    q = torch.tensor([1, 2, 3])
    k = torch.tensor([2, 1, 4])
    without = duplicate_mask(q, k).numpy()
    with_ns = duplicate_mask(q, k, shared_namespace=True).numpy()
    assert not without.any()
    expected = np.zeros((3, 3), dtype=bool)
    expected[0, 1] = True  # key 1 == query 0 (user 1)
    expected[1, 0] = True  # key 0 == query 1 (user 2)
    assert np.array_equal(with_ns, expected)


def test_duplicate_mask_never_masks_diagonal_even_when_everything_equal():
    """All-equal ids mask every off-diagonal entry but keep the diagonal."""
    ids = torch.tensor([5, 5, 5])
    m = duplicate_mask(ids, ids, shared_namespace=True).numpy()
    assert np.array_equal(m, ~np.eye(3, dtype=bool))


def test_masking_removes_penalty_for_same_ad_twice():
    """Two rows with the same ad: unmasked the ad is its own negative; masked the loss is 0."""
    ad = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    users = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    unmasked = info_nce(ad, users, 0.1).item()
    masked = info_nce(ad, users, 0.1, torch.tensor([7, 7]), torch.tensor([100, 101])).item()
    assert unmasked > 0.1
    assert masked == pytest.approx(0.0, abs=1e-7)


def test_masked_loss_matches_reference_with_mask():
    """A partially masked batch equals the numpy reference with -inf on masked logits."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    qid = torch.tensor([0, 1, 0, 2, 3])
    kid = torch.tensor([9, 8, 7, 8, 6])
    got = info_nce(q, k, 0.2, qid, kid).item()
    mask = duplicate_mask(qid, kid).numpy()
    assert mask.sum() == 4
    assert got == pytest.approx(_np_info_nce(q.numpy(), k.numpy(), 0.2, mask), rel=1e-9)
    assert got != pytest.approx(_np_info_nce(q.numpy(), k.numpy(), 0.2), rel=1e-6)


def test_info_nce_shape_mismatch_raises():
    """Queries and keys of different shapes are rejected."""
    with pytest.raises(ValueError, match="equal shapes"):
        info_nce(torch.zeros(3, 2), torch.zeros(3, 4), 0.1)
    with pytest.raises(ValueError):
        info_nce(torch.zeros(3, 2), torch.zeros(2, 2), 0.1)


def test_centroid_mse_is_mean_of_squared_distances():
    """centroid_mse = mean over rows of the squared Euclidean distance (summed over dims)."""
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    # row 0: 1; row 1: 1 + 4 = 5; mean = 3
    assert centroid_mse(p, c).item() == pytest.approx(3.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    expected = np.mean([np.linalg.norm(x - y) ** 2 for x, y in zip(a, b)])
    assert centroid_mse(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expected, rel=1e-12)


def test_shared_namespace_masks_both_directions_consistently():
    """Users vs users: key j == query i is dropped in q->k, and query j == key i in k->q."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    qid, kid = torch.tensor([1, 2, 3]), torch.tensor([2, 3, 5])
    got = info_nce(q, k, 0.2, qid, kid, shared_namespace=True).item()
    # Derived by hand from the ids: q->k row i drops key j when kid[j] == qid[i]:
    m_qk = np.zeros((3, 3), dtype=bool)
    m_qk[1, 0] = True  # kid[0] = 2 = qid[1]
    m_qk[2, 1] = True  # kid[1] = 3 = qid[2]
    # k->q row i (key i) drops query j when qid[j] == kid[i]:
    m_kq = np.zeros((3, 3), dtype=bool)
    m_kq[0, 1] = True  # qid[1] = 2 = kid[0]
    m_kq[1, 2] = True  # qid[2] = 3 = kid[1]
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    kn = k.numpy() / np.linalg.norm(k.numpy(), axis=1, keepdims=True)
    logits = qn @ kn.T / 0.2

    def ce(mat, m):
        mat = np.where(m, -np.inf, mat)
        return np.mean([np.log(np.exp(r[np.isfinite(r)]).sum()) - r[i] for i, r in enumerate(mat)])

    expected = 0.5 * (ce(logits, m_qk) + ce(logits.T, m_kq))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got != pytest.approx(info_nce(q, k, 0.2, qid, kid).item(), rel=1e-6)
