"""IO managers that persist artifacts as ``<base_dir>/<asset>/<partition>.<ext>``.

* :class:`NumpyIOManager` -> ``.npz`` (no pickle: loaded with ``allow_pickle=False``);
* :class:`TorchIOManager` -> ``.pt`` (tensors + primitives: loaded with ``weights_only=True``).

Local writes are atomic (:func:`adrec_assets.storage.atomic_write`), so a crash or a
failed run never leaves a torn file or damages the previous good artifact. Remote UPaths
(s3://, gs://, ...) are written in one put, which object stores already make atomic.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import dagster as dg
import numpy as np
import torch
from dagster._core.storage.upath_io_manager import escape_dotdot_segments
from pydantic import Field
from upath import UPath

from adrec_assets.ml.evaluation import EvaluationReport
from adrec_assets.ml.models import TrainedProjector
from adrec_assets.ml.types import ARTIFACT_TYPES as _CORE_ARTIFACT_TYPES
from adrec_assets.ml.types import ArtifactError
from adrec_assets.storage import atomic_write

ARTIFACTS_DIR_ENV_VAR = "ADREC_ARTIFACTS_DIR"
DEFAULT_ARTIFACTS_DIR = "data/artifacts"

#: Every type the numpy IO manager stores, by the ``__type__`` tag written into the file.
ARTIFACT_TYPES: dict[str, type] = {**_CORE_ARTIFACT_TYPES, EvaluationReport.type_tag: EvaluationReport}


def _write(path: UPath, write: Any) -> None:
    if path.protocol in ("", "file", "local"):
        atomic_write(Path(path.path), write)
    else:
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())


def write_npz_reproducibly(handle: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` that ``np.load`` reads, but with fixed zip timestamps: equal arrays give
    byte-identical files (``np.savez`` stamps the write time), so a digest of an artifact
    identifies its content and an unchanged re-materialization changes no byte."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class _ArtifactUPathIOManager(dg.UPathIOManager):
    def make_safe_partition_path(self, base_path: UPath, partition: str) -> UPath:
        # A partition key is a source name chosen at run time: never let it climb out.
        return base_path / escape_dotdot_segments(partition.lstrip("/"))


class NumpyArtifactIOManager(_ArtifactUPathIOManager):
    extension = ".npz"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        if not hasattr(obj, "to_arrays") or getattr(obj, "type_tag", None) not in ARTIFACT_TYPES:
            raise TypeError(
                f"{context.asset_key.to_user_string()}: the numpy IO manager stores adrec artifacts "
                f"(one of {sorted(ARTIFACT_TYPES)}), got {type(obj).__name__}"
            )
        arrays = {"__type__": np.asarray(obj.type_tag), **obj.to_arrays()}
        pickled = [k for k, v in arrays.items() if v.dtype.hasobject]
        if pickled:
            raise TypeError(
                f"{context.asset_key.to_user_string()}: arrays {pickled} hold Python objects, which "
                "would need pickle; store them as numeric or fixed-width string arrays"
            )

        _write(path, lambda handle: write_npz_reproducibly(handle, arrays))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        tag = str(arrays.pop("__type__", ""))
        if tag not in ARTIFACT_TYPES:
            raise ArtifactError(f"{path}: not an adrec artifact (type tag {tag!r}); re-materialize it")
        return ARTIFACT_TYPES[tag].from_arrays(arrays)


class TorchArtifactIOManager(_ArtifactUPathIOManager):
    extension = ".pt"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        if not isinstance(obj, TrainedProjector):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: the torch IO manager stores TrainedProjector, "
                f"got {type(obj).__name__}"
            )
        checkpoint = obj.to_checkpoint()
        _write(path, lambda handle: torch.save(checkpoint, handle))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> TrainedProjector:
        with path.open("rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
        return TrainedProjector.from_checkpoint(checkpoint)


def load_artifact_file(path: str | Path | UPath) -> Any:
    """Read one artifact file outside a run (CLI, tests, notebooks) with the same code the
    IO managers use; the suffix picks the format."""
    path = UPath(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize the pipeline for this source first (make run)")
    manager = TorchArtifactIOManager() if path.suffix == ".pt" else NumpyArtifactIOManager()
    return manager.load_from_path(None, path)  # type: ignore[arg-type]


def resolve_base_dir(base_dir: str | None) -> UPath:
    return UPath(base_dir or os.environ.get(ARTIFACTS_DIR_ENV_VAR) or DEFAULT_ARTIFACTS_DIR)


class _ArtifactIOManagerFactory(dg.ConfigurableIOManagerFactory):
    base_dir: str | None = Field(
        default=None,
        description=f"Root folder or URL; default ${ARTIFACTS_DIR_ENV_VAR} or '{DEFAULT_ARTIFACTS_DIR}'.",
    )


class NumpyIOManager(_ArtifactIOManagerFactory):
    """Vectors, ids and click graphs as ``.npz`` files."""

    def create_io_manager(self, context: dg.InitResourceContext) -> NumpyArtifactIOManager:
        return NumpyArtifactIOManager(base_path=resolve_base_dir(self.base_dir))


class TorchIOManager(_ArtifactIOManagerFactory):
    """Model checkpoints as ``.pt`` files."""

    def create_io_manager(self, context: dg.InitResourceContext) -> TorchArtifactIOManager:
        return TorchArtifactIOManager(base_path=resolve_base_dir(self.base_dir))
