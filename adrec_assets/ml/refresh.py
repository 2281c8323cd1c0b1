"""Incremental refresh: when to reuse, refine or retrain, and the warm starting points.

A re-materialization after a small batch of new clicks should not pay for a full retrain.
Each training step looks at its previous artifact for the same source and picks a path:

* ``reused``: the inputs (click graph, and for the projector the content and user vectors)
  and the settings are exactly those of the previous artifact, so it is returned as is;
  re-running a materialization therefore gives the same numbers;
* ``warm_start``: settings unchanged and a model-specific precondition holds (most users
  known; for the projector: same encoder and a user space refined from the one it maps
  into), so training continues from the previous state for a few epochs; new users start
  at the previous global mean (the cold-start prior), new ads need nothing;
* ``full_retrain``: anything else, or when asked (``warm_start=false``, the nightly run;
  a previous artifact is then only reused if it came from a full retrain itself).

Both models record a :class:`~adrec_assets.ml.types.TrainingProvenance`, and one function,
:func:`decide`, reads it for both. ``trained_by`` (the last path that actually trained)
makes the next full retrain end any chain of warm refreshes. The decision carries a
human-readable reason that the assets publish as metadata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from adrec_assets.ml.fields import FieldEncoder
from adrec_assets.ml.training import normalized_mean
from adrec_assets.ml.types import FULL_RETRAIN, WARM_START, ClickGraph, TrainingProvenance, UserEmbeddings

REUSED = "reused"
__all__ = ["FULL_RETRAIN", "REUSED", "WARM_START", "RefreshDecision", "decide", "fingerprint", "graph_fingerprint"]
#: Below this share of current users known to the previous artifact, a warm start would
#: mostly be a cold start from the mean vector: retrain instead.
MIN_KNOWN_USER_SHARE = 0.5


@dataclass(frozen=True)
class RefreshDecision:
    path: str  # REUSED | WARM_START | FULL_RETRAIN
    reason: str


@dataclass(frozen=True)
class Precondition:
    """What a warm start additionally needs; ``reason`` says why it holds or fails."""

    holds: bool
    reason: str


def decide(
    previous: TrainingProvenance | None,
    params: Mapping[str, Any],
    inputs_fingerprint: str,
    warm_start: bool,
    precondition: Callable[[], Precondition],
    why_none: str = "no previous materialization of this partition",
) -> RefreshDecision:
    """The path for a model whose last artifact has ``previous`` provenance (``None``: there is
    none, ``why_none`` says why). ``params`` are this run's settings as a dict;
    ``precondition`` is evaluated only when a warm start is otherwise possible."""
    if previous is None:
        return RefreshDecision(FULL_RETRAIN, why_none)
    if dict(previous.params) != dict(params):
        return RefreshDecision(FULL_RETRAIN, "training settings differ from the previous materialization's")
    same_inputs = previous.inputs_fingerprint == inputs_fingerprint
    if same_inputs and (warm_start or previous.trained_by == FULL_RETRAIN):
        return RefreshDecision(REUSED, "same inputs and settings as the previous materialization")
    if not warm_start:
        return RefreshDecision(FULL_RETRAIN, "warm_start=false (full retrain requested)")
    warm = precondition()
    return RefreshDecision(WARM_START if warm.holds else FULL_RETRAIN, warm.reason)


def fingerprint(*arrays: np.ndarray) -> str:
    """Content hash of arrays (shape, dtype and bytes): identifies exactly the same inputs.
    String arrays hash their text, whatever their numpy dtype (fixed-width or object)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        if array.dtype.kind in "UO":
            digest.update(f"str{array.shape}".encode())
            digest.update("\x1f".join(map(str, array.ravel().tolist())).encode())
        else:
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def graph_fingerprint(graph: ClickGraph) -> str:
    return fingerprint(graph.user_ids, graph.ad_ids, graph.indptr, graph.indices, graph.weights)


def known_users(graph: ClickGraph, previous: UserEmbeddings) -> Precondition:
    """Users' warm-start precondition: most of today's users have a previous vector."""
    known = float(np.mean([previous.row_of(u) is not None for u in graph.user_ids.tolist()])) if graph.n_users else 0.0
    if known < MIN_KNOWN_USER_SHARE:
        return Precondition(
            False, f"only {known:.0%} of users are in the previous artifact (< {MIN_KNOWN_USER_SHARE:.0%})"
        )
    return Precondition(True, f"settings unchanged, {known:.1%} of users known: refining the previous vectors")


def projector_continues(
    previous_encoder: str, encoder_id: str, previous_space: str, users: UserEmbeddings,
    previous_fields: FieldEncoder = FieldEncoder(), fields: FieldEncoder = FieldEncoder(),
) -> Precondition:  # fmt: skip
    """Projector's warm-start precondition: same encoder, the same declared structured fields
    (a refresh keeps the previous fitted encoding: its input width is the model's), and a user
    space refined from the one the previous projector maps into (a retrained user space is
    unrelated to it)."""
    if previous_encoder != encoder_id:
        return Precondition(False, f"encoder changed ({previous_encoder} -> {encoder_id})")
    before, now = [f.spec for f in previous_fields.fields], [f.spec for f in fields.fields]
    if before != now:
        return Precondition(
            False, f"declared ad fields changed ({[s.name for s in before]} -> {[s.name for s in now]})"
        )
    if users.provenance.warm_started_from != previous_space:
        return Precondition(
            False, "the user space was retrained, not refined from the one the previous projector maps into"
        )
    return Precondition(True, "settings and encoder unchanged, user space refined: continuing training")


def user_warm_init(user_ids: np.ndarray, previous: UserEmbeddings) -> tuple[np.ndarray, int]:
    """(n_users, dim) starting table and the number of known users. Known users start from
    their previous vector; new users from the previous space's mean (the normalized mean of
    its trained, non-isolated users; ``global_mean`` averages the served, refitted users)."""
    prior = normalized_mean(previous.trained_vectors())[0]
    init = np.tile(prior, (len(user_ids), 1))
    rows = np.fromiter((-1 if (r := previous.row_of(u)) is None else r for u in user_ids.tolist()), np.int64,
                       count=len(user_ids))  # fmt: skip
    known = rows >= 0
    init[known] = previous.vectors[rows[known]]
    return init.astype(np.float32), int(known.sum())


def projector_inputs_fingerprint(
    graph: ClickGraph, content: np.ndarray, encoder_id: str, users: UserEmbeddings, fields: np.ndarray | None = None
) -> str:
    """Everything the projector learns from: clicks, content (and its encoder), the encoded
    structured fields of the same ads, user vectors."""
    extra = () if fields is None or fields.shape[1] == 0 else (fields,)
    return fingerprint(
        np.asarray(graph_fingerprint(graph)), np.asarray(encoder_id), content, *extra, users.vectors,
        np.asarray(users.space),
    )  # fmt: skip
