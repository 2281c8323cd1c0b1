"""Production encoder: Jina CLIP v2 (EVA02-L/14 image tower at 512 px, XLM-RoBERTa-large
text tower; one shared 1024-d space, Matryoshka-trained so the first 768 dims are a
usable embedding on their own).

Weights are **never** fetched at run time: :func:`locate_jina_weights` finds them on
disk (``ADREC_JINA_PATH`` or the local Hugging Face cache) by looking at files only, and
:class:`JinaWeightsMissing` says exactly what to download on a connected machine. That
check imports neither torch nor transformers, so a missing install fails in well under a
second instead of after a model import.

Fusion: ``normalize(text + image)`` when the ad has a readable image, the text vector
otherwise. Both halves are unit vectors of the same CLIP space, but CLIP text and image
embeddings occupy different regions of it (the *modality gap*: a caption and its image
have cosine ~0.3, far from 1). Their sum is therefore dominated by neither modality, but
it is not a point of either distribution either: text-only and image ads form two
shifted clouds. That is acceptable here because nothing compares raw vectors across
modalities; the projector learns its map into the user space on top of whatever
distribution the encoder produces.

Licence: Jina CLIP v2 is CC-BY-NC-4.0 (commercial use needs Jina AI's permission).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adrec_assets.ml.encoders.base import (
    AD_EMBEDDING_DIM,
    EncodeResult,
    ImageAccess,
    ImageStream,
    default_image_workers,
    l2_normalize,
    load_rgb_center_crop,
)
from adrec_assets.settings import JINA_PATH

log = logging.getLogger(__name__)

MODEL_REPO = "jinaai/jina-clip-v2"
IMAGE_SIZE = 512  # the checkpoint's processor: shorter side -> 512, centre crop 512
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
REQUIRED_PACKAGES = ("timm", "torchvision", "einops")  # imported by the remote code

DOWNLOAD_INSTRUCTIONS = f"""\
Model hubs are never contacted at run time. On a machine with internet access:

  pip install -U 'huggingface_hub[cli]'
  huggingface-cli download {MODEL_REPO} --exclude 'onnx/*'      # weights, tokenizer, processor (~1.7 GB)
  huggingface-cli download jinaai/jina-clip-implementation       # the model code its config points to
  huggingface-cli download jinaai/xlm-roberta-flash-implementation   # text-tower code
  huggingface-cli download jinaai/jina-embeddings-v3 --include '*.json' '*.py'   # text-tower config only

then copy that Hugging Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME/hub)
to the same place on this machine; the pipeline finds {MODEL_REPO} there. Or set
{JINA_PATH.name}=/path/to/jina-clip-v2 (a directory holding config.json and
model.safetensors, e.g. the snapshot folder); the three code repositories must still be in
this machine's HF cache, where transformers resolves remote code.
In this environment: pip install -e '.[jina]' (timm, torchvision; einops is a base
dependency); keep transformers<4.52 (pinned in pyproject.toml: the remote code breaks on
newer releases). Licence: CC-BY-NC-4.0 - commercial use needs Jina AI's permission.
Or run without it: ADREC_ENCODER=offline (or auto)."""


class JinaWeightsMissing(RuntimeError):
    """Something Jina CLIP v2 needs locally (weights, remote code, optional packages) is not
    installed. Raised before any model import; the message says what to fetch and where."""


# --- locating the files (no heavy imports) -----------------------------------------------


def hf_hub_cache() -> Path:
    """The hub cache directory, resolved as huggingface_hub does (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def has_weights(folder: Path) -> bool:
    """``config.json`` plus a weights file (single or sharded index); broken cache
    symlinks (interrupted downloads) do not count."""
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)


def _snapshots(repo_id: str, cache: Path) -> list[Path]:
    """Snapshot folders of ``repo_id`` in ``cache``: the one ``refs/main`` names first,
    then the others, newest first."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        found = [main] + [p for p in found if p != main] if main.is_dir() else found
    return found


def _main_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot transformers resolves ``repo_id`` to offline (revision ``main``)."""
    ref = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    if not ref.is_file():
        return None
    snap = ref.parent.parent / "snapshots" / ref.read_text().strip()
    return snap if snap.is_dir() else None


def locate_jina_weights(path: str | None) -> Path | None:
    """The directory to load Jina CLIP v2 from, or ``None``. Looks at files only.

    ``path`` (resource config) or ``$ADREC_JINA_PATH`` when given: that directory and
    nothing else (an explicit location that is wrong should be reported, not silently
    replaced). Otherwise the local HF cache snapshot(s) of ``jinaai/jina-clip-v2``.
    """
    explicit = path or JINA_PATH.get()
    if explicit:
        folder = Path(explicit).expanduser()
        return folder.resolve() if folder.is_dir() and has_weights(folder) else None
    for snap in _snapshots(MODEL_REPO, hf_hub_cache()):
        if has_weights(snap):
            return snap
    return None


