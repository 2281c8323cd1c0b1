"""Synthetic users of an ads experiment, for the A/B benchmark (``ab_sim.py``) and the
tests of :mod:`adrec_assets.abtest`: per-user tables and per-look moments drawn from a
seeded generator, so every statistic can be checked against simulated truth."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from adrec_assets.abtest.stats import AnalysisInputError, RatioMoments


@dataclass(frozen=True)
class SyntheticPopulation:
    """Users as seen by an ads experiment, for planning and for validating the analysis:
    activity ~ Gamma (so impressions = 1 + Poisson(activity) are negative binomial), a
    per-user CTR ~ Beta(ctr·k, (1 - ctr)·k), and a pre-period of Poisson(activity ·
    ``pre_period_ratio``) impressions clicked at the same per-user CTR (so pre-period
    clicks predict the experiment's, as in real logs)."""

    ctr: float = 0.03
    ctr_concentration: float = 30.0
    mean_impressions: float = 20.0
    activity_shape: float = 1.5
    pre_period_ratio: float = 1.0

    def sample(
        self, rng: np.random.Generator, shape: int | tuple[int, ...], relative_lift: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, clicks, pre_clicks) of ``shape`` users; the treatment's per-user
        CTR is multiplied by 1 + ``relative_lift``."""
        activity = rng.gamma(self.activity_shape, (self.mean_impressions - 1.0) / self.activity_shape, size=shape)
        impressions = 1 + rng.poisson(activity)
        user_ctr = rng.beta(self.ctr * self.ctr_concentration, (1.0 - self.ctr) * self.ctr_concentration, size=shape)
        clicks = rng.binomial(impressions, np.minimum(user_ctr * (1.0 + relative_lift), 1.0))
        pre_clicks = rng.binomial(rng.poisson(activity * self.pre_period_ratio), user_ctr)
        return impressions, clicks, pre_clicks

    def table(
        self, rng: np.random.Generator, users: Mapping[str, int], lifts: Mapping[str, float] | None = None
    ) -> pd.DataFrame:
        """A per-user table (the analysis's input) with ``users[arm]`` users per arm."""
        frames = []
        for arm, count in users.items():
            impressions, clicks, pre_clicks = self.sample(rng, count, (lifts or {}).get(arm, 0.0))
            frames.append(
                pd.DataFrame({"arm": arm, "impressions": impressions, "clicks": clicks, "pre_clicks": pre_clicks})
            )
        table = pd.concat(frames, ignore_index=True)
        table.insert(0, "user", [f"{i:032x}" for i in range(len(table))])
        return table

    def look_moments(
        self,
        rng: np.random.Generator,
        sims: int,
        users_per_arm: int,
        looks: int,
        relative_lift: float = 0.0,
        chunk: int = 64,
    ) -> RatioMoments:
        """Cumulative moments of one arm, shape (sims, looks): users arrive in ``looks``
        equal batches (``users_per_arm`` rounded down to a multiple of ``looks``) and each
        brings its whole outcome."""
        per_look = users_per_arm // looks
        if per_look < 2:
            raise AnalysisInputError(f"look_moments: {users_per_arm} users over {looks} looks leaves < 2 per look")
        parts = []
        for start in range(0, sims, chunk):
            size = min(chunk, sims - start)
            impressions, clicks, pre_clicks = self.sample(rng, (size, looks, per_look), relative_lift)
            parts.append(RatioMoments.of_users(impressions, clicks, pre_clicks, axis=-1))
        batches = RatioMoments(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in RatioMoments.__dataclass_fields__}
        )
        return batches.cumsum(axis=1)
