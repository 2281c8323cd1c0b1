"""policy_posterior: the Thompson sampler's posterior rebuilt from every served impression."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.types import ClickGraph, GlobalMean, ProjectedAds, UserEmbeddings
from adrec_assets.online.events import impressions_with_outcomes, read_event_log
from adrec_assets.online.fresh_ads import DEFAULT_FRESH_PRIOR_SD, FreshAdEffects, untrained_rows
from adrec_assets.online.position_bias import PositionBias, theta_covering
from adrec_assets.online.posterior import PolicyPosterior, replay_posterior
from adrec_assets.resources import ClickSourceResource


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def policy_posterior(
    context: dg.AssetExecutionContext,
    click_sources: ClickSourceResource,
    click_graph: ClickGraph,
    served_users: UserEmbeddings,
    global_mean: GlobalMean,
    served_ads: ProjectedAds,
    position_bias: PositionBias,
) -> dg.Output[PolicyPosterior]:
    """Bayesian logistic regression on phi(u, a) = [u * v_a, b_a, 1] (``served_ads``), learnt
    by replaying the logged impressions with this run's user and ad vectors (position-bias aware). Every
    replica and every restart serves this same posterior; the service then refines it online
    from the events it receives. Ads no longer in the catalogue are skipped; users not in
    the user space are represented by the global mean, as the service does. The catalogue
    ads without a training click in ``click_graph`` are the fresh ads: their random effects
    (prior sd ``DEFAULT_FRESH_PRIOR_SD``, the service's default) learn from the same replay."""
    with stopwatch() as timing:
        impressions = impressions_with_outcomes(read_event_log(click_sources.sources_root() / context.partition_key))
        ad_row = {ad: row for row, ad in enumerate(served_ads.ids.tolist())}
        known = impressions[impressions["ad_id"].map(lambda a: a in ad_row)] if len(impressions) else impressions
        users = np.stack(
            [
                served_users.vectors[row] if (row := served_users.row_of(u)) is not None else global_mean.vector
                for u in known["user_pseudonym"].tolist()
            ]
        ) if len(known) else np.zeros((0, served_users.dim), np.float32)  # fmt: skip
        rows = np.asarray([ad_row[a] for a in known["ad_id"].tolist()], dtype=np.int64)
        ads = np.concatenate([served_ads.vectors[rows], served_ads.score_bias[rows, None]], axis=1)
        positions = known["position"].to_numpy(dtype=np.int64) if len(known) else np.zeros(0, np.int64)
        theta = theta_covering(position_bias.theta, int(positions.max()) + 1 if len(positions) else 1)
        fresh = _fresh_effects(click_graph, served_ads, served_users.dim)
        posterior = replay_posterior(
            served_users.dim, users.astype(np.float32), ads.astype(np.float32),
            known["clicked"].to_numpy(dtype=float) if len(known) else np.zeros(0), positions, theta,
            ad_rows=rows, fresh=fresh,
        )  # fmt: skip
    n_clicks = int(known["clicked"].sum()) if len(known) else 0
    artifact = PolicyPosterior(posterior, served_users.space, len(known), n_clicks, fresh.learnt(), fresh.prior_sd)
    return dg.Output(
        artifact,
        metadata={
            "n_impressions_learnt": artifact.n_impressions,
            "n_clicks_learnt": artifact.n_clicks,
            "n_impressions_skipped_unknown_ad": len(impressions) - len(known),
            "user_space": artifact.space,
            "n_fresh_ads": fresh.view().count,
            "n_fresh_ads_learnt": len(artifact.fresh),
            "replay_seconds": round(timing["seconds"], 3),
        },
    )


def _fresh_effects(click_graph: ClickGraph, served_ads: ProjectedAds, dim: int) -> FreshAdEffects:
    """Prior effects for the projected ads without a training click, numbered by their row."""
    rows = untrained_rows(served_ads.ids, click_graph.ad_ids, click_graph.ad_degrees())
    fresh = FreshAdEffects(dim, DEFAULT_FRESH_PRIOR_SD)
    stored = np.concatenate([served_ads.vectors[rows], served_ads.score_bias[rows, None]], axis=1)
    fresh.register(served_ads.ids[rows].tolist(), rows, stored)
    return fresh
