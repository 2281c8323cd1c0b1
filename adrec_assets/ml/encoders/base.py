"""The one encoder interface every ad encoder implements.

A batch of ads (text + optional image path) goes in; an ``(n, dim)`` float32 matrix of
L2-normalized rows comes out in the same order. Images that are missing or unreadable
never fail the batch: the ad is encoded from its text alone and the failure is reported
in :class:`EncodeResult` so the caller can log and count it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

AD_EMBEDDING_DIM = 768


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

    def encode(self, texts: Sequence[str], image_paths: Sequence[str | None]) -> EncodeResult: ...


def load_rgb_image(path: str, size: int) -> Image.Image:
    """Decode, convert to RGB and resize to ``size x size``; raises on any unreadable file."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
        return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def try_load_images(
    image_paths: Sequence[str | None], size: int
) -> tuple[list[Image.Image | None], list[tuple[int, str, str]]]:
    """Load every image that can be loaded; the rest become ``None`` with a reason."""
    images: list[Image.Image | None] = []
    failures: list[tuple[int, str, str]] = []
    for row, path in enumerate(image_paths):
        if not path:
            images.append(None)
            continue
        try:
            images.append(load_rgb_image(path, size))
        except FileNotFoundError:
            failures.append((row, str(path), "file not found"))
            images.append(None)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            failures.append((row, str(path), f"unreadable image: {exc}"))
            images.append(None)
    if failures:
        log.warning(
            "%d of %d images could not be read; those ads are encoded from text only (first: %s: %s)",
            len(failures),
            sum(1 for p in image_paths if p),
            Path(failures[0][1]).name,
            failures[0][2],
        )
    return images, failures


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)
