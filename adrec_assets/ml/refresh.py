"""Incremental refresh: when to reuse, refine or retrain, and the warm starting points.

A re-materialization after a small batch of new clicks should not pay for a full retrain.
Each training step looks at its previous artifact for the same source and picks a path:

* ``reused``: the inputs (click graph, and for the projector the content and user vectors)
  and the settings are exactly those of the previous artifact, so it is returned as is;
  re-running a materialization therefore gives the same numbers;
* ``warm_start``: settings and encoder are unchanged and most users are known, so training
  continues from the previous state for a few epochs; new users start at the previous
  global mean (the cold-start prior), new ads need nothing (the projector is content-based);
* ``full_retrain``: anything else, or when asked (``warm_start=false``, the nightly run;
  a previous artifact is then only reused if it came from a full retrain itself).

Artifacts record ``trained_by`` (the last path that actually trained: warm or full) so a
chain of warm refreshes is always ended by the next full retrain.

The decision carries a human-readable reason that the assets publish as metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.training import (
    ProjectorParams,
    UserTrainingParams,
    normalized_mean,
)
from adrec_assets.ml.types import ClickGraph, Embeddings

REUSED, WARM_START, FULL_RETRAIN = "reused", "warm_start", "full_retrain"
#: Below this share of current users known to the previous artifact, a warm start would
#: mostly be a cold start from the mean vector: retrain instead.
MIN_KNOWN_USER_SHARE = 0.5


@dataclass(frozen=True)
class RefreshDecision:
    path: str  # REUSED | WARM_START | FULL_RETRAIN
    reason: str


def fingerprint(*arrays: np.ndarray) -> str:
    """Content hash of arrays (shape, dtype and bytes): identifies exactly the same inputs."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype.kind != "U" else "\x1f".join(array.tolist()).encode())
    return digest.hexdigest()[:24]


def graph_fingerprint(graph: ClickGraph) -> str:
    return fingerprint(graph.user_ids, graph.ad_ids, graph.indptr, graph.indices, graph.weights)


def decide_users(
    warm_start: bool,
    previous: Embeddings | None,
    why_none: str,
    params: UserTrainingParams,
    graph: ClickGraph,
    clicks_fingerprint: str | None = None,
) -> RefreshDecision:
    """Path for ``user_embeddings``; ``why_none`` explains a missing previous artifact.
    ``clicks_fingerprint`` is ``graph_fingerprint(graph)`` when the caller already has it."""
    if previous is None:
        return RefreshDecision(FULL_RETRAIN, why_none)
    stored = previous.extra.get("training_params")
    if stored is None or json.loads(str(stored)) != asdict(params):
        return RefreshDecision(FULL_RETRAIN, "training settings differ from the previous materialization's")
    clicks_fingerprint = clicks_fingerprint or graph_fingerprint(graph)
    same_clicks = str(previous.extra.get("click_graph_fingerprint", "")) == clicks_fingerprint
    if same_clicks and (warm_start or str(previous.extra.get("trained_by", "")) == FULL_RETRAIN):
        return RefreshDecision(REUSED, "same clicks and settings as the previous materialization")
    if not warm_start:
        return RefreshDecision(FULL_RETRAIN, "warm_start=false (full retrain requested)")
    known = np.isin(graph.user_ids, previous.ids).mean() if graph.n_users else 0.0
    if known < MIN_KNOWN_USER_SHARE:
        return RefreshDecision(
            FULL_RETRAIN, f"only {known:.0%} of users are in the previous artifact (< {MIN_KNOWN_USER_SHARE:.0%})"
        )
    return RefreshDecision(WARM_START, f"settings unchanged, {known:.1%} of users known: refining the previous vectors")


def user_warm_init(user_ids: np.ndarray, previous: Embeddings) -> tuple[np.ndarray, int]:
    """(n_users, dim) starting table and the number of known users. Known users start from
    their previous vector; new users from the previous global mean (the normalized mean
    of the previously trained, non-isolated users: what ``global_mean`` holds)."""
    isolated = previous.extra.get("isolated")
    trained = previous.vectors if isolated is None or isolated.all() else previous.vectors[~isolated.astype(bool)]
    prior = normalized_mean(trained)[0]
    init = np.tile(prior, (len(user_ids), 1))
    order = np.argsort(previous.ids)
    position = np.searchsorted(previous.ids[order], user_ids)
    position = np.minimum(position, len(order) - 1)
    known = previous.ids[order][position] == user_ids
    init[known] = previous.vectors[order[position[known]]]
    return init.astype(np.float32), int(known.sum())


def projector_inputs_fingerprint(graph: ClickGraph, content: np.ndarray, user_vectors: np.ndarray) -> str:
    return fingerprint(np.asarray(graph_fingerprint(graph)), content, user_vectors)


def decide_projector(
    warm_start: bool,
    previous: TrainedProjector | None,
    why_none: str,
    params: ProjectorParams,
    encoder_id: str,
    users: Embeddings,
    inputs_fingerprint: str,
) -> RefreshDecision:
    """Path for ``projector``. A warm start also needs the user space to be a refinement of
    the one the previous projector maps into (a retrained user space is unrelated to it)."""
    if previous is None:
        return RefreshDecision(FULL_RETRAIN, why_none)
    if previous.encoder_id != encoder_id:
        return RefreshDecision(FULL_RETRAIN, f"encoder changed ({previous.encoder_id} -> {encoder_id})")
    if previous.training_params != asdict(params):
        return RefreshDecision(FULL_RETRAIN, "training settings differ from the previous materialization's")
    same_inputs = previous.inputs_fingerprint == inputs_fingerprint and previous.user_space == users.space
    if same_inputs and (warm_start or previous.trained_by == FULL_RETRAIN):
        return RefreshDecision(REUSED, "same content, clicks, user vectors and settings as the previous materialization")
    if not warm_start:
        return RefreshDecision(FULL_RETRAIN, "warm_start=false (full retrain requested)")
    continued_from = str(users.extra.get("warm_started_from", ""))
    if continued_from != previous.user_space:
        return RefreshDecision(
            FULL_RETRAIN, "the user space was retrained, not refined from the one the previous projector maps into"
        )
    return RefreshDecision(WARM_START, "settings and encoder unchanged, user space refined: continuing training")
