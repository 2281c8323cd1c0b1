"""Typed artifacts that flow between pipeline steps.

Each artifact converts to and from a flat ``dict[str, np.ndarray]`` so it can be stored as
an ``.npz`` file without pickle (``allow_pickle=False`` on load: an artifact can never
execute code). ``ARTIFACT_TYPES`` maps the stored ``__type__`` tag back to the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np


class ArtifactError(ValueError):
    """An artifact is malformed or two artifacts do not fit together."""


class ArrayArtifact(Protocol):
    type_tag: ClassVar[str]

    def to_arrays(self) -> dict[str, np.ndarray]: ...

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ArrayArtifact": ...


def _str_array(values) -> np.ndarray:
    """Fixed-width unicode array: storable in npz without pickle."""
    arr = np.asarray(list(values), dtype=str)
    return arr if arr.size else np.zeros(0, dtype="<U1")


@dataclass(frozen=True)
class AdCatalog:
    """The ads of one click source. The only artifact that may hold ad text."""

    type_tag: ClassVar[str] = "ad_catalog"
    ad_ids: np.ndarray  # (n,) str, unique
    texts: np.ndarray  # (n,) str
    image_paths: np.ndarray  # (n,) str, absolute path or "" when the ad has no image

    def __post_init__(self) -> None:
        n = len(self.ad_ids)
        if len(self.texts) != n or len(self.image_paths) != n:
            raise ArtifactError(
                f"AdCatalog columns differ in length: ad_ids={n}, texts={len(self.texts)}, "
                f"image_paths={len(self.image_paths)}"
            )
        if len(np.unique(self.ad_ids)) != n:
            raise ArtifactError("AdCatalog has duplicate ad_ids; every ad needs a unique id")

    def __len__(self) -> int:
        return len(self.ad_ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "ad_ids": _str_array(self.ad_ids),
            "texts": _str_array(self.texts),
            "image_paths": _str_array(self.image_paths),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "AdCatalog":
        return cls(arrays["ad_ids"], arrays["texts"], arrays["image_paths"])


@dataclass(frozen=True)
class ClickGraph:
    """Bipartite user x ad click matrix in CSR form (rows = users).

    Users are keyed pseudonyms, never raw identifiers. The user x user co-click graph is
    implied (two users are neighbours when they share an ad) and never materialized: the
    samplers walk user -> ad -> user through these arrays and the CSC view below.
    """

    type_tag: ClassVar[str] = "click_graph"
    user_ids: np.ndarray  # (n_users,) str pseudonyms
    ad_ids: np.ndarray  # (n_ads,) str
    indptr: np.ndarray  # (n_users + 1,) int64
    indices: np.ndarray  # (nnz,) int32 ad column per click
    weights: np.ndarray  # (nnz,) float32 click weight (count of clicks or given weight)

    def __post_init__(self) -> None:
        if len(self.indptr) != len(self.user_ids) + 1:
            raise ArtifactError("ClickGraph.indptr must have n_users + 1 entries")
        if len(self.indices) != len(self.weights) or int(self.indptr[-1]) != len(self.indices):
            raise ArtifactError("ClickGraph.indices/weights do not match indptr")
        if len(self.indptr) and (self.indptr[0] != 0 or (np.diff(self.indptr) < 0).any()):
            raise ArtifactError("ClickGraph.indptr must start at 0 and never decrease")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(self.ad_ids)):
            raise ArtifactError("ClickGraph.indices point outside ad_ids")
        # Within a user's row, ad columns strictly increase: no (user, ad) pair twice.
        step = np.diff(self.indices.astype(np.int64))
        row_start = np.zeros(len(self.indices), dtype=bool)
        row_start[self.indptr[:-1][np.diff(self.indptr) > 0]] = True
        if (step[~row_start[1:]] <= 0).any():
            raise ArtifactError(
                "ClickGraph rows must list each ad once, in increasing order; build it with from_pairs"
            )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_ads(self) -> int:
        return len(self.ad_ids)

    @property
    def n_clicks(self) -> int:
        return len(self.indices)

    def click_users(self) -> np.ndarray:
        """Row (user) index of every stored click, aligned with ``indices``."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.indptr))

    def csc(self) -> tuple[np.ndarray, np.ndarray]:
        """(ad_indptr, user_indices): for each ad, the users who clicked it."""
        order = np.argsort(self.indices, kind="stable")
        users = self.click_users()[order]
        counts = np.bincount(self.indices, minlength=self.n_ads)
        ad_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return ad_indptr, users

    def ad_degrees(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.n_ads)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_ids": _str_array(self.user_ids),
            "ad_ids": _str_array(self.ad_ids),
            "indptr": self.indptr.astype(np.int64),
            "indices": self.indices.astype(np.int32),
            "weights": self.weights.astype(np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ClickGraph":
        return cls(
            arrays["user_ids"], arrays["ad_ids"], arrays["indptr"], arrays["indices"], arrays["weights"]
        )

    @classmethod
    def from_pairs(
        cls,
        user_ids: np.ndarray,
        ad_ids: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> "ClickGraph":
        """Build from click rows of string ids; see :meth:`from_codes`."""
        uniq_users, u = np.unique(np.asarray(user_ids, dtype=str), return_inverse=True)
        uniq_ads, a = np.unique(np.asarray(ad_ids, dtype=str), return_inverse=True)
        return cls.from_codes(uniq_users, u, uniq_ads, a, weights)

    @classmethod
    def from_codes(
        cls,
        user_vocab: np.ndarray,
        user_codes: np.ndarray,
        ad_vocab: np.ndarray,
        ad_codes: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> "ClickGraph":
        """Build from integer-coded clicks; repeated (user, ad) clicks add up their weights.

        Only users and ads that have a click appear, both sorted by id, so the same clicks
        always give the same graph whatever order they were read in. Integer work only:
        memory is O(clicks), never O(users x ads).
        """
        user_codes = np.asarray(user_codes, dtype=np.int64)
        ad_codes = np.asarray(ad_codes, dtype=np.int64)
        if weights is None:
            weights = np.ones(len(user_codes), dtype=np.float32)
        # Re-code so rows/columns follow sorted ids and only clicked ones remain.
        used_users = np.unique(user_codes)
        used_users = used_users[np.argsort(np.asarray(user_vocab)[used_users], kind="stable")]
        user_rank = np.empty(len(user_vocab), dtype=np.int64)
        user_rank[used_users] = np.arange(len(used_users))
        used_ads = np.unique(ad_codes)
        used_ads = used_ads[np.argsort(np.asarray(ad_vocab)[used_ads], kind="stable")]
        ad_rank = np.empty(len(ad_vocab), dtype=np.int64)
        ad_rank[used_ads] = np.arange(len(used_ads))
        n_ads = max(len(used_ads), 1)
        key = user_rank[user_codes] * n_ads + ad_rank[ad_codes]
        uniq_key, inv = np.unique(key, return_inverse=True)
        summed = np.bincount(inv, weights=np.asarray(weights, dtype=np.float64)).astype(np.float32)
        rows = uniq_key // n_ads
        cols = (uniq_key % n_ads).astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(used_users)))])
        return cls(
            np.asarray(user_vocab)[used_users],
            np.asarray(ad_vocab)[used_ads],
            indptr.astype(np.int64),
            cols,
            summed,
        )


