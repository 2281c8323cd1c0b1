"""The projector: content space (768-d) -> user space (128-d)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Projector(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear -> L2-normalize.

    Its output lives on the unit sphere like user vectors, so cosine(user, projector(ad))
    is the score, and any ad with content, clicked or not, gets a vector.
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

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(content), dim=-1)


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

    def to_checkpoint(self) -> dict:
        """Plain tensors and primitives only: loads with ``torch.load(weights_only=True)``."""
        return {
            "format": "adrec.projector.v1",
            "spec": self.model.spec.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "encoder_id": self.encoder_id,
            "user_space": self.user_space,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainedProjector":
        if checkpoint.get("format") != "adrec.projector.v1":
            raise ValueError(f"not an adrec projector checkpoint (format={checkpoint.get('format')!r})")
        model = Projector(ProjectorSpec(**checkpoint["spec"]))
        model.load_state_dict(checkpoint["state_dict"])
        model.eval()
        return cls(model=model, encoder_id=checkpoint["encoder_id"], user_space=checkpoint["user_space"])
