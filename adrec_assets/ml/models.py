"""The projector: content space (768-d) -> user space (128-d)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything needed to rebuild the module before loading its state dict."""

    in_dim: int = 768
    hidden_dim: int = 512
    out_dim: int = 128
    dropout: float = 0.1
    popularity_weight: float = 0.25  # beta in score = cos(user, ad) + beta * popularity_z(ad)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


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
    """

    def __init__(self, spec: ProjectorSpec = ProjectorSpec()) -> None:
        super().__init__()
        self.spec = spec
        self.net = nn.Sequential(
            nn.Linear(spec.in_dim, spec.hidden_dim),
            nn.LayerNorm(spec.hidden_dim),
            nn.GELU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden_dim, spec.out_dim),
        )
        self.popularity = nn.Linear(spec.in_dim, 1)
        nn.init.zeros_(self.popularity.weight)  # an unfitted head predicts "average" for every ad
        nn.init.zeros_(self.popularity.bias)
        self.popularity.requires_grad_(False)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(content), dim=-1)

    def popularity_z(self, content: torch.Tensor) -> torch.Tensor:
        """Predicted standardized log click count (0 = a typical training ad), shape (n,)."""
        return self.popularity(content).squeeze(-1)

    def score_bias(self, content: torch.Tensor) -> torch.Tensor:
        """The additive, user-independent part of the score, shape (n,)."""
        return self.spec.popularity_weight * self.popularity_z(content)


CHECKPOINT_FORMAT = "adrec.projector.v2"  # v2 added the popularity head


@dataclass
class TrainedProjector:
    """A projector with the provenance that makes its outputs safe to use.

    ``encoder_id`` is the content encoder it was trained on (its inputs must come from the
    same encoder) and ``user_space`` identifies the user vectors it was trained to match
    (its outputs are only comparable with those).
    """

    model: Projector
    encoder_id: str
    user_space: str
    training_params: dict[str, float | int] = field(default_factory=dict)  # how it was trained
    inputs_fingerprint: str = ""  # hash of the clicks, content and user vectors it was trained on
    trained_by: str = ""  # "full_retrain" or "warm_start" (see adrec_assets.ml.refresh)

    def to_checkpoint(self) -> dict:
        """Plain tensors and primitives only: loads with ``torch.load(weights_only=True)``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "spec": self.model.spec.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "encoder_id": self.encoder_id,
            "user_space": self.user_space,
            "training_params": dict(self.training_params),
            "inputs_fingerprint": self.inputs_fingerprint,
            "trained_by": self.trained_by,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainedProjector":
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"not a {CHECKPOINT_FORMAT} projector checkpoint (format={checkpoint.get('format')!r}); "
                "re-materialize the projector asset with this version"
            )
        model = Projector(ProjectorSpec(**checkpoint["spec"]))
        model.load_state_dict(checkpoint["state_dict"])
        model.eval()
        return cls(
            model=model,
            encoder_id=checkpoint["encoder_id"],
            user_space=checkpoint["user_space"],
            training_params=dict(checkpoint.get("training_params", {})),
            inputs_fingerprint=str(checkpoint.get("inputs_fingerprint", "")),
            trained_by=str(checkpoint.get("trained_by", "")),
        )