@dataclass(frozen=True)
class Embeddings:
    """Row-aligned vectors with their ids and the provenance needed to combine them safely."""

    type_tag: ClassVar[str] = "embeddings"
    ids: np.ndarray  # (n,) str
    vectors: np.ndarray  # (n, d) float32
    space: str  # e.g. "encoder:<encoder_id>" or "users:<run tag>"
    encoder_id: str = ""  # encoder whose content vectors this derives from ("" if none)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.ids):
            raise ArtifactError(
                f"Embeddings need (n, d) vectors aligned with n ids; got vectors {self.vectors.shape} "
                f"and {len(self.ids)} ids"
            )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "ids": _str_array(self.ids),
            "vectors": np.ascontiguousarray(self.vectors, dtype=np.float32),
            "space": np.asarray(self.space),
            "encoder_id": np.asarray(self.encoder_id),
        }
        out.update({f"extra__{k}": v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Embeddings":
        extra = {k[len("extra__"):]: v for k, v in arrays.items() if k.startswith("extra__")}
        return cls(
            ids=arrays["ids"],
            vectors=arrays["vectors"],
            space=str(arrays["space"]),
            encoder_id=str(arrays["encoder_id"]),
            extra=extra,
        )


@dataclass(frozen=True)
class GlobalMean:
    """Cold-start prior: the L2-normalized mean of the trained user vectors."""

    type_tag: ClassVar[str] = "global_mean"
    vector: np.ndarray  # (d,) float32, unit norm
    n_users: int
    mean_norm: float  # norm of the raw mean before normalizing: how concentrated users are

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "vector": self.vector.astype(np.float32),
            "n_users": np.asarray(self.n_users),
            "mean_norm": np.asarray(self.mean_norm),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "GlobalMean":
        return cls(arrays["vector"], int(arrays["n_users"]), float(arrays["mean_norm"]))


ARTIFACT_TYPES: dict[str, type] = {
    t.type_tag: t for t in (AdCatalog, ClickGraph, Embeddings, GlobalMean)
}


def check_unit_rows(vectors: np.ndarray, what: str, dim: int | None = None, tol: float = 1e-4) -> None:
    """Raise if ``vectors`` has NaN/inf, a wrong width, or rows whose norm is not 1 +- tol.

    Called before an embedding artifact is written, so a bad training run fails loudly
    and the previous good file stays in place.
    """
    if vectors.ndim != 2:
        raise ArtifactError(f"{what}: expected a 2-d matrix, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ArtifactError(f"{what}: expected {dim} columns, got {vectors.shape[1]}")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ArtifactError(
            f"{what}: {len(bad)} rows contain NaN or inf (first row {int(bad[0])}); "
            "check the inputs and the learning rate, then re-materialize"
        )
    norms = np.linalg.norm(vectors, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > tol)
    if len(off):
        raise ArtifactError(
            f"{what}: {len(off)} rows are not unit length (row {int(off[0])} has norm {norms[off[0]]:.6f})"
        )


def vectors_fingerprint(vectors: np.ndarray) -> str:
    """Short content hash identifying one trained vector space."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]


def align_rows(source_ids: np.ndarray, target_ids: np.ndarray, what: str) -> np.ndarray:
    """Row index into ``source_ids`` for each of ``target_ids``; raises naming missing ids."""
    index = {str(i): r for r, i in enumerate(source_ids)}
    rows = np.fromiter((index.get(str(t), -1) for t in target_ids), dtype=np.int64, count=len(target_ids))
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        examples = ", ".join(str(target_ids[m]) for m in missing[:5])
        raise ArtifactError(f"{what}: {len(missing)} ids have no row (e.g. {examples})")
    return rows
