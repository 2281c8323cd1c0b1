"""position_bias: how likely a user is to look at each slate position, from the served log."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.online.events import impressions_with_outcomes, read_event_log
from adrec_assets.online.position_bias import PositionBias, estimate_position_bias
from adrec_assets.resources import ClickSourceResource


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def position_bias(context: dg.AssetExecutionContext, click_sources: ClickSourceResource) -> dg.Output[PositionBias]:
    """Examination probability per position (position-based model, ``theta[0] = 1``): click
    rate ratios on the randomized slice of served traffic when it has enough clicks, else
    regression-EM on every logged impression, else none yet (all ones). The service weights
    a click at position k by ``min(1/theta_k, cap)``; the posterior discounts skips with it;
    served clicks are written back with that weight for training."""
    log = read_event_log(click_sources.sources_root() / context.partition_key)
    impressions = impressions_with_outcomes(log)
    estimate = estimate_position_bias(impressions)
    randomized = int(impressions["randomized"].sum()) if len(impressions) else 0
    return dg.Output(
        estimate,
        metadata={
            "method": estimate.method,
            "theta": dg.MetadataValue.json([round(float(t), 4) for t in estimate.theta]),
            "lower": dg.MetadataValue.json([round(float(t), 4) if np.isfinite(t) else None for t in estimate.lower]),
            "upper": dg.MetadataValue.json([round(float(t), 4) if np.isfinite(t) else None for t in estimate.upper]),
            "n_impressions": len(impressions),
            "n_randomized_impressions": randomized,
            "n_clicks": int(impressions["clicked"].sum()) if len(impressions) else 0,
            "converged": estimate.converged,
        },
    )
