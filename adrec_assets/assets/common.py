"""Small helpers shared by the asset modules (metadata formatting, timing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from adrec_assets.ml.training import ProgressFn, TrainingHistory
from adrec_assets.partitions import click_source_partitions

ASSET_GROUP = "adrec"
PARTITIONED = {"partitions_def": click_source_partitions, "group_name": ASSET_GROUP}


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    timing: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - started


def epoch_logger(context: dg.AssetExecutionContext, what: str, epochs: int) -> ProgressFn:
    """Log about ten progress lines per training run, whatever the epoch count."""
    every = max(1, epochs // 10)

    def log(epoch: int, loss: float) -> None:
        if epoch % every == 0 or epoch == epochs:
            context.log.info(f"{what}: epoch {epoch}/{epochs} mean loss {loss:.4f}")

    return log


def training_metadata(history: TrainingHistory) -> dict[str, dg.RawMetadataValue]:
    losses = history.epoch_losses
    return {
        "train_seconds": dg.MetadataValue.float(round(history.seconds, 3)),
        "optimizer_steps": dg.MetadataValue.int(history.steps),
        "final_loss": dg.MetadataValue.float(round(losses[-1], 5) if losses else float("nan")),
        "loss_curve": dg.MetadataValue.md(history.markdown()),
    }
