"""Positive-pair samplers over the click graph; cost is linear in clicks.

Neither sampler builds the user x user co-click graph: a co-click pair is drawn by
walking user -> clicked ad -> another clicker of that ad, so a popular ad with c clickers
costs O(c) memory, never O(c^2).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from adrec_assets.ml.types import ClickGraph


def shuffled_batches(items: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Every item exactly once, shuffled, in batches of ``batch_size``; a trailing batch of
    one (no in-batch negative) is folded into the batch before it instead of dropped."""
    order = rng.permutation(items)
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    for i, begin in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(order)
        if end - begin >= 2:
            yield order[begin:end]


class CoClickPairSampler:
    """One epoch = every click whose ad has another clicker, as an anchor, once.

    For anchor click (u, a) the positive is a uniformly random *other* clicker of ``a``.
    Users all of whose ads have a single clicker have no co-click neighbour and are
    never anchors (``isolated_users``); the caller decides what vector they get.
    """

    def __init__(self, graph: ClickGraph, rng: np.random.Generator) -> None:
        self.rng = rng
        self.click_users = graph.click_users()
        self.click_ads = graph.indices.astype(np.int64)
        self.ad_indptr, self.ad_users = graph.csc()
        self.ad_degree = np.diff(self.ad_indptr)
        self.anchor_clicks = np.flatnonzero(self.ad_degree[self.click_ads] >= 2)
        has_pair = np.zeros(graph.n_users, dtype=bool)
        has_pair[self.click_users[self.anchor_clicks]] = True
        self.isolated_users = ~has_pair

    @property
    def n_anchors(self) -> int:
        return len(self.anchor_clicks)

    def positives_for(self, clicks: np.ndarray) -> np.ndarray:
        """A random other clicker of each click's ad (requires ad degree >= 2).

        Draw a slot among the first ``deg - 1`` clickers; if it holds the anchor user
        itself, take the last slot instead. Each other clicker is equally likely.
        """
        users = self.click_users[clicks]
        ads = self.click_ads[clicks]
        start = self.ad_indptr[ads]
        degree = self.ad_degree[ads]
        slot = (self.rng.random(len(clicks)) * (degree - 1)).astype(np.int64)
        candidate = self.ad_users[start + slot]
        return np.where(candidate == users, self.ad_users[start + degree - 1], candidate)

    def epoch(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for clicks in shuffled_batches(self.anchor_clicks, batch_size, self.rng):
            yield self.click_users[clicks], self.positives_for(clicks)


class AdClickerPairSampler:
    """One epoch = every (ad, user who clicked it) pair once, shuffled."""

    def __init__(self, graph: ClickGraph, rng: np.random.Generator) -> None:
        self.rng = rng
        self.click_users = graph.click_users()
        self.click_ads = graph.indices.astype(np.int64)

    def epoch(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for clicks in shuffled_batches(np.arange(len(self.click_ads)), batch_size, self.rng):
            yield self.click_ads[clicks], self.click_users[clicks]


def clicker_centroids(graph: ClickGraph, user_vectors: np.ndarray, chunk: int = 1 << 19) -> np.ndarray:
    """(n_ads, d) mean vector of each ad's clickers (zeros for ads nobody clicked).

    Summed in float64 over chunks of clicks: memory stays O(n_ads x d + chunk x d) instead
    of gathering one user vector per click (10M clicks x 128 dims would be 5 GB)."""
    sums = torch.zeros((graph.n_ads, user_vectors.shape[1]), dtype=torch.float64)
    click_users = graph.click_users()
    vectors = torch.from_numpy(np.ascontiguousarray(user_vectors, dtype=np.float32))
    for begin in range(0, graph.n_clicks, chunk):
        users = torch.from_numpy(click_users[begin : begin + chunk])
        ads = torch.from_numpy(graph.indices[begin : begin + chunk].astype(np.int64))
        sums.index_add_(0, ads, vectors[users].double())
    counts = np.maximum(graph.ad_degrees(), 1)[:, None]
    return (sums.numpy() / counts).astype(np.float32)
