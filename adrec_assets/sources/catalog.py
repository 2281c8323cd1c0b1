"""The built-in sample ad catalogue shipped in ``data/catalog/`` (220 ads, 10 categories).

``category`` is ground truth for the synthetic click generator and its quality tests; it
is not part of the :class:`AdCatalog` artifact, which holds only id, text and image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adrec_assets.ml.types import AdCatalog, str_array
from adrec_assets.settings import DATA_DIR


def data_dir() -> Path:
    """``$ADREC_DATA_DIR`` or the repository's ``data/`` folder."""
    return DATA_DIR.get()


@dataclass(frozen=True)
class LabelledCatalog:
    catalog: AdCatalog
    categories: np.ndarray  # (n,) object array of str, aligned with catalog.ad_ids


def load_builtin_catalog(catalog_dir: Path | None = None) -> LabelledCatalog:
    catalog_dir = catalog_dir or data_dir() / "catalog"
    csv_path = catalog_dir / "ads.csv"
    if not csv_path.exists():
        raise FileNotFoundError(
            f"Built-in ad catalogue {csv_path} is missing; restore data/catalog/ from git "
            f"or point {DATA_DIR.name} at a data folder that has catalog/ads.csv"
        )
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = {"ad_id", "category", "text", "image"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path} lacks columns {sorted(missing)}")
    images = [str((catalog_dir / p).resolve()) if p else "" for p in frame["image"]]
    catalog = AdCatalog(
        ad_ids=str_array(frame["ad_id"]),
        texts=str_array(frame["text"]),
        image_paths=str_array(images),
        image_root=str(catalog_dir.resolve()),
    )
    return LabelledCatalog(catalog=catalog, categories=str_array(frame["category"]))
