"""projector: the MLP that maps ad content into the user space."""

from dataclasses import asdict

import dagster as dg
import torch

from adrec_assets.assets.common import (
    PARTITIONED,
    epoch_logger,
    load_previous_output,
    params_config,
    refresh_metadata,
    training_metadata,
)
from adrec_assets.ml.fields import FieldError
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.params import ProjectorParams
from adrec_assets.ml.refresh import REUSED, WARM_START, decide, projector_continues, projector_inputs_fingerprint
from adrec_assets.ml.training import train_projector
from adrec_assets.ml.types import (
    AdCatalog,
    ArtifactError,
    ClickGraph,
    ContentEmbeddings,
    UserEmbeddings,
    align_rows,
    check_unit_rows,
)
from adrec_assets.resources import ArtifactStoreResource

ProjectorConfig = params_config(ProjectorParams, "ProjectorConfig")


@dg.asset(kinds={"pytorch"}, **PARTITIONED)
def projector(
    context: dg.AssetExecutionContext,
    config: ProjectorConfig,
    artifacts: ArtifactStoreResource,
    raw_ads: AdCatalog,
    ad_embeddings_raw: ContentEmbeddings,
    click_graph: ClickGraph,
    user_embeddings: UserEmbeddings,
) -> dg.Output[TrainedProjector]:
    """768 (+ the source's structured ad fields) -> 512 -> 128 MLP (LayerNorm, GELU, Dropout,
    L2-normalized output), trained on clicked ads; saved as a state dict, the fitted field
    encoding and the provenance to rebuild it. Like ``user_embeddings`` it reuses,
    warm-starts or retrains (``training_path`` metadata)."""
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
    encoder_id = ad_embeddings_raw.encoder_id
    content = ad_embeddings_raw.vectors[content_rows]
    catalog_rows = align_rows(raw_ads.ad_ids, click_graph.ad_ids, f"projector[{key}]: clicked ads missing from raw_ads")
    cells = raw_ads.fields.take(catalog_rows).cells
    try:  # vocabularies and bins from the whole catalogue: ad properties, no clicks involved
        fields = raw_ads.fields.fit(params.field_scale)
    except FieldError as exc:
        raise ArtifactError(f"projector[{key}]: raw_ads ad fields: {exc}") from None
    inputs = projector_inputs_fingerprint(
        click_graph, content, encoder_id, user_embeddings, fields.transform(cells, click_graph.n_ads)
    )
    previous, why_none = load_previous_output(context, artifacts)
    decision = decide(
        previous.provenance if previous is not None else None,
        asdict(params),
        inputs,
        config.warm_start,
        lambda: projector_continues(
            previous.encoder_id, encoder_id, previous.user_space, user_embeddings, previous.model.fields, fields
        ),
        why_none,
    )
    context.log.info(f"projector: {decision.path} ({decision.reason})")
    if decision.path == REUSED:
        return dg.Output(
            previous,
            metadata={"encoder_id": previous.encoder_id, "user_space": previous.user_space,
                      **refresh_metadata(decision), "train_seconds": 0.0},
        )  # fmt: skip
    warm = decision.path == WARM_START
    result = train_projector(
        click_graph,
        content,
        user_embeddings.vectors,
        params,
        epoch_logger(context, "projector"),
        init_state=previous.model.state_dict() if warm else None,
        epochs=config.refresh_epochs if warm else None,
        fields=previous.model.fields if warm else fields,  # a refresh keeps the model's input columns
        field_cells=cells,
    )
    bad = [name for name, p in result.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ArtifactError(
            f"projector[{key}]: training diverged (non-finite weights in {bad}); lower lr and re-materialize"
        )
    trained = TrainedProjector.trained(
        result.model, encoder_id, user_embeddings.space, inputs, decision.path,
        previous.user_space if warm else "",
    )  # fmt: skip
    return dg.Output(
        trained,
        metadata={
            "encoder_id": trained.encoder_id,
            "user_space": trained.user_space,
            "architecture": str(result.model.architecture()),
            "n_trained_ads": result.n_trained_ads,
            "ad_fields": ", ".join(
                f"{f.spec.name} ({f.spec.kind}, {f.width} columns)" for f in result.model.fields.fields
            )
            or "none declared",
            "n_parameters": sum(p.numel() for p in result.model.parameters()),
            **refresh_metadata(decision),
            **training_metadata(result.history),
        },
    )
