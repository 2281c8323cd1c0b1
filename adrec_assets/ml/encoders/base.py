"""The one encoder interface every ad encoder implements.

A batch of ads (text + optional image path) goes in; an ``(n, dim)`` float32 matrix of
L2-normalized rows comes out in the same order. Images that are missing, unreadable,
refused (not a regular file, too large, outside their source folder) never fail the batch:
the ad is encoded from its text alone and the failure is reported in :class:`EncodeResult`
so the caller can log and count it.

Image files are opened through :class:`ImageAccess` only: the checks made when the catalogue
was read (path inside the source folder) are repeated at the moment of use, because the
folder may have changed in between.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

AD_EMBEDDING_DIM = 768
#: Far above any ad creative (web ad images are well under 1 MB, a 24-megapixel JPEG is
#: ~10 MB) while bounding what one decode thread holds in memory.
DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20


class ImageRefused(OSError):
    """An image file that must not be read: not a regular file, larger than the cap, or not
    inside the folder it must stay in (e.g. a symlink swapped in after the catalogue was read)."""


@dataclass(frozen=True)
class ImageAccess:
    """How image files may be read at the moment of use.

    Only regular files are read (a FIFO or a device is refused without blocking), at most
    ``max_bytes`` of them. With ``root`` (the catalogue's ``image_root``), a path must lie
    inside it and is opened one component at a time from ``root`` without following any
    symlink, so a file or folder swapped for a symlink pointing elsewhere is refused; the
    catalogue already stores paths with symlinks resolved. Without ``root`` (paths handed in
    directly, e.g. by a benchmark) symlinks are followed.
    """

    root: str | None = None
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def read(self, path: str) -> bytes:
        """The file's bytes; raises ``FileNotFoundError``, :class:`ImageRefused` or ``OSError``."""
        fd = self._open(str(path))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageRefused(f"{path} is not a regular file")
            if info.st_size > self.max_bytes:
                raise ImageRefused(f"{path} has {info.st_size} bytes, more than the limit of {self.max_bytes}")
            chunks, size = [], 0
            while chunk := os.read(fd, min(1 << 20, self.max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:  # the file grew after fstat
                    raise ImageRefused(f"{path} grew past the limit of {self.max_bytes} bytes while being read")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _open(self, path: str) -> int:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        if self.root is None:
            _require_regular(os.stat(path), path)  # never open a FIFO or a device at all
            return os.open(path, flags)
        prefix = self.root.rstrip("/") + "/"
        parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
        if not parts or any(part in ("", ".", "..") for part in parts):
            raise ImageRefused(f"{path} is not a plain path inside the image folder {self.root}")
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ImageRefused(
                            f"{path}: {part!r} on its path is a symlink or not a folder; images must stay inside "
                            f"{self.root}"
                        ) from None
                    raise
                os.close(dir_fd)
                dir_fd = inner
            before = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(before.st_mode):
                raise ImageRefused(f"{path} is a symlink now (the catalogue stored it resolved); re-read the source")
            _require_regular(before, path)
            try:
                fd = os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ImageRefused(f"{path} became a symlink while being opened") from None
                raise
        finally:
            os.close(dir_fd)
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            raise ImageRefused(f"{path} was replaced while being opened")
        return fd


def _require_regular(info: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ImageRefused(f"{path} is not a regular file")


@dataclass
class EncodeResult:
    vectors: np.ndarray  # (n, dim) float32, unit rows
    has_image: np.ndarray  # (n,) bool: an image contributed to the vector
    image_failures: list[tuple[int, str, str]] = field(default_factory=list)  # (row, path, reason)

    @property
    def n_image_failures(self) -> int:
        return len(self.image_failures)


@runtime_checkable
class AdEncoder(Protocol):
    """Frozen content encoder. ``encoder_id`` names weights + fusion, so vectors from two
    encoders (or two versions of one) are never mixed downstream."""

    encoder_id: str
    dim: int

    def encode(
        self, texts: Sequence[str], image_paths: Sequence[str | None], image_access: ImageAccess | None = None
    ) -> EncodeResult:
        """``image_access`` says how image files may be read (default: :class:`ImageAccess()`)."""
        ...


def load_rgb_image(image: str | BinaryIO, size: int) -> Image.Image:
    """Decode, convert to RGB and resize to ``size x size``; raises on any unreadable file."""
    with Image.open(image) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
        return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def try_load_images(
    image_paths: Sequence[str | None], size: int, access: ImageAccess | None = None
) -> tuple[list[Image.Image | None], list[tuple[int, str, str]]]:
    """Load every image that can be loaded, one after the other; the rest become ``None``
    with a reason (see :func:`load_images_parallel` for the threaded version)."""
    access = access or ImageAccess()
    images: list[Image.Image | None] = []
    failures: list[tuple[int, str, str]] = []
    for row, path in enumerate(image_paths):
        image, reason = _try_load_one(path, size, load_rgb_image, access) if path else (None, None)
        if reason is not None:
            failures.append((row, str(path), reason))
        images.append(image)
    _log_image_failures(failures, image_paths)
    return images, failures


def _log_image_failures(failures: Sequence[tuple[int, str, str]], image_paths: Sequence[str | None]) -> None:
    if failures:
        log.warning(
            "%d of %d images could not be read; those ads are encoded from text only (first: %s: %s)",
            len(failures),
            sum(1 for p in image_paths if p),
            Path(failures[0][1]).name,
            failures[0][2],
        )


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


# --- Parallel image loading -------------------------------------------------------------
# Decoding and resizing are CPU work that PIL does with the GIL released, so a thread pool
# scales with cores. Encoders stream images through it, a bounded window ahead of the model,
# so the accelerator is not left waiting on JPEG decoding and memory stays bounded.

ImageLoader = Callable[[BinaryIO, int], Image.Image]  # (the image file's bytes, size)
ImageFailure = tuple[int, str, str]  # (row, path, reason), as in EncodeResult.image_failures


def load_rgb_center_crop(image: str | BinaryIO, size: int) -> Image.Image:
    """Decode, convert to RGB, scale the shorter side to ``size`` (bicubic) and centre-crop
    to ``size x size``: the CLIP recipe, aspect ratio kept. Done here, off the model's thread,
    a CLIP processor that resizes to the same size finds nothing left to do."""
    with Image.open(image) as img:
        img.draft("RGB", (size, size))  # JPEG: DCT-domain downscale, never below the target
        rgb = img.convert("RGB")
    width, height = rgb.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return rgb.crop((left, top, left + size, top + size))


def default_image_workers() -> int:
    """Decode threads: one per core, capped (beyond ~8 the disk, not the CPU, limits)."""
    return max(1, min(8, os.cpu_count() or 1))


def _try_load_one(
    path: str, size: int, loader: ImageLoader, access: ImageAccess
) -> tuple[Image.Image | None, str | None]:
    """Same failure policy as :func:`try_load_images`: (image, None) or (None, reason)."""
    try:
        data = access.read(path)
    except FileNotFoundError:
        return None, "file not found"
    except ImageRefused as exc:
        return None, f"refused: {exc}"
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL in the path
        return None, f"unreadable image: {exc}"
    try:
        return loader(io.BytesIO(data), size), None
    except UnidentifiedImageError:  # its own message names the in-memory buffer, not the file
        return None, "unreadable image: cannot identify image file (not an image format PIL reads)"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"unreadable image: {exc}"


class ImageStream:
    """Yields ``(row, image or None)`` in input order while a thread pool decodes up to
    ``prefetch`` images ahead. Decoding starts at construction, so work done before the
    first ``next()`` (e.g. encoding the texts) overlaps it. Unreadable images become
    ``None`` and are collected in :attr:`failures` (row order), exactly as
    :func:`try_load_images` reports them. Use as a context manager so the pool is shut
    down even if the consumer stops early."""

    def __init__(
        self,
        image_paths: Sequence[str | None],
        size: int,
        *,
        workers: int | None = None,
        prefetch: int | None = None,
        loader: ImageLoader = load_rgb_image,
        access: ImageAccess | None = None,
    ) -> None:
        self.paths = [str(p) if p else None for p in image_paths]
        self.size = size
        self.loader = loader
        self.access = access or ImageAccess()
        self.workers = workers or default_image_workers()
        self.prefetch = max(1, prefetch or 4 * self.workers)
        self.failures: list[ImageFailure] = []
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="adrec-image")
        self._window: deque[tuple[int, str | None, Future | None]] = deque()
        self._next_row = 0
        self._fill()

    def _fill(self) -> None:
        while self._next_row < len(self.paths) and len(self._window) < self.prefetch:
            path = self.paths[self._next_row]
            future = self._pool.submit(_try_load_one, path, self.size, self.loader, self.access) if path else None
            self._window.append((self._next_row, path, future))
            self._next_row += 1

    def __iter__(self) -> Iterator[tuple[int, Image.Image | None]]:
        try:
            while self._window:
                row, path, future = self._window.popleft()
                self._fill()
                if future is None:
                    yield row, None
                    continue
                image, reason = future.result()
                if reason is not None:
                    self.failures.append((row, str(path), reason))
                yield row, image
        finally:
            self.close()
        _log_image_failures(self.failures, self.paths)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ImageStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_images_parallel(
    image_paths: Sequence[str | None],
    size: int,
    *,
    workers: int | None = None,
    loader: ImageLoader = load_rgb_image,
    access: ImageAccess | None = None,
) -> tuple[list[Image.Image | None], list[ImageFailure]]:
    """Drop-in parallel :func:`try_load_images`: same outputs, same failure reasons."""
    prefetch = len(image_paths) or 1
    with ImageStream(image_paths, size, workers=workers, prefetch=prefetch, loader=loader, access=access) as stream:
        images = [image for _row, image in stream]
    return images, stream.failures
