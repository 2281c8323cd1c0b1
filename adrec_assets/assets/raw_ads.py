"""raw_ads: the ad catalogue of one click source. The only artifact holding ad text."""

import dagster as dg

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.ml.types import AdCatalog
from adrec_assets.resources import ClickSourceResource


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def raw_ads(context: dg.AssetExecutionContext, click_sources: ClickSourceResource) -> dg.Output[AdCatalog]:
    """Ads of the source: ``ad_id``, ``text`` and an optional image path. Over-long texts are
    cut to the source limit and counted (``n_ad_texts_truncated``)."""
    catalog, report = click_sources.source(context.partition_key).read_ads_with_report()
    if report.n_texts_truncated:
        context.log.warning(
            f"{report.n_texts_truncated} ad texts longer than {report.max_text_chars} characters were cut "
            f"(e.g. {'; '.join(report.truncated_examples[:3])})"
        )
    with_image = sum(1 for path in catalog.image_paths if path)
    return dg.Output(
        catalog,
        metadata={
            "n_ads": len(catalog),
            "n_ads_with_image": with_image,
            "source": context.partition_key,
            **report.metadata(),
        },
    )
