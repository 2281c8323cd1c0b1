"""The ``ad_index`` artifact: :class:`IndexedAds`, a snapshot's :class:`AdIndex` with the
user space and encoder it was built for and its measured recall@10."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from adrec_assets.ml.types import Fields, artifact_type
from adrec_assets.online.index.faiss import AdIndex


@artifact_type("ad_index")
@dataclass(eq=False)
class IndexedAds:
    """The ``ad_index`` artifact: the searchable index of a snapshot's projected ads, with the
    user space and encoder it was built for (never searched with vectors of another space)
    and the recall@10 it measured against exact search on real users when it was built."""

    index: AdIndex
    space: str
    encoder_id: str
    recall_at_10: float

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"index__{key}": value for key, value in self.index.to_arrays().items()},
            "space": np.asarray(self.space),
            "encoder_id": np.asarray(self.encoder_id),
            "recall_at_10": np.asarray(self.recall_at_10),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> IndexedAds:
        fields = Fields(arrays, cls.type_tag)
        index = AdIndex.from_arrays({k[len("index__") :]: v for k, v in arrays.items() if k.startswith("index__")})
        return cls(index, fields.text("space"), fields.text("encoder_id"), float(fields.array("recall_at_10")))
