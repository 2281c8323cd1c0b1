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
    """Click rows as read from a source, before pseudonymization.

    Ids are stored once in vocabularies and clicks as integer codes, so a click costs
    ~16 bytes however long its ids are, and pseudonymization hashes each user once.
    """

    user_vocab: np.ndarray  # (n_users,) str raw user ids: never persisted
    user_codes: np.ndarray  # (n,) int64 index into user_vocab
    ad_vocab: np.ndarray  # (n_ads,) str ad ids
    ad_codes: np.ndarray  # (n,) int64 index into ad_vocab
    weights: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.ad_codes)
