"""Validation and byte encodings shared by every backend of the online store.

Nothing is pickled: vectors are raw little-endian float32 bytes, array blobs a JSON header
(dtype, shape, offset) followed by the raw bytes, events and metadata JSON.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adrec_assets.online.store.records import (
    InvalidArraysError,
    InvalidEventError,
    InvalidKeyError,
    InvalidMetaError,
    InvalidVectorError,
    LiveAd,
    StoreFormatError,
)
from adrec_assets.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PATTERN

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TOKEN = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces: user space ids, blob names
_ARRAY_KINDS = "biufcSU"  # numeric, bool and fixed-width strings: all decodable without pickle
_BLOB_MAGIC = b"ADRB"


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidKeyError(
            f"namespace must be a source name of letters, digits, '_', '.', '-' (1-128 chars), got {namespace!r}"
        )
    return namespace


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidKeyError(f"{what} must be 1-256 printable ASCII chars without spaces, got {value!r}")
    return value


def _check_pseudonym(pseudonym: object) -> str:
    if not isinstance(pseudonym, str) or not PSEUDONYM_PATTERN.fullmatch(pseudonym):
        raise InvalidKeyError(
            f"pseudonym must be {PSEUDONYM_HEX_CHARS} lowercase hex chars (pseudonymize(raw_id, key)), got "
            f"{pseudonym!r}; the online store never keys on raw user ids"
        )
    return pseudonym


def _check_ad_id(ad_id: object) -> str:
    if not isinstance(ad_id, str) or not ad_id or "\x00" in ad_id:
        raise InvalidKeyError(f"ad id must be a non-empty str without NUL, got {ad_id!r}")
    return ad_id


def _check_vector(vector: object, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(vector)
    if arr.dtype.kind not in "fiu":
        raise InvalidVectorError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    if arr.shape != (dim,):
        raise InvalidVectorError(f"{what}: expected shape ({dim},), got {arr.shape}")
    arr = np.asarray(arr, dtype="<f4")
    if not np.isfinite(arr).all():
        raise InvalidVectorError(f"{what}: contains NaN or inf (as float32)")
    return arr


def _check_user_record(vector: object, dim: int, limit: int, what: str) -> np.ndarray:
    """A user's record: their ``dim``-d vector, optionally followed by more numbers (a
    posterior, :mod:`adrec_assets.online.user_posterior`), at most ``limit`` in all."""
    arr = np.asarray(vector)
    if arr.ndim == 1 and dim <= len(arr) <= limit:
        return _check_vector(arr, len(arr), what)
    if arr.ndim == 1 and len(arr) > limit:
        raise InvalidVectorError(f"{what}: a user record holds at most {limit} numbers, got {len(arr)}")
    return _check_vector(arr, dim, what)


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _vector_from(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)  # a writable copy


def _check_meta(meta: object, ad_id: str) -> dict[str, str]:
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidMetaError(f"meta of live ad {ad_id!r} must be a dict[str, str], got {meta!r}")
    return dict(meta)


def _event_json(rows: object) -> list[str]:
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise InvalidEventError(f"append_events takes a list of dict rows, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not all(isinstance(k, str) for k in row):
            raise InvalidEventError(f"event row {i} must be a dict with str keys, got {row!r}")
        try:
            out.append(json.dumps(dict(row), allow_nan=False, separators=(",", ":"), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise InvalidEventError(
                f"event row {i} is not JSON-serializable ({exc}); convert numpy values with .item()"
            ) from None
    return out


def _pack(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _BLOB_MAGIC + struct.pack("<I", len(head)) + head + payload


def _unpack(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    if blob[:4] != _BLOB_MAGIC:
        raise StoreFormatError("stored blob lacks the adrec header; it was not written by this module")
    (n,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8 : 8 + n].decode("utf-8")), memoryview(blob)[8 + n :]


def _encode_arrays(name: str, arrays: object) -> bytes:
    if not isinstance(arrays, Mapping):
        raise InvalidArraysError(f"arrays {name!r}: expected a dict[str, np.ndarray], got {type(arrays).__name__}")
    entries, chunks, offset = [], [], 0
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise InvalidArraysError(f"arrays {name!r}: keys must be non-empty str, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in _ARRAY_KINDS:
            raise InvalidArraysError(f"arrays {name!r}[{key!r}]: dtype {arr.dtype} cannot be stored without pickle")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise InvalidArraysError(
                f"arrays {name!r}[{key!r}]: contains NaN or inf; shared model state must be finite"
            )
        data = np.ascontiguousarray(arr).tobytes()
        entries.append(
            {"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    return _pack({"arrays": entries}, b"".join(chunks))


def _decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    header, payload = _unpack(blob)
    out = {}
    for e in header["arrays"]:
        raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
        out[e["key"]] = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
    return out


def _encode_live_ad(vector: np.ndarray, meta: dict[str, str], added_at: float) -> bytes:
    return _pack({"meta": meta, "added_at": added_at}, _vector_bytes(vector))


def _decode_live_ad(ad_id: str, blob: bytes) -> LiveAd:
    header, payload = _unpack(blob)
    return LiveAd(ad_id, _vector_from(bytes(payload)), dict(header["meta"]), float(header["added_at"]))