def _auto_map_modules(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(repo_id, module file)`` pairs a config's ``auto_map`` loads code from; repo_id is
    ``''`` for code that sits beside the config (a ``save_pretrained`` folder)."""
    needs = []
    for ref in (config.get("auto_map") or {}).values():
        ref = ref[0] if isinstance(ref, list) else ref
        if isinstance(ref, str):
            repo, sep, cls_ref = ref.rpartition("--")
            needs.append((repo if sep else "", cls_ref.rsplit(".", 1)[0] + ".py"))
    return needs


def _missing_code(weights_dir: Path, cache: Path) -> list[str]:
    """Remote-code files transformers will look for offline, read from ``config.json`` (and
    the text tower's nested config), so the check follows the revision actually downloaded."""
    try:
        config = json.loads((weights_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"a readable config.json in {weights_dir} ({exc})"]
    missing = []
    needs = _auto_map_modules(config)
    text_repo = (config.get("text_config") or {}).get("hf_model_name_or_path")
    if isinstance(text_repo, str) and "/" in text_repo and not Path(text_repo).is_dir():
        snap = _main_snapshot(text_repo, cache)
        if snap is None or not (snap / "config.json").is_file():
            missing.append(f"text-tower config {text_repo} (config.json) in HF cache {cache}")
        else:
            try:
                needs += _auto_map_modules(json.loads((snap / "config.json").read_text()))
            except (OSError, ValueError):
                pass
    for repo, module in dict.fromkeys(needs):
        if not repo:
            if not (weights_dir / module).is_file():
                missing.append(f"remote code {module} in {weights_dir}")
        else:
            snap = _main_snapshot(repo, cache)
            if snap is None or not (snap / module).is_file():
                missing.append(f"remote code {repo} ({module}) in HF cache {cache}")
    return missing


@dataclass(frozen=True)
class JinaAvailability:
    """Files-only verdict: where the weights are and what else is missing."""

    weights_dir: Path | None
    searched: str  # where the weights were looked for, for messages
    missing_packages: tuple[str, ...] = ()
    missing_code: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.weights_dir is not None and not self.missing_packages and not self.missing_code

    @property
    def missing(self) -> list[str]:
        weights = [] if self.weights_dir else [f"weights: no config.json + model.safetensors in {self.searched}"]
        packages = [f"python package {p!r} (pip install -e '.[jina]')" for p in self.missing_packages]
        return weights + packages + list(self.missing_code)


def check_jina_available(path: str | None = None) -> JinaAvailability:
    """Everything a local load needs, checked by looking at files and import specs only
    (no torch/transformers import): used by ``auto`` selection and before loading."""
    explicit = path or JINA_PATH.get()
    cache = hf_hub_cache()
    searched = f"{explicit} (resource config / ${JINA_PATH.name})" if explicit else f"HF cache {cache} ({MODEL_REPO})"
    weights_dir = locate_jina_weights(path)
    return JinaAvailability(
        weights_dir=weights_dir,
        searched=searched,
        missing_packages=tuple(p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None),
        missing_code=tuple(_missing_code(weights_dir, cache)) if weights_dir else (),
    )


def missing_message(availability: JinaAvailability) -> str:
    lines = "\n".join(f"  - {m}" for m in availability.missing)
    return f"Jina CLIP v2 cannot be loaded from local files; missing:\n{lines}\n\n{DOWNLOAD_INSTRUCTIONS}"


# --- the encoder ------------------------------------------------------------------------


def pick_device(device: str = "auto") -> tuple[str, Any]:
    """(device, dtype): CUDA in bf16 (fp16 where bf16 is unsupported), else CPU in fp32
    (half precision on CPU is slow and the checkpoint's F16 weights would otherwise stay F16)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_jina_model(weights_dir: Path, device: str = "auto") -> Any:
    """``AutoModel.from_pretrained(dir, trust_remote_code=True, local_files_only=True)``
    in the device's dtype. Transformers errors about missing cached code or packages are
    re-raised as :class:`JinaWeightsMissing` with the download instructions."""
    # Belt and braces: nested remote-code loads (the text tower's config) do not pass
    # local_files_only; offline mode makes them read the cache instead of the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    device, dtype = pick_device(device)
    try:
        model = AutoModel.from_pretrained(
            str(weights_dir), trust_remote_code=True, local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ImportError) as exc:
        raise JinaWeightsMissing(
            f"Loading Jina CLIP v2 from {weights_dir} failed: {exc}\n\n{DOWNLOAD_INSTRUCTIONS}"
        ) from exc
    return model.to(device).eval()


class JinaClipV2Encoder:
    """Jina CLIP v2 truncated to 768 dims (Matryoshka), text + image fused by a normalized sum.

    ``model`` may be injected (anything with ``encode_text`` / ``encode_image`` in the
    Jina signature); otherwise it is loaded from local files only.
    """

    encoder_id = "jina-clip-v2:truncate768:v1"
    dim = AD_EMBEDDING_DIM
    selection_reason = ""  # set by build_encoder: why this encoder was chosen

    def __init__(
        self,
        model: Any | None = None,
        *,
        path: str | None = None,
        batch_size: int = 64,
        image_batch_size: int | None = None,
        max_tokens: int = 512,
        device: str = "auto",
        image_workers: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.image_batch_size = image_batch_size or batch_size
        self.max_tokens = max_tokens
        self.image_workers = image_workers or default_image_workers()
        self.weights_dir: Path | None = None
        self.revision: str | None = None
        if model is None:
            availability = check_jina_available(path)
            if availability.weights_dir is None or availability.missing_packages:
                raise JinaWeightsMissing(missing_message(availability))
            if availability.missing_code:  # warn only: the file check may not fit every revision
                log.warning("Jina CLIP v2 may fail to load: %s", "; ".join(availability.missing_code))
            self.weights_dir = availability.weights_dir
            parent = self.weights_dir.parent
            self.revision = self.weights_dir.name if parent.name == "snapshots" else None
            start = time.perf_counter()
            model = load_jina_model(self.weights_dir, device)
            log.info(
                "Jina CLIP v2 loaded from %s (revision %s) on %s, %s, in %.1f s",
                self.weights_dir,
                self.revision or "unknown",
                model.device,
                model.dtype,
                time.perf_counter() - start,
            )
        self.model = model

    def _unit_rows(self, out: Any, n: int, what: str) -> np.ndarray:
        """Model output -> (n, 768) float32 unit rows; a wider output is cut to its
        Matryoshka prefix (what ``truncate_dim`` asks for) and renormalized."""
        vecs = np.asarray(out, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != n or vecs.shape[1] < self.dim:
            raise ValueError(f"Jina CLIP v2 {what}: expected ({n}, >={self.dim}) output, got {vecs.shape}")
        return l2_normalize(vecs[:, : self.dim])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 768) unit rows; batches sorted by length so padding stays small, order restored."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = [texts[i] for i in rows]
            emb = self.model.encode_text(
                batch,
                batch_size=len(batch),
                truncate_dim=self.dim,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
                max_length=self.max_tokens,
            )
            out[rows] = self._unit_rows(emb, len(batch), "encode_text")
        return out

    def encode_pil_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 768) unit rows from decoded PIL images (never paths or URLs: the model's
        own loader would open them itself, or fetch them over the network)."""
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("encode_pil_images takes PIL images only")
        emb = self.model.encode_image(
            list(images),
            batch_size=len(images),
            truncate_dim=self.dim,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return self._unit_rows(emb, len(images), "encode_image")

    def encode(
        self, texts: Sequence[str], image_paths: Sequence[str | None], image_access: ImageAccess | None = None
    ) -> EncodeResult:
        if len(texts) != len(image_paths):
            raise ValueError(f"encode() got {len(texts)} texts but {len(image_paths)} image paths")
        texts = [str(t) for t in texts]
        n = len(texts)
        image_vecs = np.zeros((n, self.dim), dtype=np.float32)
        has_image = np.zeros(n, dtype=bool)
        # Images decode in threads from here on, overlapping the text forward passes.
        with ImageStream(
            image_paths,
            IMAGE_SIZE,
            workers=self.image_workers,
            prefetch=2 * self.image_batch_size,
            loader=load_rgb_center_crop,
            access=image_access,
        ) as stream:
            text_vecs = self.encode_texts(texts)
            rows: list[int] = []
            batch: list[Image.Image] = []
            for row, image in stream:
                if image is None:
                    continue
                rows.append(row)
                batch.append(image)
                if len(batch) == self.image_batch_size:
                    image_vecs[rows] = self.encode_pil_images(batch)
                    has_image[rows] = True
                    rows, batch = [], []
            if batch:
                image_vecs[rows] = self.encode_pil_images(batch)
                has_image[rows] = True
        fused = np.where(has_image[:, None], text_vecs + image_vecs, text_vecs)
        return EncodeResult(vectors=l2_normalize(fused), has_image=has_image, image_failures=stream.failures)
