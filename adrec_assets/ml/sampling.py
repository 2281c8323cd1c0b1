"""Positive-pair samplers over the click graph; cost is linear in clicks.

Neither sampler builds the user x user co-click graph: a co-click pair is drawn by
walking user -> clicked ad -> another clicker of that ad, so a popular ad with c clickers
costs O(c) memory, never O(c^2).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from adrec_assets.ml.types import ClickGraph


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
        order = self.rng.permutation(self.anchor_clicks)
        for begin in range(0, len(order), batch_size):
            clicks = order[begin : begin + batch_size]
            if len(clicks) < 2:  # a batch of one has no negatives
                continue
            yield self.click_users[clicks], self.positives_for(clicks)


class AdClickerPairSampler:
    """One epoch = every (ad, user who clicked it) pair once, shuffled."""

    def __init__(self, graph: ClickGraph, rng: np.random.Generator) -> None:
        self.rng = rng
        self.click_users = graph.click_users()
        self.click_ads = graph.indices.astype(np.int64)

    def epoch(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = self.rng.permutation(len(self.click_ads))
        for begin in range(0, len(order), batch_size):
            clicks = order[begin : begin + batch_size]
            if len(clicks) < 2:
                continue
            yield self.click_ads[clicks], self.click_users[clicks]


def clicker_centroids(graph: ClickGraph, user_vectors: np.ndarray) -> np.ndarray:
    """(n_ads, d) mean vector of each ad's clickers (zeros for ads nobody clicked)."""
    sums = np.zeros((graph.n_ads, user_vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, graph.indices, user_vectors[graph.click_users()])
    counts = np.maximum(graph.ad_degrees(), 1)[:, None]
    return (sums / counts).astype(np.float32)
