"""Small helpers shared by the asset modules (metadata formatting, timing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from adrec_assets.ml.training import ProgressFn, TrainingHistory
from adrec_assets.partitions import click_source_partitions

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


def training_metadata(history: TrainingHistory) -> dict[str, dg.RawMetadataValue]:
    losses = history.epoch_losses
    return {
        "train_seconds": dg.MetadataValue.float(round(history.seconds, 3)),
        "optimizer_steps": dg.MetadataValue.int(history.steps),
        "epochs_run": dg.MetadataValue.int(len(losses)),
        "final_loss": dg.MetadataValue.float(round(losses[-1], 5) if losses else float("nan")),
        # ~0: converged; clearly > 0: the loss was still falling, more steps would help
        "loss_drop_last_10pct_epochs": dg.MetadataValue.float(round(history.late_improvement(), 5)),
        "loss_curve": dg.MetadataValue.md(history.markdown()),
    }
