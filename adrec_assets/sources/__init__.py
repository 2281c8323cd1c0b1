"""Click sources: where ads and clicks come from (plain Python, no Dagster).

A source yields an :class:`~adrec_assets.ml.types.AdCatalog` and a table of raw clicks
(``user_id``, ``ad_id``, ``weight``). Raw user ids never leave this layer un-hashed: the
click-graph step pseudonymizes them before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawClicks:
    """Click rows as read from a source, before pseudonymization."""

    user_ids: np.ndarray  # (n,) str raw user ids: never persisted
    ad_ids: np.ndarray  # (n,) str
    weights: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.ad_ids)
