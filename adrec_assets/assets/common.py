"""Small helpers shared by the asset modules (metadata formatting, timing)."""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import pydantic

from adrec_assets.ml.refresh import RefreshDecision
from adrec_assets.ml.training import ProgressFn, TrainingHistory
from adrec_assets.partitions import click_source_partitions
from adrec_assets.resources import ArtifactStoreResource

ASSET_GROUP = "adrec"
EVALUATION_GROUP = "evaluation"  # quality reports: outside the serving pipeline's group and job
PARTITION_KWARGS = {"partitions_def": click_source_partitions}
PARTITIONED = {**PARTITION_KWARGS, "group_name": ASSET_GROUP}


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    timing: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - started


def epoch_logger(context: dg.AssetExecutionContext, what: str) -> ProgressFn:
    """Log about ten progress lines per training run, whatever the epoch count."""

    def log(epoch: int, epochs: int, loss: float) -> None:
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            context.log.info(f"{what}: epoch {epoch}/{epochs} mean loss {loss:.4f}")

    return log


def load_previous_output(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource) -> tuple[Any | None, str]:
    """(artifact, note): this asset in the snapshot the run builds on (the source's published
    snapshot when the run first read). Warm starts are an optimization, so an unreadable
    previous artifact is not an error: it is reported and the caller trains from scratch."""
    store = artifacts.store(context.partition_key)
    asset = context.asset_key.to_user_string()
    base = store.base_of(context.run_id)
    if base is None:
        return None, "no previous materialization of this partition"
    snapshot = store.snapshot(base)
    if asset not in snapshot.artifacts:
        return None, f"the published snapshot {base} has no {asset}"
    try:
        return store.load(asset, snapshot), f"published snapshot {base}"
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: retrain, and say why
        context.log.warning(f"{asset} of snapshot {base} not usable for a warm start: {exc}")
        return None, f"{asset} of snapshot {base} unreadable ({type(exc).__name__})"


def refresh_metadata(decision: RefreshDecision) -> dict[str, dg.RawMetadataValue]:
    return {"training_path": decision.path, "training_path_reason": decision.reason}


def training_metadata(history: TrainingHistory) -> dict[str, dg.RawMetadataValue]:
    losses = history.epoch_losses
    return {
        "pairs_trained": dg.MetadataValue.int(history.pairs),
        "train_seconds": dg.MetadataValue.float(round(history.seconds, 3)),
        "optimizer_steps": dg.MetadataValue.int(history.steps),
        "epochs_run": dg.MetadataValue.int(len(losses)),
        "final_loss": dg.MetadataValue.float(round(losses[-1], 5) if losses else float("nan")),
        # ~0: converged; clearly > 0: the loss was still falling, more steps would help
        "loss_drop_last_10pct_epochs": dg.MetadataValue.float(round(history.late_improvement(), 5)),
        "loss_curve": dg.MetadataValue.md(history.markdown()),
    }


class RefreshConfig(dg.Config):
    """Run-level switches of a trainable asset (its model settings come from the core's params)."""

    warm_start: bool = pydantic.Field(
        default=True,
        description="Refine this partition's previous model when the settings are unchanged and its inputs "
        "allow it; false = full retrain, what the nightly schedule runs.",
    )
    refresh_epochs: int = pydantic.Field(default=2, description="Epochs of a warm-start refresh.")


def params_config(params_cls: type, name: str, base: type[dg.Config] = RefreshConfig) -> type[dg.Config]:
    """A Dagster ``Config`` with one launchpad field per field of a core params dataclass
    (same name, type, default and description) plus ``base``'s fields (by default
    :class:`RefreshConfig`'s switches), and a ``to_params()`` that builds the dataclass back:
    the settings are declared once, in :mod:`adrec_assets.ml.params`."""
    hints = typing.get_type_hints(params_cls)
    fields = {
        f.name: (hints[f.name], pydantic.Field(default=f.default, description=f.metadata.get("help")))
        for f in dataclasses.fields(params_cls)
    }
    names = set(fields)

    def to_params(self: dg.Config) -> Any:
        return params_cls(**self.model_dump(include=names))

    config = pydantic.create_model(name, __base__=base, __doc__=params_cls.__doc__, **fields)
    config.to_params = to_params
    return config
