"""IO managers: pipeline artifacts go through per-run staging into published snapshots;
reports are plain files beside them.

Thin Dagster wrappers over :mod:`adrec_assets.snapshots` and :mod:`adrec_assets.artifacts`:

* :class:`SnapshotIOManager` stages each output of a run (invisible to every other reader)
  and gives each step the run's own upstream outputs, else those of the snapshot that was
  current when the run first read; the ``snapshot`` asset publishes the staged set at the
  end of the run, all together or not at all;
* :class:`ReportIOManager` writes reports that describe a snapshot rather than form part of
  it (the cold-start evaluation, experiment reports) to
  ``<root>/<source>/reports/<asset>.<ext>``, atomically.
"""

from typing import Any

import dagster as dg

from adrec_assets.artifacts import extension_of, load_file, write_file
from adrec_assets.resources import ArtifactStoreResource
from adrec_assets.snapshots import SnapshotError


def _asset_name(key: dg.AssetKey) -> str:
    return "/".join(key.path)


def _run_id(context: dg.InputContext) -> str:
    """The run reading: a step's own run (the upstream output context may be a past run's)."""
    try:
        return context.step_context.run_id
    except dg.DagsterInvariantViolationError:  # built outside a run (tests, direct calls)
        return context.upstream_output.run_id


def _check_storable(asset: str, obj: Any) -> None:
    try:
        extension_of(obj)
    except TypeError as exc:
        raise TypeError(f"{asset}: the artifact IO managers store adrec artifacts; {exc}") from None


class SnapshotIOManager(dg.ConfigurableIOManager):
    """Pipeline artifacts: staged per run, published together by the ``snapshot`` asset."""

    artifacts: dg.ResourceDependency[ArtifactStoreResource]

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        asset = _asset_name(context.asset_key)
        _check_storable(asset, obj)
        path = self.artifacts.store(context.partition_key).stage(context.run_id, asset, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path)), "staged_by_run": context.run_id})

    def load_input(self, context: dg.InputContext) -> Any:
        asset = _asset_name(context.upstream_output.asset_key)
        store = self.artifacts.store(context.asset_partition_key)
        try:
            return store.load_for_run(_run_id(context), asset)
        except FileNotFoundError as exc:
            raise SnapshotError(f"source {store.source!r}: {asset} is missing from its snapshot ({exc})") from None


class ReportIOManager(dg.ConfigurableIOManager):
    """Reports about a source (not served): one atomically replaced file per asset."""

    artifacts: dg.ResourceDependency[ArtifactStoreResource]

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        asset = _asset_name(context.asset_key)
        _check_storable(asset, obj)
        path = self.artifacts.report_path(context.partition_key, asset, extension_of(obj))
        write_file(path, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        return load_file(
            self.artifacts.report_path(context.asset_partition_key, _asset_name(context.upstream_output.asset_key))
        )
