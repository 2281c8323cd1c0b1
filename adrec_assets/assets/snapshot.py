"""snapshot: publish everything this run produced for the source, together, or nothing.

The last step of the pipeline job. Every other pipeline asset only *stages* its output
(:class:`~adrec_assets.io_managers.SnapshotIOManager`); readers outside the run see none of it
until this asset validates the staged artifacts against each other and atomically makes them
the source's current snapshot. A failed step or a failed blocking check upstream means this
asset never runs, so nothing is published and the previous snapshot stays current.
"""

import dagster as dg

from adrec_assets.assets.common import PARTITIONED
from adrec_assets.resources import ArtifactStoreResource
from adrec_assets.snapshots import PIPELINE_ARTIFACTS, check_consistency


@dg.asset(deps=list(PIPELINE_ARTIFACTS), kinds={"json"}, **PARTITIONED)
def snapshot(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource) -> dg.MaterializeResult:
    """The source's published snapshot (its id is the model version the service reports)."""
    store = artifacts.store(context.partition_key)
    published = store.publish(
        context.run_id,
        lambda load, assets: check_consistency(load, assets, PIPELINE_ARTIFACTS),
        artifacts.keep_snapshots,
    )
    removed = store.gc(artifacts.gc_grace_seconds, artifacts.keep_snapshots)
    context.log.info(f"published snapshot {published.id} of {context.partition_key!r} (previous {published.parent})")
    return dg.MaterializeResult(
        metadata={
            "snapshot_id": published.id,
            "previous_snapshot": published.parent or "",
            "artifacts": dg.MetadataValue.json(published.artifacts),
            **{key: value for key, value in published.info.items()},
            "history": dg.MetadataValue.json(store.history()),
            "gc": f"{removed.snapshots_removed} snapshots, {removed.objects_removed} objects, "
            f"{removed.runs_removed} stale runs, {removed.temp_files_removed} temp files removed",
        }
    )
