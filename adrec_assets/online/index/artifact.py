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
    #: Content hash of what the index was built from (ad ids, rows, space, encoder, build
    #: settings): a later build from the same inputs reuses this index instead (the
    #: ``ad_index`` asset). "" = unknown (never matched).
    inputs_fingerprint: str = ""
    #: Content hash of the queries its ``nprobe`` was tuned on and ``recall_at_10`` measured
    #: on, and the recall target: equal too, the whole artifact is reused as is.
    recall_fingerprint: str = ""

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"index__{key}": value for key, value in self.index.to_arrays().items()},
            "space": np.asarray(self.space),
            "encoder_id": np.asarray(self.encoder_id),
            "recall_at_10": np.asarray(self.recall_at_10),
            "inputs_fingerprint": np.asarray(self.inputs_fingerprint),
            "recall_fingerprint": np.asarray(self.recall_fingerprint),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> IndexedAds:
        fields = Fields(arrays, cls.type_tag)
        index = AdIndex.from_arrays({k[len("index__") :]: v for k, v in arrays.items() if k.startswith("index__")})
        # artifacts written before the fingerprints existed still serve; they are just never reused
        fingerprints = [
            fields.text(name) if name in arrays else "" for name in ("inputs_fingerprint", "recall_fingerprint")
        ]
        return cls(
            index, fields.text("space"), fields.text("encoder_id"), float(fields.array("recall_at_10")), *fingerprints
        )
