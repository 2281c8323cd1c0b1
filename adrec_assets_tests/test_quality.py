"""Quality on synthetic data with known archetypes: a broken model must fail these.

Uses the artifacts of one default materialization of the ``synthetic`` partition and the
generator's ground truth (which never enters an artifact).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adrec_assets.ml.metrics import recall_at_k
from adrec_assets.ml.models import Projector
from adrec_assets.ml.training import project
from adrec_assets.privacy import pseudonymize
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources.catalog import load_builtin_catalog
from adrec_assets.sources.synthetic import SyntheticClickGenerator
from adrec_assets_tests.metric_helpers import group_cosine_separation
from adrec_assets_tests.pipeline_fixtures import TEST_ID_KEY

RECALL_AT_10_THRESHOLD = 0.6  # random ranking of the 40 cold ads gives 10/40 = 0.25 (4 relevant)


@pytest.fixture(scope="module")
def truth_and_artifacts(pipeline_artifacts):
    base, load = pipeline_artifacts
    labelled = load_builtin_catalog()
    _, truth = SyntheticClickGenerator(labelled, ClickSourceResource().synthetic_params()).generate()
    users = load(base, "user_embeddings")
    archetype_of = {pseudonymize(u, TEST_ID_KEY.encode()): a for u, a in zip(truth.user_ids, truth.user_archetype)}
    user_archetype = np.array([archetype_of[u] for u in users.ids])
    return truth, labelled, users, user_archetype, load(base, "ad_embeddings_raw"), load(base, "ad_projected")


def _cold_recall(truth, labelled, users, user_archetype, projected_vectors, ad_ids) -> float:
    """Mean recall@10 over users: rank the never-clicked ads; relevant = primary category."""
    category_index = {c: i for i, c in enumerate(truth.categories)}
    cold = np.isin(ad_ids, truth.cold_ad_ids)
    ad_category = np.array([category_index[c] for c in labelled.categories])[cold]
    connected = ~users.isolated
    scores = users.vectors[connected] @ projected_vectors[cold].T
    relevant = truth.archetype_primary[user_archetype[connected]][:, None] == ad_category[None, :]
    return float(np.nanmean(recall_at_k(scores, relevant, k=10, rng=np.random.default_rng(0))))


def test_users_of_one_archetype_are_closer_to_each_other(truth_and_artifacts):
    _, _, users, user_archetype, _, _ = truth_and_artifacts
    connected = ~users.isolated
    within, across = group_cosine_separation(users.vectors[connected], user_archetype[connected])
    assert within > across + 0.1, (within, across)
    # And the structure is local too: a user's nearest neighbours mostly share its archetype.
    v = users.vectors[connected]
    labels = user_archetype[connected]
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :10]
    purity = float((labels[nearest] == labels[:, None]).mean())
    assert purity > 0.5, purity  # 10 equal archetypes: chance is ~0.1


def test_never_clicked_ads_rank_highest_for_their_archetype(truth_and_artifacts):
    truth, labelled, users, user_archetype, raw, projected = truth_and_artifacts
    assert (projected.ids == labelled.catalog.ad_ids).all()
    recall = _cold_recall(truth, labelled, users, user_archetype, projected.vectors, projected.ids)
    assert recall >= RECALL_AT_10_THRESHOLD, recall


def test_the_quality_bar_fails_for_an_untrained_projector(truth_and_artifacts):
    """Same protocol, randomly initialized projector: must not pass (the test can fail)."""
    truth, labelled, users, user_archetype, raw, _ = truth_and_artifacts
    torch.manual_seed(0)
    untrained = project(Projector(raw.dim, users.dim), raw.vectors)
    recall = _cold_recall(truth, labelled, users, user_archetype, untrained, raw.ids)
    assert recall < RECALL_AT_10_THRESHOLD, recall


def test_the_quality_bar_fails_for_shuffled_user_vectors(truth_and_artifacts):
    truth, labelled, users, user_archetype, _, projected = truth_and_artifacts
    shuffled = np.random.default_rng(1).permutation(len(user_archetype))
    recall = _cold_recall(truth, labelled, users, user_archetype[shuffled], projected.vectors, projected.ids)
    assert recall < RECALL_AT_10_THRESHOLD, recall
