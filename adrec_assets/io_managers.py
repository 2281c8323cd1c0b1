"""The IO manager that persists every artifact as ``<base_dir>/<asset>/<partition>.<ext>``.

A thin Dagster wrapper over :mod:`adrec_assets.artifacts`: the artifact's registered type
picks its codec (``.npz`` without pickle, or a ``weights_only`` torch checkpoint), and the
path rule is :func:`adrec_assets.artifacts.artifact_path`, the same one the CLI and the
service read through. Local writes are atomic (temp file, fsync, rename), so a crash or a
failed run never leaves a torn file; remote UPaths (s3://, ...) are written in one put.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from adrec_assets.artifacts import (
    ARTIFACTS_DIR_ENV_VAR,
    DEFAULT_ARTIFACTS_DIR,
    artifact_path,
    extension_of,
    load_source_artifact,
    resolve_root,
    write_file,
)


def _asset_name(key: dg.AssetKey) -> str:
    return "/".join(key.path)


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Vectors, ids and click graphs as ``.npz``; the projector as a ``.pt`` checkpoint."""

    base_dir: str | None = Field(
        default=None,
        description=f"Root folder or URL; default ${ARTIFACTS_DIR_ENV_VAR} or '{DEFAULT_ARTIFACTS_DIR}'.",
    )

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        asset = _asset_name(context.asset_key)
        try:
            extension = extension_of(obj)
        except TypeError as exc:
            raise TypeError(f"{asset}: the artifact IO manager stores adrec artifacts; {exc}") from None
        path = artifact_path(resolve_root(self.base_dir), asset, context.partition_key, extension)
        write_file(path, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        asset = _asset_name(context.upstream_output.asset_key)
        return load_source_artifact(resolve_root(self.base_dir), asset, context.asset_partition_key)
