"""Click sources: where ads and clicks come from (plain Python, no Dagster).

A source yields an :class:`~adrec_assets.ml.types.AdCatalog` and a table of raw clicks
(``user_id``, ``ad_id``, ``weight``). Raw user ids never leave this layer un-hashed: the
click-graph step pseudonymizes them before anything is stored. A source may also deliver
ids that are already pseudonyms (``user_pseudonym``); those are flagged so they are not
hashed a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from adrec_assets.ml.types import str_array

if TYPE_CHECKING:
    from adrec_assets.ml.types import AdCatalog


class SourceError(ValueError):
    """Bad input in a click source; the message says where (source, file, line or row) and
    how to fix it, and never quotes a raw user id."""


@dataclass(frozen=True)
class RawClicks:
    """Click rows as read from a source, before pseudonymization.

    Ids are stored once in vocabularies and clicks as integer codes, so a click costs
    ~16 bytes however long its ids are, and pseudonymization hashes each user once. Ids are
    object arrays of ``str`` (never fixed-width numpy strings, which cost the longest id
    times the number of ids).

    ``pseudonymized[i]`` says that ``user_vocab[i]`` is already a keyed pseudonym (read from a
    ``user_pseudonym`` column) rather than a raw id. Raw ids and pseudonyms are separate
    vocabulary entries even when their text is equal, so a raw id can never be mistaken for
    someone's pseudonym.
    """

    user_vocab: np.ndarray  # (n_users,) str: raw user ids (never persisted) or pseudonyms
    user_codes: np.ndarray  # (n,) int64 index into user_vocab
    ad_vocab: np.ndarray  # (n_ads,) str ad ids
    ad_codes: np.ndarray  # (n,) int64 index into ad_vocab
    weights: np.ndarray  # (n,) float32
    pseudonymized: np.ndarray | None = None  # (n_users,) bool; None means "all raw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_vocab", str_array(self.user_vocab))
        object.__setattr__(self, "ad_vocab", str_array(self.ad_vocab))
        flags = np.zeros(len(self.user_vocab), dtype=bool) if self.pseudonymized is None else self.pseudonymized
        flags = np.asarray(flags, dtype=bool)
        if flags.shape != (len(self.user_vocab),):
            raise ValueError(
                f"RawClicks.pseudonymized needs one flag per user_vocab entry: {flags.shape} for "
                f"{len(self.user_vocab)} users"
            )
        object.__setattr__(self, "pseudonymized", flags)
        n = len(self.ad_codes)
        if len(self.user_codes) != n or len(self.weights) != n:
            raise ValueError(
                f"RawClicks columns differ in length: user_codes={len(self.user_codes)}, ad_codes={n}, "
                f"weights={len(self.weights)}"
            )

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


@dataclass
class AdReadReport:
    """What an ads read changed: ad texts over the length limit are cut and counted here, so
    the cut is visible (e.g. as ``raw_ads`` metadata) instead of silent."""

    n_ads: int = 0
    n_texts_truncated: int = 0
    max_text_chars: int = 0  # the limit the texts were cut to (0: no limit applied)
    truncated_examples: list[str] = field(default_factory=list)  # "ads.csv line 7: ad_id 'x' (12000 chars)"

    def metadata(self) -> dict[str, Any]:
        """Flat values for an asset's metadata."""
        return {
            "n_ad_texts_truncated": self.n_texts_truncated,
            "max_ad_text_chars": self.max_text_chars,
            "truncated_ad_examples": "; ".join(self.truncated_examples),
        }


class Source(Protocol):
    """Where one partition's ads and clicks come from: a folder of files, the built-in
    synthetic generator, or anything else that yields the same two things."""

    name: str

    def read_ads(self) -> AdCatalog:
        """The validated ad catalogue."""
        ...

    def read_ads_with_report(self) -> tuple[AdCatalog, AdReadReport]:
        """The catalogue and what reading it changed (truncated texts)."""
        ...

    def read_clicks(self, ad_ids: np.ndarray) -> tuple[RawClicks, ClickReadReport]:
        """The clicks on the catalogue's ``ad_ids`` (clicks naming other ads are dropped and counted)."""
        ...
