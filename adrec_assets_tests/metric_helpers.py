"""Test-only measures of learnt structure (the product never needs them at run time)."""

from __future__ import annotations

import numpy as np


def group_cosine_separation(vectors: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cosine within a label, mean cosine across labels) for unit-norm rows."""
    sims = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    return float(sims[same].mean()), float(sims[different].mean())
