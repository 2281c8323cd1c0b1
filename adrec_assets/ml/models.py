"""The projector: content space (768-d) -> user space (128-d)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from adrec_assets.ml.fields import FieldEncoder
from adrec_assets.ml.params import ProjectorParams
from adrec_assets.ml.types import ArtifactError, TrainingProvenance, artifact_type


class Projector(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear -> L2-normalize, plus a linear
    popularity head.

    The main output lives on the unit sphere like user vectors, so cosine(user,
    projector(ad)) is the personal part of the score, and any ad with content, clicked or
    not, gets a vector. In-batch InfoNCE trains popularity *out* of that cosine (a popular
    ad is a negative in many batches), and cosine scoring cannot put it back; so a separate
    linear head predicts the ad's standardized log click count from its content, and
    ``score_bias = popularity_weight * popularity_z`` is added to the cosine at serving time
    (0 turns it off). The head is fitted in closed form (ridge), not by gradient descent.

    The architecture comes from the training settings (``hidden_dim``, ``dropout``,
    ``popularity_weight``), so a checkpoint rebuilds it from its recorded provenance.

    ``in_dim`` is the content encoder's width; ``fields`` (fitted on the training catalogue)
    encodes the ad's declared structured fields into ``fields.width`` more input columns,
    appended by :meth:`inputs`. The projector keeps it so a brand-new ad's fields are
    encoded exactly as its training ads' were.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        params: ProjectorParams = ProjectorParams(),
        fields: FieldEncoder = FieldEncoder(),
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.params, self.fields = in_dim, out_dim, params, fields
        width = in_dim + fields.width
        self.net = nn.Sequential(
            nn.Linear(width, params.hidden_dim),
            nn.LayerNorm(params.hidden_dim),
            nn.GELU(),
            nn.Dropout(params.dropout),
            nn.Linear(params.hidden_dim, out_dim),
        )
        self.popularity = nn.Linear(width, 1)
        nn.init.zeros_(self.popularity.weight)  # an unfitted head predicts "average" for every ad
        nn.init.zeros_(self.popularity.bias)
        self.popularity.requires_grad_(False)

    def inputs(self, content: np.ndarray, field_cells: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
        """(n, in_dim + fields.width) float32: content vectors with their encoded fields
        appended (a field missing from ``field_cells``, or all of them, encodes as zeros)."""
        content = np.asarray(content, dtype=np.float32)
        if content.ndim != 2 or content.shape[1] != self.in_dim:
            raise ValueError(f"projector expects (n, {self.in_dim}) content vectors, got {content.shape}")
        if not self.fields.fields:
            return np.ascontiguousarray(content)
        return np.hstack([content, self.fields.transform(field_cells or {}, len(content))])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: rows of :meth:`inputs`."""
        return F.normalize(self.net(features), dim=-1)

    def popularity_z(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted standardized log click count (0 = a typical training ad) from rows of
        :meth:`inputs`, shape (n,)."""
        return self.popularity(features).squeeze(-1)

    def score_bias(self, features: torch.Tensor) -> torch.Tensor:
        """The additive, user-independent part of the score, shape (n,)."""
        return self.params.popularity_weight * self.popularity_z(features)

    def architecture(self) -> dict[str, int | float]:
        return {
            "in_dim": self.in_dim,
            "hidden_dim": self.params.hidden_dim,
            "out_dim": self.out_dim,
            "dropout": self.params.dropout,
            "popularity_weight": self.params.popularity_weight,
            "field_columns": self.fields.width,
        }


CHECKPOINT_FORMAT = "adrec.projector.v4"  # v4: the fitted structured-field encoding; v3: typed provenance


@artifact_type("projector", codec="pt")
@dataclass(eq=False)
class TrainedProjector:
    """A projector with the provenance that makes its outputs safe to use.

    ``encoder_id`` is the content encoder it was trained on (its inputs must come from the
    same encoder) and ``user_space`` identifies the user vectors it was trained to match
    (its outputs are only comparable with those). ``provenance.params`` are its
    :class:`ProjectorParams`, from which the module is rebuilt on load.
    """

    model: Projector
    encoder_id: str
    user_space: str
    provenance: TrainingProvenance

    @property
    def params(self) -> ProjectorParams:
        return self.model.params

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain tensors and primitives only: loads with ``torch.load(weights_only=True)``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "in_dim": self.model.in_dim,
            "out_dim": self.model.out_dim,
            "fields": self.model.fields.to_json(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "encoder_id": self.encoder_id,
            "user_space": self.user_space,
            "provenance": self.provenance.to_dict(),
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], origin: str = "projector checkpoint") -> TrainedProjector:
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ArtifactError(
                f"{origin}: not a {CHECKPOINT_FORMAT} projector checkpoint (format={found!r}); it was written by "
                "an older adrec: re-materialize the projector asset for this source"
            )
        missing = [k for k in ("in_dim", "out_dim", "fields", "state_dict", "encoder_id", "user_space", "provenance")
                   if k not in checkpoint]  # fmt: skip
        if missing:
            raise ArtifactError(f"{origin}: checkpoint lacks {missing}; re-materialize the projector")
        provenance = TrainingProvenance.from_dict(checkpoint["provenance"], origin)
        try:
            params = ProjectorParams(**provenance.params)
        except TypeError as exc:
            raise ArtifactError(f"{origin}: recorded settings do not fit ProjectorParams ({exc})") from None
        try:
            fields = FieldEncoder.from_json(str(checkpoint["fields"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{origin}: stored field encoding is malformed ({exc}); re-materialize the projector"
            ) from None
        model = Projector(int(checkpoint["in_dim"]), int(checkpoint["out_dim"]), params, fields)
        model.load_state_dict(checkpoint["state_dict"])
        model.eval()
        return cls(model, str(checkpoint["encoder_id"]), str(checkpoint["user_space"]), provenance)

    @classmethod
    def trained(
        cls, model: Projector, encoder_id: str, user_space: str, inputs_fingerprint: str, trained_by: str,
        warm_started_from: str = "",
    ) -> TrainedProjector:  # fmt: skip
        """A freshly trained projector with its provenance (its params are the model's)."""
        provenance = TrainingProvenance(asdict(model.params), inputs_fingerprint, trained_by, warm_started_from)
        return cls(model, encoder_id, user_space, provenance)
