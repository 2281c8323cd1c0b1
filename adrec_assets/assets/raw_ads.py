"""raw_ads: the ad catalogue of one click source. The only artifact holding ad text."""

import dagster as dg

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.ml.types import AdCatalog
from adrec_assets.resources import ClickSourceResource


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def raw_ads(context: dg.AssetExecutionContext, click_sources: ClickSourceResource) -> dg.Output[AdCatalog]:
    """Ads of the source: ``ad_id``, ``text`` and an optional image path."""
    catalog = click_sources.source(context.partition_key).read_ads()
    with_image = sum(1 for path in catalog.image_paths if path)
    return dg.Output(
        catalog,
        metadata={
            "n_ads": len(catalog),
            "n_ads_with_image": with_image,
            "source": context.partition_key,
        },
    )
