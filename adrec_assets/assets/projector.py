"""projector: the MLP that maps ad content into the user space."""

from dataclasses import asdict

import dagster as dg
import torch
from pydantic import Field

from adrec_assets.assets.common import (
    PARTITIONED,
    epoch_logger,
    load_previous_output,
    refresh_metadata,
    training_metadata,
)
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.refresh import (
    REUSED,
    WARM_START,
    decide_projector,
    projector_inputs_fingerprint,
)
from adrec_assets.ml.training import ProjectorParams, train_projector
from adrec_assets.ml.types import (
    ArtifactError,
    ClickGraph,
    Embeddings,
    align_rows,
    check_unit_rows,
)

_D = ProjectorParams()


class ProjectorConfig(dg.Config):
    """InfoNCE(ad, its clickers) + centroid_weight x MSE(ad, centroid of its clickers)."""

    hidden_dim: int = Field(default=_D.hidden_dim, description="Hidden width of the MLP.")
    dropout: float = Field(default=_D.dropout, description="Dropout after the hidden layer.")
    temperature: float = Field(default=_D.temperature, description="InfoNCE temperature.")
    centroid_weight: float = Field(default=_D.centroid_weight, description="Weight of the centroid MSE loss.")
    epochs: int = Field(default=_D.epochs, description="Passes over the (ad, clicker) pairs (at least).")
    min_steps: int = Field(
        default=_D.min_steps, description="Raise the epochs until at least this many optimizer steps run."
    )
    batch_size: int = Field(default=_D.batch_size, description="Pairs per step (in-batch negatives).")
    lr: float = Field(default=_D.lr, description="AdamW learning rate.")
    weight_decay: float = Field(default=_D.weight_decay, description="AdamW weight decay.")
    popularity_weight: float = Field(
        default=_D.popularity_weight,
        description="Weight of the content-predicted popularity z-score added to the cosine (0 = pure cosine).",
    )
    seed: int = Field(default=_D.seed, description="Seeds init, dropout and sampling.")
    warm_start: bool = Field(
        default=True,
        description="Continue from this partition's previous projector when settings and encoder are unchanged "
        "and the user space was refined from the one it maps into; false = full retrain (nightly schedule).",
    )
    refresh_epochs: int = Field(default=2, description="Epochs of a warm-start refresh.")

    def to_params(self) -> ProjectorParams:
        return ProjectorParams(**self.model_dump(exclude={"warm_start", "refresh_epochs"}))


@dg.asset(io_manager_key="torch_io_manager", kinds={"pytorch"}, **PARTITIONED)
def projector(
    context: dg.AssetExecutionContext,
    config: ProjectorConfig,
    ad_embeddings_raw: Embeddings,
    click_graph: ClickGraph,
    user_embeddings: Embeddings,
) -> dg.Output[TrainedProjector]:
    """768 -> 512 -> 128 MLP (LayerNorm, GELU, Dropout, L2-normalized output), trained on
    clicked ads; saved as a state dict plus the spec and provenance to rebuild it. Like
    ``user_embeddings`` it reuses, warm-starts or retrains (``training_path`` metadata)."""
    key = context.partition_key
    if len(user_embeddings) != click_graph.n_users or (user_embeddings.ids != click_graph.user_ids).any():
        raise ArtifactError(
            f"projector[{key}]: user_embeddings does not match click_graph (different users); "
            "re-materialize user_embeddings for this partition first"
        )
    content_rows = align_rows(
        ad_embeddings_raw.ids,
        click_graph.ad_ids,
        f"projector[{key}]: clicked ads missing from ad_embeddings_raw (re-materialize raw_ads and "
        "ad_embeddings_raw, or fix clicks that name unknown ads)",
    )
    # Refuse bad inputs before training: NaN content would silently yield NaN weights.
    check_unit_rows(ad_embeddings_raw.vectors, f"projector[{key}] input ad_embeddings_raw")
    check_unit_rows(user_embeddings.vectors, f"projector[{key}] input user_embeddings")
    params = config.to_params()
    content = ad_embeddings_raw.vectors[content_rows]
    inputs = projector_inputs_fingerprint(click_graph, content, user_embeddings.vectors)
    previous, why_none = load_previous_output(context)
    decision = decide_projector(
        config.warm_start, previous, why_none, params, ad_embeddings_raw.encoder_id, user_embeddings, inputs
    )
    context.log.info(f"projector: {decision.path} ({decision.reason})")
    if decision.path == REUSED:
        return dg.Output(
            previous,
            metadata={"encoder_id": previous.encoder_id, "user_space": previous.user_space,
                      **refresh_metadata(decision), "train_seconds": 0.0},
        )
    warm = decision.path == WARM_START
    result = train_projector(
        click_graph,
        content,
        user_embeddings.vectors,
        params,
        epoch_logger(context, "projector"),
        init_state=previous.model.state_dict() if warm else None,
        epochs=config.refresh_epochs if warm else None,
    )
    bad = [name for name, p in result.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ArtifactError(
            f"projector[{key}]: training diverged (non-finite weights in {bad}); lower lr and re-materialize"
        )
    trained = TrainedProjector(
        model=result.model,
        encoder_id=ad_embeddings_raw.encoder_id,
        user_space=user_embeddings.space,
        training_params=asdict(params),
        inputs_fingerprint=inputs,
        trained_by=decision.path,
    )
    return dg.Output(
        trained,
        metadata={
            "encoder_id": trained.encoder_id,
            "user_space": trained.user_space,
            "architecture": str(result.model.spec.to_dict()),
            "n_trained_ads": result.n_trained_ads,
            "n_parameters": sum(p.numel() for p in result.model.parameters()),
            **refresh_metadata(decision),
            **training_metadata(result.history),
        },
    )
