"""The serving pipeline's learnt steps in one call, on any clicks: what the evaluations retrain.

The assets run these steps one per asset (``user_embeddings`` → ``projector`` → ``ad_projected``
→ ``served_model``); the cold-start and warm evaluations (and ``benchmarks/warm_start.py``) run
them here on their training clicks, with the same code and settings, so what they measure is
what serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adrec_assets.ml.fields import AdFields
from adrec_assets.ml.models import Projector
from adrec_assets.ml.params import AdRefitParams, ProjectorParams, UserRefitParams, UserTrainingParams
from adrec_assets.ml.served_model import ServedModel, fit_served_model
from adrec_assets.ml.training import ProgressFn, project_with_bias, train_projector, train_user_embeddings
from adrec_assets.ml.types import ClickGraph


@dataclass(frozen=True)
class FittedPipeline:
    """Every learnt artifact over a catalogue whose first rows are the training graph's ads."""

    user_vectors: np.ndarray  # (n_users, d) InfoNCE users: what the projector learns, a refresh starts from
    model: Projector
    projected: np.ndarray  # (n_catalogue, d) unit content projections
    projected_bias: np.ndarray  # (n_catalogue,)
    served: ServedModel  # users and graph ads as served
    history_steps: int
    final_loss: float

    @property
    def users(self) -> np.ndarray:
        return self.served.users

    def ads(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, score terms) of the whole catalogue as served: the graph's ads refitted,
        the rest exactly as projected."""
        n = len(self.served.ads.vectors)
        vectors, bias = self.projected.copy(), self.projected_bias.copy()
        vectors[:n], bias[:n] = self.served.ads.vectors, self.served.ads.score_bias
        return vectors, bias


def fit_pipeline(
    train: ClickGraph,
    content: np.ndarray,
    fields: AdFields,
    user_params: UserTrainingParams,
    projector_params: ProjectorParams,
    refit_params: UserRefitParams = UserRefitParams(),
    ad_params: AdRefitParams = AdRefitParams(),
    init_users: np.ndarray | None = None,
    init_projector: dict[str, torch.Tensor] | None = None,
    refresh_epochs: tuple[int, int] = (2, 2),
    progress: ProgressFn | None = None,
) -> FittedPipeline:
    """User space, projector (field encoding fitted on every ad of ``fields``, as the
    ``projector`` asset does), projection of every ad, served users and ads. ``content`` and
    ``fields`` cover the catalogue with the graph's ads first. With ``init_users`` and
    ``init_projector`` it is a warm-start refresh of ``refresh_epochs`` (users, projector) epochs."""
    n = train.n_ads
    refresh = init_users is not None
    users = train_user_embeddings(train, user_params, init=init_users, epochs=refresh_epochs[0] if refresh else None)
    model = train_projector(
        train, content[:n], users.vectors, projector_params, progress,
        init_state=init_projector, epochs=refresh_epochs[1] if init_projector is not None else None,
        fields=fields.fit(projector_params.field_scale), field_cells=fields.take(np.arange(n)).cells,
    ).model  # fmt: skip
    projected, bias = project_with_bias(model, content, fields.cells)
    served = fit_served_model(train, users.vectors, projected[:n], bias[:n], refit_params, ad_params)
    losses = users.history.epoch_losses
    return FittedPipeline(users.vectors, model, projected, bias, served, users.history.steps,
                          losses[-1] if losses else float("nan"))  # fmt: skip
