"""Contrastive and regression losses shared by user-space and projector training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def duplicate_mask(query_ids: torch.Tensor, key_ids: torch.Tensor, shared_namespace: bool = False) -> torch.Tensor:
    """(B, B) bool: off-diagonal entries that are *not* true negatives.

    Entry (i, j) is masked when key j is a positive of query i in disguise: the same key
    as key i, a copy of query i's own query (so key j belongs to the same query), or, when
    queries and keys are the same kind of thing (users vs users), query i itself.
    Without this mask a popular ad or a repeated user appears as its own negative.
    """
    same = (key_ids[None, :] == key_ids[:, None]) | (query_ids[None, :] == query_ids[:, None])
    if shared_namespace:
        same |= key_ids[None, :] == query_ids[:, None]
    same.fill_diagonal_(False)
    return same


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    shared_namespace: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE: ``queries[i]`` and ``keys[i]`` are a positive pair, every other
    key in the batch is a negative (in-batch negatives), cosine similarity / temperature.

    Pass ids to mask duplicates (see :func:`duplicate_mask`).
    """
    if queries.shape != keys.shape:
        raise ValueError(f"info_nce needs equal shapes, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    q = F.normalize(queries, dim=-1)
    k = F.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    labels = torch.arange(len(q), device=q.device)
    if query_ids is not None and key_ids is not None:
        mask = duplicate_mask(query_ids, key_ids, shared_namespace)
        logits_qk = logits.masked_fill(mask, float("-inf"))
        logits_kq = logits.T.masked_fill(mask.T, float("-inf"))
    else:
        logits_qk, logits_kq = logits, logits.T
    return 0.5 * (F.cross_entropy(logits_qk, labels) + F.cross_entropy(logits_kq, labels))


def centroid_mse(projected: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Mean squared Euclidean distance between projected ads and their clickers' centroid.

    Summed over dimensions (not averaged) so its scale does not shrink with the dimension
    and ``centroid_weight`` means the same for any embedding size.
    """
    return ((projected - centroids) ** 2).sum(dim=-1).mean()
