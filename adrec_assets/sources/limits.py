"""Size limits on what a source may contain, so one bad or hostile file cannot exhaust memory
or time (plain Python, no Dagster)."""

from __future__ import annotations

from dataclasses import dataclass

from adrec_assets.ml.encoders.base import DEFAULT_MAX_IMAGE_BYTES

#: Ad copy is cut here. Encoders read at most 512 tokens (~2-3k characters), so nothing they
#: use is lost, while the one artifact holding text (``raw_ads``) stays bounded per ad.
DEFAULT_MAX_TEXT_CHARS = 10_000
#: Ids are keys: an e-mail address (at most 254 characters), a UUID (36) or a hex digest
#: (64) all fit; anything longer is a mistake such as a whole record in the id column.
DEFAULT_MAX_ID_CHARS = 256
#: Files are read in chunks into 20-byte-per-click codes, so this bounds one file's share of
#: memory (~1 GB) while still admitting the largest public click logs (MovieLens 25M: 25M rows).
DEFAULT_MAX_CLICK_ROWS_PER_FILE = 50_000_000


@dataclass(frozen=True)
class SourceLimits:
    """What a file source accepts. Over-long ad text is truncated and counted
    (:class:`~adrec_assets.sources.AdReadReport`); an over-long id or a click file with more
    rows is a :class:`~adrec_assets.sources.SourceError` naming the file and row.

    ``max_image_bytes`` is enforced where images are read, at the moment of use (the
    encoders and the encoding cache: pass it to
    :func:`~adrec_assets.ml.encoders.cache.encode_with_cache`); a larger image is a counted
    image failure and the ad is encoded from its text.
    """

    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_id_chars: int = DEFAULT_MAX_ID_CHARS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_click_rows_per_file: int = DEFAULT_MAX_CLICK_ROWS_PER_FILE

    def __post_init__(self) -> None:
        for name in ("max_text_chars", "max_id_chars", "max_image_bytes", "max_click_rows_per_file"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SourceLimits.{name} must be a positive integer, got {value!r}")
