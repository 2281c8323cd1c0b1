"""global_mean: the cold-start prior for users the pipeline has never seen."""

import dagster as dg

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.ml.training import normalized_mean
from adrec_assets.ml.types import GlobalMean, UserEmbeddings


@dg.asset(kinds={"numpy"}, **PARTITIONED)
def global_mean(served_users: UserEmbeddings) -> dg.Output[GlobalMean]:
    """L2-normalized mean of all served user vectors: the direction a brand-new user is scored
    with until they click. ``mean_norm`` (the raw mean's length) shows how concentrated
    the user space is: near 0 the prior is weak, near 1 every user looks alike."""
    vector, norm = normalized_mean(served_users.vectors)
    prior = GlobalMean(vector=vector, n_users=len(served_users), mean_norm=norm, space=served_users.space)
    return dg.Output(
        prior,
        metadata={"dim": len(vector), "n_users": prior.n_users, "mean_norm": round(norm, 5)},
    )
