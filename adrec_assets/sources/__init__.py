"""Click sources: where ads and clicks come from (plain Python, no Dagster).

A source yields an :class:`~adrec_assets.ml.types.AdCatalog` and a table of raw clicks
(``user_id``, ``ad_id``, ``weight``). Raw user ids never leave this layer un-hashed: the
click-graph step pseudonymizes them before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from adrec_assets.ml.types import AdCatalog


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


@dataclass
class ClickReadReport:
    """What a click read saw: files, rows, and the rows dropped for naming unknown ads."""

    n_files: int = 0
    n_rows: int = 0
    n_unknown_ad_rows: int = 0
    unknown_examples: list[str] = field(default_factory=list)

    @property
    def n_usable(self) -> int:
        return self.n_rows - self.n_unknown_ad_rows


class Source(Protocol):
    """Where one partition's ads and clicks come from: a folder of files, the built-in
    synthetic generator, or anything else that yields the same two things."""

    name: str

    def read_ads(self) -> AdCatalog:
        """The validated ad catalogue."""
        ...

    def read_clicks(self, ad_ids: np.ndarray) -> tuple[RawClicks, ClickReadReport]:
        """The clicks on the catalogue's ``ad_ids`` (clicks naming other ads are dropped and counted)."""
        ...
