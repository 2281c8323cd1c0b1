"""Artifact files: encoding, decoding and where a source's artifacts live (plain Python).

The Dagster IO managers, the snapshot store (:mod:`adrec_assets.snapshots`, which decides
where a source's artifacts live), benchmarks and the online service all read and write
artifact files through this module, so there is one file format:

* ``npz`` artifacts (every class of :mod:`adrec_assets.ml.types` and the evaluation report):
  a zip of ``.npy`` arrays with a ``__type__`` tag and the ``__format__`` version, loaded
  with ``allow_pickle=False``, written with fixed timestamps so equal content gives
  byte-identical files;
* ``pt`` artifacts (the trained projector): tensors and primitives only, loaded with
  ``torch.load(weights_only=True)``.

A file written by an older adrec fails to load with a message that names it and says to
re-materialize, never with a ``KeyError`` deep inside.
"""

from __future__ import annotations

import importlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from upath import UPath

from adrec_assets.ml.types import ARTIFACT_FORMAT, ARTIFACT_TYPES, ArtifactError
from adrec_assets.settings import ARTIFACTS_DIR
from adrec_assets.storage import atomic_write

EXTENSIONS = {"npz": ".npz", "pt": ".pt"}
#: The modules that define the artifact types not in :mod:`adrec_assets.ml.types`. One is
#: imported when a file of its type is read, not when this module is: reading a manifest or a
#: click graph pulls in no torch, faiss or statsmodels, and this module, which every layer
#: reads artifacts through, imports no layer above it.
TYPE_MODULES = {
    "projector": "adrec_assets.ml.models",
    "evaluation_report": "adrec_assets.ml.evaluation",
    "experiment_report": "adrec_assets.abtest.report",
    "ad_index": "adrec_assets.online.index.artifact",
    "position_bias": "adrec_assets.online.position_bias",
    "policy_posterior": "adrec_assets.online.posterior",
}


def resolve_root(root: str | os.PathLike[str] | None = None) -> UPath:
    """The artifacts root: ``root``, else ``$ADREC_ARTIFACTS_DIR``, else ``data/artifacts``."""
    return UPath(root or ARTIFACTS_DIR.get())


def artifact_class(tag: str) -> type | None:
    """The class registered under ``tag``, importing its module first if need be."""
    if tag not in ARTIFACT_TYPES and tag in TYPE_MODULES:
        importlib.import_module(TYPE_MODULES[tag])
    return ARTIFACT_TYPES.get(tag)


def type_of(obj: Any) -> type:
    tag = getattr(obj, "type_tag", None)
    if tag not in ARTIFACT_TYPES or not isinstance(obj, ARTIFACT_TYPES[tag]):
        raise TypeError(
            f"not an adrec artifact: {type(obj).__name__} (known types: {sorted({*ARTIFACT_TYPES, *TYPE_MODULES})})"
        )
    return ARTIFACT_TYPES[tag]


def extension_of(obj: Any) -> str:
    return EXTENSIONS[type_of(obj).codec]


def write_npz_reproducibly(handle: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` that ``np.load`` reads, but with fixed zip timestamps: equal arrays give
    byte-identical files (``np.savez`` stamps the write time), so a digest of an artifact
    identifies its content and an unchanged re-materialization changes no byte."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def dump(obj: Any, handle: BinaryIO) -> None:
    """Write an artifact to an open binary file in its type's codec."""
    cls = type_of(obj)
    if cls.codec == "pt":
        import torch

        torch.save(obj.to_checkpoint(), handle)
        return
    arrays = {"__type__": np.asarray(cls.type_tag), "__format__": np.asarray(ARTIFACT_FORMAT), **obj.to_arrays()}
    pickled = [k for k, v in arrays.items() if v.dtype.hasobject]
    if pickled:
        raise TypeError(f"{cls.type_tag}: arrays {pickled} hold Python objects, which would need pickle")
    write_npz_reproducibly(handle, arrays)


def to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    dump(obj, buffer)
    return buffer.getvalue()


def codec_of(path: str | os.PathLike[str]) -> str:
    """The codec an artifact file is stored in, from its extension."""
    suffix = Path(str(path)).suffix
    for codec, extension in EXTENSIONS.items():
        if suffix == extension:
            return codec
    raise ArtifactError(
        f"{path}: not an artifact file (extension {suffix!r}, expected one of {list(EXTENSIONS.values())})"
    )


def load_bytes(data: bytes, origin: str, codec: str) -> Any:
    """Decode an artifact file's bytes; ``origin`` (its path) names it in every error."""
    if codec == "npz":
        return _load_npz(data, origin)
    import torch

    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same instruction
        raise ArtifactError(
            f"{origin}: not a readable artifact ({type(exc).__name__}: {exc}); re-materialize it"
        ) from None
    return artifact_class("projector").from_checkpoint(checkpoint, origin)


def _load_npz(data: bytes, origin: str) -> Any:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{origin}: not a readable .npz artifact ({exc}); re-materialize it") from None
    found = str(arrays.pop("__format__", "adrec-artifact-v1 (unversioned)"))
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{origin}: artifact format {found} was written by an older adrec; this version reads "
            f"{ARTIFACT_FORMAT}: re-materialize the source (make run SOURCE=..., or dagster asset materialize)"
        )
    tag = str(arrays.pop("__type__", ""))
    cls = artifact_class(tag)
    if cls is None:
        raise ArtifactError(f"{origin}: not an adrec artifact (type tag {tag!r}); re-materialize it")
    try:
        return cls.from_arrays(arrays)
    except ArtifactError as exc:
        raise ArtifactError(f"{origin}: {exc}") from None


def write_file(path: str | os.PathLike[str] | UPath, obj: Any) -> None:
    """Atomically (local) or in one put (object stores) write an artifact file."""
    path = UPath(path)
    if path.protocol in ("", "file", "local"):
        atomic_write(Path(path.path), lambda handle: dump(obj, handle))
    else:
        path.write_bytes(to_bytes(obj))


def load_file(path: str | os.PathLike[str] | UPath) -> Any:
    """Read one artifact file (CLI, tests, notebooks, the service)."""
    path = UPath(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize the pipeline for this source first (make run)")
    return load_bytes(path.read_bytes(), str(path), codec_of(path.path))
