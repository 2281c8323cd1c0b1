"""Users refitted against the projected ads: the lead the cold-start evaluation measures.

The InfoNCE user vectors are learnt from co-clicks alone; the projector then maps content to
where those users are. Cold ads live in the *projected* space, so a user vector also fitted
to that space, to the projections of the ads the user clicked against every other ad's, ranks
them better. One implicit-ALS user step does it in closed form (Hu, Koren and Volinsky 2008):

    û = (PᵀP + α Σ_{a clicked} w_a p_a p_aᵀ + λI)⁻¹ (Σ_{a clicked} (1 + α w_a) p_a)

over the projected candidate ads ``P``; the refined vector is
``normalize(u + mix · û / |û|)``. About d³ flops per user (a d x d solve), so it is
reported by the evaluation, not yet served (``benchmarks/README.md``).
"""

from __future__ import annotations

import numpy as np

from adrec_assets.ml.types import ClickGraph


def refit_users(
    graph: ClickGraph,
    user_vectors: np.ndarray,
    ad_vectors: np.ndarray,
    users: np.ndarray,
    candidates: np.ndarray,
    alpha: float = 5.0,
    regularization: float = 10.0,
    mix: float = 1.0,
) -> np.ndarray:
    """(len(users), d) unit rows: each of ``users``' vector mixed with its refit against
    ``ad_vectors[candidates]`` (rows of ``ad_vectors`` align with ``graph.ad_ids``). A user
    with no click keeps its vector."""
    if len(ad_vectors) != graph.n_ads or len(user_vectors) != graph.n_users:
        raise ValueError(f"refit_users: {len(ad_vectors)} ad rows for {graph.n_ads} ads, "
                         f"{len(user_vectors)} user rows for {graph.n_users} users")  # fmt: skip
    p = np.asarray(ad_vectors, dtype=np.float64)
    d = p.shape[1]
    base = p[candidates].T @ p[candidates] + regularization * np.eye(d)
    out = np.asarray(user_vectors[users], dtype=np.float64).copy()
    for row, user in enumerate(np.asarray(users)):
        begin, end = graph.indptr[user], graph.indptr[user + 1]
        if begin == end:
            continue
        clicked, weights = p[graph.indices[begin:end]], graph.weights[begin:end].astype(np.float64)
        fitted = np.linalg.solve(base + alpha * (clicked.T * weights) @ clicked, ((1 + alpha * weights) @ clicked))
        norm = np.linalg.norm(fitted)
        if norm > 0:
            out[row] += mix * fitted / norm
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)
