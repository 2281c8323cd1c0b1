"""Closed-form ridge regression, shared by the popularity head and the ridge baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0)


def with_intercept(x: np.ndarray) -> np.ndarray:
    """``x`` with a column of ones appended (the row the intercept weight multiplies)."""
    return np.hstack([x, np.ones((len(x), 1))])


def ridge_predict(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Apply :func:`ridge_fit`'s ``(d + 1, k)`` weights to rows ``x (n, d)``."""
    return with_intercept(x) @ weights


def ridge_fit(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> np.ndarray:
    """Weights ``(d + 1, k)`` (last row = intercept) mapping ``x (n, d)`` to ``y (n, k)``.
    Alpha is picked on a seeded 10% holdout, then the map is refitted on all rows.

    Normal equations in float64: d is the content width (hundreds), so a (d x d) solve is
    milliseconds, and the fit is exactly reproducible.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"ridge_fit needs >= 2 aligned rows, got x {x.shape} and y {y.shape}")
    x1 = with_intercept(x).astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    order = rng.permutation(len(x1))
    cut = max(1, len(x1) // 10)
    val, fit = order[:cut], order[cut:]

    def normal_equations(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x1[rows].T @ x1[rows], x1[rows].T @ y[rows]

    def solve(system: tuple[np.ndarray, np.ndarray], alpha: float) -> np.ndarray:
        gram, xty = system
        return np.linalg.solve(gram + alpha * np.eye(x1.shape[1]), xty)

    # one Gram matrix for all the alphas (each costs n x d^2, far more than a d x d solve)
    on_fit = normal_equations(fit)
    errors = [float(((x1[val] @ solve(on_fit, alpha) - y[val]) ** 2).sum(axis=-1).mean()) for alpha in alphas]
    return solve(normal_equations(np.arange(len(x1))), alphas[int(np.argmin(errors))])
