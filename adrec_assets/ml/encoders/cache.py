"""Content-hash encoding cache: re-materializing ``ad_embeddings_raw`` re-encodes only the ads
whose content (text + image bytes) or encoder changed.

Encoding is by far the slowest part of a re-run, and the encoders are frozen: the same
encoder on the same content gives the same vector, so it can be looked up instead of
recomputed. The key is a sha256 of the text and the image *bytes* (not the path, so moving a
source folder keeps its entries; a new image at the same path misses). Entries are kept per
encoder (one ``.npz`` file each, verified against the full ``encoder_id``), so vectors of two
encoders are never mixed.

The cache is an optimization only: a missing, corrupt or mismatching file is logged and
treated as empty (then overwritten), an entry whose vector is not a finite unit row is
logged, dropped and re-encoded (the file is rewritten without it), and a failed write is
logged, never fatal. Image bytes are read with the same rules as the encoders
(:class:`~adrec_assets.ml.encoders.base.ImageAccess`): regular files only, size-capped,
confined to the catalogue's image folder. Plain Python/numpy (no Dagster), usable from
scripts and benchmarks too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from adrec_assets.ml.encoders.base import DEFAULT_MAX_IMAGE_BYTES, AdEncoder, EncodeResult, ImageAccess
from adrec_assets.storage import atomic_write

try:  # POSIX: serialize read-merge-write of one file across processes (multiprocess executor)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: atomic writes still keep files whole
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

HASH_HEX_LEN = 64  # sha256 hex digest
HASH_DTYPE = np.dtype(f"<U{HASH_HEX_LEN}")
#: Bumped when the hashed content layout changes, so old entries simply stop matching.
_HASH_VERSION = b"adrec-encoding-cache-v1\x00"
_NO_IMAGE = b"no-image"
_MISSING_IMAGE = b"image-missing"  # path given, file absent/unreadable/refused: differs from any bytes
#: A cached vector is served only if its norm is within this of 1 (as ``check_unit_rows``).
UNIT_NORM_TOLERANCE = 1e-4


def _image_part(path: str | None, memo: dict[str, bytes], access: ImageAccess) -> bytes:
    """What an ad's image contributes to its hash: a digest of the file's bytes, or a marker."""
    if not path:
        return _NO_IMAGE
    if path not in memo:
        try:
            memo[path] = b"image-sha256:" + hashlib.sha256(access.read(path)).digest()
        except (OSError, ValueError):  # missing, refused (FIFO, too large, outside the folder), NUL in path
            # Not cached as "this ad has no image": once the file is readable the hash changes.
            memo[path] = _MISSING_IMAGE
    return memo[path]


def content_hashes(
    texts: Sequence[str], image_paths: Sequence[str | None], access: ImageAccess | None = None
) -> np.ndarray:
    """``(n,)`` sha256 hex strings over each ad's text (utf-8) and image file bytes.

    Only content counts: the same bytes under another path hash the same, new bytes under the
    same path hash differently. No image (``None``/``""``) and an unreadable image file get
    distinct markers, so adding or repairing an image changes the hash. Image files are read
    through ``access`` (default :class:`ImageAccess()`: regular files only, size-capped).
    """
    if len(texts) != len(image_paths):
        raise ValueError(f"{len(texts)} texts but {len(image_paths)} image paths")
    access = access or ImageAccess()
    memo: dict[str, bytes] = {}  # ads often share an image file: read it once
    out = np.empty(len(texts), dtype=HASH_DTYPE)
    for row, (text, path) in enumerate(zip(texts, image_paths, strict=True)):
        text_bytes = str(text).encode("utf-8")
        h = hashlib.sha256(_HASH_VERSION)
        h.update(len(text_bytes).to_bytes(8, "little"))  # length prefix: text/image boundary is unambiguous
        h.update(text_bytes)
        h.update(_image_part(str(path) if path else None, memo, access))
        out[row] = h.hexdigest()
    return out


@dataclass(frozen=True)
class CacheLookup:
    """Which of the asked hashes were found, and their stored rows (in the asked order)."""

    hit_mask: np.ndarray  # (n,) bool, aligned with the asked hashes
    vectors: np.ndarray  # (n_hits, dim) float32, rows of the hits in order
    has_image: np.ndarray  # (n_hits,) bool
    n_invalid: int = 0  # stored entries dropped as invalid: the file should be rewritten

    @property
    def n_hits(self) -> int:
        return int(np.count_nonzero(self.hit_mask))


@dataclass(frozen=True)
class _Entries:
    hashes: np.ndarray  # (m,) sorted, unique
    vectors: np.ndarray  # (m, dim) float32, finite unit rows
    has_image: np.ndarray  # (m,) bool
    n_invalid: int = 0  # entries of the file dropped by validation


class EncodingCache:
    """Encoded vectors keyed by :func:`content_hashes`, one ``.npz`` per encoder under ``root``.

    The file name is a short sha256 of ``encoder_id`` (ids may hold any character); the full
    id is stored inside and checked on read, so a (however unlikely) name clash or a copied
    file can never serve another encoder's vectors. Files hold only hashes, vectors and flags
    (no ad text) and are written without pickle.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, encoder_id: str) -> Path:
        return self.root / f"{hashlib.sha256(encoder_id.encode('utf-8')).hexdigest()[:16]}.npz"

    def lookup(self, encoder_id: str, hashes: np.ndarray, dim: int | None = None) -> CacheLookup:
        """Rows stored for ``hashes`` under ``encoder_id``; ``dim`` (when given) must match the
        stored width, else the file is ignored (e.g. an encoder whose output changed size)."""
        hashes = np.asarray(hashes, dtype=HASH_DTYPE)
        entries = self._read(encoder_id, dim)
        n_invalid = entries.n_invalid if entries is not None else 0
        if entries is None or len(entries.hashes) == 0 or len(hashes) == 0:
            width = dim if dim is not None else (entries.vectors.shape[1] if entries is not None else 0)
            return CacheLookup(
                np.zeros(len(hashes), dtype=bool), np.zeros((0, width), np.float32), np.zeros(0, dtype=bool), n_invalid
            )
        pos = np.searchsorted(entries.hashes, hashes)
        pos_clipped = np.minimum(pos, len(entries.hashes) - 1)
        hit = entries.hashes[pos_clipped] == hashes
        rows = pos_clipped[hit]
        return CacheLookup(hit, entries.vectors[rows], entries.has_image[rows], n_invalid)

    def update(self, encoder_id: str, hashes: np.ndarray, vectors: np.ndarray, has_image: np.ndarray) -> Path:
        """Merge rows into ``encoder_id``'s file (re-read under a lock, union by hash, the new
        rows win) and replace it atomically; returns the file's path. Rows that are not finite
        unit vectors are not stored, and invalid entries already in the file are dropped."""
        hashes = np.asarray(hashes, dtype=HASH_DTYPE)
        vectors = np.asarray(vectors, dtype=np.float32)
        has_image = np.asarray(has_image, dtype=bool)
        if vectors.ndim != 2 or not (len(hashes) == len(vectors) == len(has_image)):
            raise ValueError(
                f"update: {len(hashes)} hashes, vectors of shape {vectors.shape}, {len(has_image)} has_image flags"
            )
        valid = _valid_rows(vectors)
        hashes, vectors, has_image = hashes[valid], vectors[valid], has_image[valid]
        path = self.path_for(encoder_id)
        with self._lock(path):
            old = self._read(encoder_id, vectors.shape[1], quiet=True)
            if old is not None and len(old.hashes):
                # New rows first: np.unique keeps the first occurrence, so new values win.
                hashes = np.concatenate([hashes, old.hashes])
                vectors = np.concatenate([vectors, old.vectors])
                has_image = np.concatenate([has_image, old.has_image])
            merged, first = np.unique(hashes, return_index=True)  # sorted: lookups bisect
            arrays = {
                "encoder_id": np.asarray(encoder_id),
                "hashes": merged.astype(HASH_DTYPE),
                "vectors": np.ascontiguousarray(vectors[first], dtype=np.float32),
                "has_image": has_image[first],
            }

            def write(handle: BinaryIO) -> None:
                np.savez(handle, **arrays)  # str/float/bool arrays only: no pickle inside

            atomic_write(path, write)
        return path

    @contextlib.contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        """Exclusive lock on a side file: two runs updating one encoder's cache at once (e.g.
        two partitions in the multiprocess executor) must not drop each other's rows."""
        if fcntl is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self, encoder_id: str, dim: int | None, quiet: bool = False) -> _Entries | None:
        """The stored entries that pass validation, or ``None`` (logged) when there is no usable
        file. Entries whose vector is not a finite unit row are dropped (logged unless ``quiet``)."""
        path = self.path_for(encoder_id)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_id = str(data["encoder_id"])
                hashes = data["hashes"]
                vectors = data["vectors"]
                has_image = data["has_image"]
        except Exception as exc:  # noqa: BLE001 - any unreadable file is just a cold cache
            log.warning(
                "encoding cache %s unreadable (%s: %s); ignoring it, it will be rewritten",
                path,
                type(exc).__name__,
                exc,
            )
            return None
        problem = None
        if stored_id != encoder_id:
            problem = f"holds encoder {stored_id!r}, not {encoder_id!r}"
        elif hashes.ndim != 1 or hashes.dtype != HASH_DTYPE:
            problem = f"hashes of shape {hashes.shape} and dtype {hashes.dtype}"
        elif vectors.ndim != 2 or vectors.dtype != np.float32 or len(vectors) != len(hashes):
            problem = f"vectors of shape {vectors.shape} and dtype {vectors.dtype} for {len(hashes)} hashes"
        elif has_image.shape != hashes.shape or has_image.dtype != bool:
            problem = f"has_image of shape {has_image.shape} and dtype {has_image.dtype}"
        elif dim is not None and vectors.shape[1] != dim:
            problem = f"vectors of dim {vectors.shape[1]}, encoder gives {dim}"
        elif len(hashes) > 1 and not (hashes[1:] > hashes[:-1]).all():
            problem = "hashes not sorted and unique"
        if problem is not None:
            log.warning("encoding cache %s ignored (%s); it will be rewritten", path, problem)
            return None
        valid = _valid_rows(vectors)
        n_invalid = int(len(valid) - np.count_nonzero(valid))
        if n_invalid and not quiet:
            log.warning(
                "encoding cache %s: %d of %d entries are not finite unit vectors (norm 1 +- %g); dropped: those "
                "ads are encoded again and the file is rewritten without them",
                path, n_invalid, len(valid), UNIT_NORM_TOLERANCE,
            )  # fmt: skip
        return _Entries(hashes[valid], vectors[valid], has_image[valid], n_invalid)


