"""click_graph: the user x ad click matrix (CSR) with keyed user pseudonyms."""

import dagster as dg
import numpy as np

from adrec_assets.assets.common import PARTITIONED, stopwatch
from adrec_assets.ml.types import AdCatalog, ClickGraph
from adrec_assets.privacy import key_fingerprint, pseudonymize_many, resolve_key
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources import RawClicks


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def click_graph(
    context: dg.AssetExecutionContext, click_sources: ClickSourceResource, raw_ads: AdCatalog
) -> dg.Output[ClickGraph]:
    """Bipartite click graph over the catalogue of ``raw_ads``. Raw user ids are replaced by
    HMAC-SHA256 pseudonyms (key from ``$ADREC_ID_KEY``) before anything is stored; ids that
    arrive already pseudonymized (a ``user_pseudonym`` column, e.g. the clicks the service
    writes back) are kept as they are; repeated clicks add up as weights; clicks naming ads
    missing from the catalogue are dropped and counted."""
    with stopwatch() as timing:
        clicks, report = click_sources.source(context.partition_key).read_clicks(raw_ads.ad_ids)
        key = resolve_key()
        user_ids, user_codes = pseudonymized_users(clicks, key)
        graph = ClickGraph.from_codes(
            user_ids, user_codes, clicks.ad_vocab, clicks.ad_codes, clicks.weights, key_fingerprint(key)
        )
    clicks_per_user = np.diff(graph.indptr)
    ad_degree = graph.ad_degrees()
    return dg.Output(
        graph,
        metadata={
            "n_click_rows_read": report.n_rows,
            "n_click_files": report.n_files,
            "n_clicks_dropped_unknown_ad": report.n_unknown_ad_rows,
            "n_click_rows": len(clicks),
            "n_users": graph.n_users,
            "n_clicked_ads": graph.n_ads,
            "n_user_ad_pairs": graph.n_clicks,
            "median_ads_per_user": float(np.median(clicks_per_user)) if graph.n_users else 0.0,
            "share_users_with_1_or_2_ads": float(np.mean(clicks_per_user <= 2)) if graph.n_users else 0.0,
            "max_clickers_per_ad": int(ad_degree.max()) if graph.n_ads else 0,
            "n_users_given_as_pseudonyms": int(clicks.pseudonymized.sum()),
            "build_seconds": round(timing["seconds"], 3),
            "key_fingerprint": graph.key_fingerprint,
        },
    )


def pseudonymized_users(clicks: RawClicks, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, user codes) with every raw id replaced by its pseudonym. A raw id and the
    pseudonym given for the same person elsewhere become one user (one vocabulary entry)."""
    ids = clicks.user_vocab.copy()
    raw = ~clicks.pseudonymized
    ids[raw] = pseudonymize_many(clicks.user_vocab[raw], key)
    vocab, inverse = np.unique(ids.astype(str), return_inverse=True)
    return vocab, inverse[clicks.user_codes]
