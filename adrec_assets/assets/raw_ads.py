"""raw_ads: the ad catalogue of one click source. The only artifact holding ad text."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.ml.types import AdCatalog
from adrec_assets.resources import ClickSourceResource


@dg.asset(io_manager_key="numpy_io_manager", kinds={"numpy"}, **PARTITIONED)
def raw_ads(context: dg.AssetExecutionContext, click_sources: ClickSourceResource) -> dg.Output[AdCatalog]:
    """Ads of the source: ``ad_id``, ``text`` and an optional image path."""
    catalog = click_sources.load_ads(context.partition_key)
    with_image = int(np.count_nonzero(catalog.image_paths != ""))
    return dg.Output(
        catalog,
        metadata={
            "n_ads": len(catalog),
            "n_ads_with_image": with_image,
            "source": context.partition_key,
        },
    )