def _valid_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows that are finite and of unit norm within :data:`UNIT_NORM_TOLERANCE`."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return np.isfinite(vectors).all(axis=1) & (np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE)


@dataclass(frozen=True)
class CachedEncoding:
    """An :class:`EncodeResult` for every ad, with how it was obtained."""

    result: EncodeResult  # rows in input order; image_failures name input rows
    n_cache_hits: int
    n_encoded: int
    encode_seconds: float  # inside encoder.encode only
    cache_seconds: float  # hashing, lookup and update
    cache_path: Path | None  # the encoder's cache file; None when the cache is off


def encode_with_cache(
    encoder: AdEncoder,
    texts: Sequence[str],
    image_paths: Sequence[str | None],
    cache: EncodingCache | None,
    *,
    image_root: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> CachedEncoding:
    """Encode ``texts``/``image_paths`` with ``encoder``, reusing cached rows of unchanged ads.

    Only the misses go to ``encoder.encode`` (in input order, one call, none if all hit); the
    newly encoded rows are added to the cache, except rows whose image could not be read: those
    are re-encoded every run, so the failure keeps being logged and counted instead of being
    silently served from the cache. ``cache=None`` encodes everything.

    Images (for hashing and for encoding) are read only inside ``image_root`` (the catalogue's
    ``image_root``; ``None`` or ``""``: anywhere) and only up to ``max_image_bytes``; see
    :class:`~adrec_assets.ml.encoders.base.ImageAccess`.
    """
    texts, image_paths = list(texts), list(image_paths)
    n = len(texts)
    access = ImageAccess(image_root or None, max_image_bytes)
    if cache is None:
        started = time.perf_counter()
        result = encoder.encode(texts, image_paths, image_access=access)
        return CachedEncoding(result, 0, n, time.perf_counter() - started, 0.0, None)

    cache_started = time.perf_counter()
    hashes = content_hashes(texts, image_paths, access)
    found = cache.lookup(encoder.encoder_id, hashes, dim=encoder.dim)
    cache_seconds = time.perf_counter() - cache_started
    miss_rows = np.flatnonzero(~found.hit_mask)

    vectors = np.zeros((n, encoder.dim), dtype=np.float32)
    has_image = np.zeros(n, dtype=bool)
    vectors[found.hit_mask] = found.vectors
    has_image[found.hit_mask] = found.has_image
    failures: list[tuple[int, str, str]] = []
    encode_seconds = 0.0
    if len(miss_rows):
        started = time.perf_counter()
        miss_texts, miss_paths = [texts[i] for i in miss_rows], [image_paths[i] for i in miss_rows]
        fresh = encoder.encode(miss_texts, miss_paths, image_access=access)
        encode_seconds = time.perf_counter() - started
        vectors[miss_rows] = fresh.vectors
        has_image[miss_rows] = fresh.has_image
        failures = [(int(miss_rows[row]), path, reason) for row, path, reason in fresh.image_failures]

    cache_started = time.perf_counter()
    keep = np.ones(len(miss_rows), dtype=bool)
    keep[np.isin(miss_rows, [row for row, _path, _reason in failures])] = False
    if keep.any() or found.n_invalid:  # invalid entries: rewrite the file without them
        try:
            cache.update(
                encoder.encoder_id, hashes[miss_rows][keep], vectors[miss_rows][keep], has_image[miss_rows][keep]
            )
        except OSError as exc:  # e.g. read-only or full disk: the vectors are still good
            log.warning("encoding cache %s not updated (%s)", cache.path_for(encoder.encoder_id), exc)
    cache_seconds += time.perf_counter() - cache_started

    return CachedEncoding(
        result=EncodeResult(vectors=vectors, has_image=has_image, image_failures=failures),
        n_cache_hits=found.n_hits,
        n_encoded=len(miss_rows),
        encode_seconds=encode_seconds,
        cache_seconds=cache_seconds,
        cache_path=cache.path_for(encoder.encoder_id),
    )


__all__ = ["CacheLookup", "CachedEncoding", "EncodingCache", "content_hashes", "encode_with_cache"]
