"""The ANN ad index the online service searches: FAISS over ``[p_a, b_a]`` rows.

Each ad is stored as the (d+1)-vector ``[p_a, b_a]`` (unit projected ad, additive
``score_bias``) and a query is ``[u, 1]``, so the inner product *is* the product's score
``u . p_a + b_a``; exploration policies may send any (d+1) query (``[theta_u * u, theta_b]``).

One backend per module, over a small shared base (``common.py``: errors, input checks, the
readers-writer lock, slot bookkeeping and the pinned query):

* :class:`AdIndex` (``faiss.py``): ``"flat"`` (exact), ``"hnsw"`` (approximate, with
  tombstones) or ``"ivf"`` (approximate, k-means lists, ``nprobe`` tuned to a measured
  recall), persisted as plain arrays; the module docstring has the design.
* :class:`NumpyIndex` (``numpy.py``): ``"numpy"``, exact brute force in NumPy, built from an
  :class:`AdIndex` at load time (``ADREC_SERVE_INDEX=numpy``); never persisted.

Also :func:`exact_top_k` and :func:`recall_at_k` (``exact.py``: exact search, the reference
results are judged against) and :class:`IndexedAds` (``artifact.py``: the ``ad_index``
artifact).
"""

from __future__ import annotations

from adrec_assets.online.index.artifact import IndexedAds
from adrec_assets.online.index.common import (
    SEARCH_THREADS,
    AdIndexError,
    DuplicateAdIdError,
    IndexStateError,
    InvalidAdError,
    InvalidQueryError,
    UnknownAdError,
)
from adrec_assets.online.index.exact import exact_top_k, recall_at_k
from adrec_assets.online.index.faiss import (
    ANN_KINDS,
    FLAT,
    FORMAT_NAME,
    FORMAT_VERSION,
    HNSW,
    IVF,
    AdIndex,
    ivf_nlist_for,
)
from adrec_assets.online.index.numpy import NUMPY, NumpyIndex

__all__ = [
    "ANN_KINDS",
    "FLAT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HNSW",
    "IVF",
    "NUMPY",
    "SEARCH_THREADS",
    "AdIndex",
    "AdIndexError",
    "DuplicateAdIdError",
    "IndexStateError",
    "IndexedAds",
    "InvalidAdError",
    "InvalidQueryError",
    "NumpyIndex",
    "UnknownAdError",
    "exact_top_k",
    "ivf_nlist_for",
    "recall_at_k",
]
