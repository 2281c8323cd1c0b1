"""Typed artifacts that flow between pipeline steps.

One class per artifact, each with exactly the fields it needs (no free-form extras): a
misspelt field is an ``AttributeError`` at the call site, and a stored field that is
missing is an :class:`ArtifactError` naming it, never a silent default.

Every artifact converts to and from a flat ``dict[str, np.ndarray]`` so it can be stored as
an ``.npz`` file without pickle (``allow_pickle=False`` on load: an artifact can never
execute code). Strings are stored compactly (UTF-8 bytes plus offsets, see
:func:`pack_strings`), so a file costs the total length of its strings, not the longest
string times the row count. Each class registers itself once with :func:`artifact_type`;
the IO layer finds every type, and the codec that stores it, in ``ARTIFACT_TYPES``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from adrec_assets.ml.fields import AdFields, FieldError, FieldSpec

#: Stored in every artifact file; bumped when a stored layout changes, so a file written by
#: an older adrec fails to load with an instruction instead of being misread.
ARTIFACT_FORMAT = "adrec-artifact-v2"
FULL_RETRAIN, WARM_START = "full_retrain", "warm_start"  # what trained an artifact


class ArtifactError(ValueError):
    """An artifact is malformed or two artifacts do not fit together."""


#: type tag -> artifact class, filled by :func:`artifact_type`.
ARTIFACT_TYPES: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def artifact_type(tag: str, codec: str = "npz") -> Callable[[_T], _T]:
    """Class decorator: register an artifact class under ``tag``, stored by ``codec``
    (``npz``: ``to_arrays``/``from_arrays``; ``pt``: ``to_checkpoint``/``from_checkpoint``)."""

    def register(cls: _T) -> _T:
        if tag in ARTIFACT_TYPES and ARTIFACT_TYPES[tag] is not cls:
            raise TypeError(f"artifact type tag {tag!r} is registered twice ({ARTIFACT_TYPES[tag]} and {cls})")
        cls.type_tag = tag
        cls.codec = codec
        ARTIFACT_TYPES[tag] = cls
        return cls

    return register


# ----------------------------------------------------------------------------- strings


def str_array(values: Iterable[Any]) -> np.ndarray:
    """Strings as a numpy object array of ``str``: memory follows each string's own length
    (a fixed-width ``<U`` array would cost the longest string times the row count)."""
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = [v if type(v) is str else str(v) for v in items]
    return out


def isin_ids(values: Iterable[Any], members: Iterable[Any]) -> np.ndarray:
    """``np.isin(values, members)`` for id columns, in linear time. NumPy's ``isin`` compares
    every pair when either side is an object array (as :func:`str_array` makes): 100k ads
    against 100k took 101 s in a blocking check, a hash set takes milliseconds."""
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    wanted = set(members.tolist() if isinstance(members, np.ndarray) else members)
    return np.fromiter((item in wanted for item in items), dtype=bool, count=len(items))


def pack_strings(name: str, values: Iterable[Any]) -> dict[str, np.ndarray]:
    """``{name}__utf8`` (uint8 bytes) and ``{name}__offsets`` (int64, n + 1): a string column
    stored in the length of its text, readable without pickle."""
    column = pa.array(str_array(values).tolist(), type=pa.large_string())
    _validity, offsets, data = column.buffers()
    n = len(column)
    offsets_array = np.frombuffer(offsets, dtype=np.int64, count=n + 1) if n else np.zeros(1, dtype=np.int64)
    end = int(offsets_array[-1])
    data_array = np.frombuffer(data, dtype=np.uint8, count=end) if data is not None and end else np.zeros(0, np.uint8)
    return {f"{name}__utf8": data_array.copy(), f"{name}__offsets": offsets_array.copy()}


def unpack_strings(data: np.ndarray, offsets: np.ndarray, what: str = "strings") -> np.ndarray:
    """Inverse of :func:`pack_strings`: an object array of ``str``."""
    n = len(offsets) - 1
    if n < 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any() or int(offsets[-1]) != len(data):
        raise ArtifactError(f"{what}: string offsets do not match the stored bytes; re-materialize the artifact")
    column = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(np.ascontiguousarray(offsets, dtype=np.int64)), pa.py_buffer(np.ascontiguousarray(data))
    )
    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise ArtifactError(
            f"{what}: stored strings are not valid UTF-8 ({exc}); re-materialize the artifact"
        ) from None
    return str_array(column.to_pylist())


class Fields:
    """Read access to a stored artifact's arrays that names the field and the artifact when one
    is missing: no stored field is ever read back with a silent default."""

    def __init__(self, arrays: Mapping[str, np.ndarray], what: str) -> None:
        self.arrays, self.what = arrays, what

    def array(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise ArtifactError(
                f"{self.what}: stored field {name!r} is missing (found {sorted(self.arrays)}); re-materialize it"
            ) from None

    def text(self, name: str) -> str:
        return str(self.array(name))

    def strings(self, name: str) -> np.ndarray:
        return unpack_strings(self.array(f"{name}__utf8"), self.array(f"{name}__offsets"), f"{self.what}.{name}")

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.text(name))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{self.what}: stored field {name!r} is not valid JSON ({exc})") from None


def _coerce(artifact: object, name: str, value: Any) -> None:
    object.__setattr__(artifact, name, value)  # frozen dataclasses normalize in __post_init__


def _check_aligned(what: str, name: str, values: np.ndarray, n: int) -> None:
    if values.ndim != 1 or len(values) != n:
        raise ArtifactError(f"{what}.{name} needs one entry per row: shape {values.shape} for {n} rows")


def _f32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


# ----------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class TrainingProvenance:
    """How a trained artifact (user vectors, projector) came to be: enough to decide whether a
    later run may reuse it, refine it or must retrain (:func:`adrec_assets.ml.refresh.decide`)."""

    params: Mapping[str, Any]  # the training settings, as ``dataclasses.asdict(params)``
    inputs_fingerprint: str  # content hash of everything it was trained on
    trained_by: str  # FULL_RETRAIN or WARM_START: the last path that actually trained
    warm_started_from: str = ""  # the space it was refined from ("" = trained from scratch)

    def __post_init__(self) -> None:
        if self.trained_by not in (FULL_RETRAIN, WARM_START):
            raise ArtifactError(f"TrainingProvenance.trained_by must be {FULL_RETRAIN!r} or {WARM_START!r}, "
                                f"got {self.trained_by!r}")  # fmt: skip
        _coerce(self, "params", dict(self.params))

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": dict(self.params),
            "inputs_fingerprint": self.inputs_fingerprint,
            "trained_by": self.trained_by,
            "warm_started_from": self.warm_started_from,
        }

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], what: str) -> TrainingProvenance:
        missing = [k for k in ("params", "inputs_fingerprint", "trained_by", "warm_started_from") if k not in stored]
        if missing:
            raise ArtifactError(f"{what}: provenance lacks {missing}; re-materialize it")
        return cls(dict(stored["params"]), str(stored["inputs_fingerprint"]), str(stored["trained_by"]),
                   str(stored["warm_started_from"]))  # fmt: skip

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}": np.asarray(json.dumps(self.to_dict(), sort_keys=True))}

    @classmethod
    def from_fields(cls, fields: Fields, prefix: str) -> TrainingProvenance:
        return cls.from_dict(fields.json(prefix), f"{fields.what}.{prefix}")


# ----------------------------------------------------------------------------- artifacts


class _RowVectors:
    """Shared by the vector artifacts: ``ids`` aligned with the rows of ``vectors``."""

    ids: np.ndarray
    vectors: np.ndarray

    def _check_rows(self, what: str) -> None:
        _coerce(self, "ids", str_array(self.ids))
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.ids):
            raise ArtifactError(
                f"{what} needs (n, d) vectors aligned with n ids; got vectors {self.vectors.shape} "
                f"and {len(self.ids)} ids"
            )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


@artifact_type("ad_catalog")
@dataclass(frozen=True, eq=False)
class AdCatalog:
    """The ads of one click source. The only artifact that may hold ad text.

    Image paths are absolute paths inside ``image_root`` (the source folder): whoever opens an
    image later re-checks that it is still inside that folder at the moment of use.
    """

    ad_ids: np.ndarray  # (n,) str, unique
    texts: np.ndarray  # (n,) str
    image_paths: np.ndarray  # (n,) str, absolute path inside image_root, or "" when the ad has no image
    image_root: str  # absolute folder every image must stay inside ("" when no ad has an image)
    #: structured fields the source declares (``ad_fields.json``) with their cells, one per ad
    fields: AdFields = field(default_factory=AdFields)

    def __post_init__(self) -> None:
        for name in ("ad_ids", "texts", "image_paths"):
            _coerce(self, name, str_array(getattr(self, name)))
        n = len(self.ad_ids)
        if len(self.texts) != n or len(self.image_paths) != n:
            raise ArtifactError(
                f"AdCatalog columns differ in length: ad_ids={n}, texts={len(self.texts)}, "
                f"image_paths={len(self.image_paths)}"
            )
        if len(set(self.ad_ids.tolist())) != n:
            raise ArtifactError("AdCatalog has duplicate ad_ids; every ad needs a unique id")
        prefix = self.image_root.rstrip("/") + "/"
        outside = [p for p in self.image_paths.tolist() if p and (not self.image_root or not p.startswith(prefix))]
        if outside:
            raise ArtifactError(
                f"AdCatalog image paths must lie inside image_root {self.image_root!r}; "
                f"{len(outside)} do not (e.g. {outside[0]!r})"
            )
        try:
            fields = AdFields(self.fields.specs, {k: str_array(v) for k, v in self.fields.cells.items()})
        except FieldError as exc:
            raise ArtifactError(f"AdCatalog: {exc}") from None
        _coerce(self, "fields", fields)
        for name, values in fields.cells.items():
            _check_aligned("AdCatalog", f"field {name!r}", values, n)

    def __len__(self) -> int:
        return len(self.ad_ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            **pack_strings("ad_ids", self.ad_ids),
            **pack_strings("texts", self.texts),
            **pack_strings("image_paths", self.image_paths),
            "image_root": np.asarray(self.image_root),
            "fields": np.asarray(json.dumps([asdict(spec) for spec in self.fields.specs])),
        }
        for i, spec in enumerate(self.fields.specs):
            out.update(pack_strings(f"field_{i}", self.fields.cells[spec.name]))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> AdCatalog:
        f = Fields(arrays, cls.type_tag)
        specs = tuple(FieldSpec(**spec) for spec in f.json("fields"))
        values = {spec.name: f.strings(f"field_{i}") for i, spec in enumerate(specs)}
        return cls(
            f.strings("ad_ids"),
            f.strings("texts"),
            f.strings("image_paths"),
            f.text("image_root"),
            AdFields(specs, values),
        )


@artifact_type("click_graph")
@dataclass(frozen=True, eq=False)
class ClickGraph:
    """Bipartite user x ad click matrix in CSR form (rows = users).

    Users are keyed pseudonyms, never raw identifiers. The user x user co-click graph is
    implied (two users are neighbours when they share an ad) and never materialized: the
    samplers walk user -> ad -> user through these arrays and the CSC view below.
    """

    user_ids: np.ndarray  # (n_users,) str pseudonyms
    ad_ids: np.ndarray  # (n_ads,) str
    indptr: np.ndarray  # (n_users + 1,) int64
    indices: np.ndarray  # (nnz,) int32 ad column per click
    weights: np.ndarray  # (nnz,) float32 click weight (count of clicks or given weight)
    #: fingerprint of the pseudonym key the user ids were made with ("" = not keyed pseudonyms),
    #: so a reader holding another key says so instead of treating every user as new
    key_fingerprint: str = ""

    def __post_init__(self) -> None:
        _coerce(self, "user_ids", str_array(self.user_ids))
        _coerce(self, "ad_ids", str_array(self.ad_ids))
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
            raise ArtifactError("ClickGraph rows must list each ad once, in increasing order; build it with from_pairs")

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

    def keep_clicks(self, keep: np.ndarray) -> ClickGraph:
        """The same graph (every user and ad keeps its row and column) with only the clicks
        where ``keep`` (aligned with ``indices``) is true: the evaluations' training graphs."""
        rows = self.click_users()[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.n_users))]).astype(np.int64)
        return ClickGraph(
            self.user_ids, self.ad_ids, indptr, self.indices[keep], self.weights[keep], self.key_fingerprint
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **pack_strings("user_ids", self.user_ids),
            **pack_strings("ad_ids", self.ad_ids),
            "indptr": self.indptr.astype(np.int64),
            "indices": self.indices.astype(np.int32),
            "weights": self.weights.astype(np.float32),
            "key_fingerprint": np.asarray(self.key_fingerprint),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ClickGraph:
        f = Fields(arrays, cls.type_tag)
        return cls(
            f.strings("user_ids"), f.strings("ad_ids"), f.array("indptr"), f.array("indices"), f.array("weights"),
            f.text("key_fingerprint"),
        )  # fmt: skip

    @classmethod
    def from_pairs(
        cls,
        user_ids: np.ndarray,
        ad_ids: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> ClickGraph:
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
        key_fingerprint: str = "",
    ) -> ClickGraph:
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
            key_fingerprint,
        )


@artifact_type("content_embeddings")
@dataclass(frozen=True, eq=False)
class ContentEmbeddings(_RowVectors):
    """Every ad of a catalogue through the frozen content encoder: (n_ads, 768) unit rows."""

    ids: np.ndarray  # (n,) ad ids
    vectors: np.ndarray  # (n, d) float32 unit rows
    encoder_id: str  # the encoder these vectors come from; never mixed with another's
    has_image: np.ndarray  # (n,) bool: the image half of the vector is set

    def __post_init__(self) -> None:
        self._check_rows("ContentEmbeddings")
        _coerce(self, "has_image", np.asarray(self.has_image, dtype=bool))
        _check_aligned("ContentEmbeddings", "has_image", self.has_image, len(self.ids))

    @property
    def space(self) -> str:
        return f"content:{self.encoder_id}"

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **pack_strings("ids", self.ids),
            "vectors": _f32(self.vectors),
            "encoder_id": np.asarray(self.encoder_id),
            "has_image": self.has_image,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ContentEmbeddings:
        f = Fields(arrays, cls.type_tag)
        return cls(f.strings("ids"), f.array("vectors"), f.text("encoder_id"), f.array("has_image"))


@artifact_type("user_embeddings")
@dataclass(frozen=True, eq=False)
class UserEmbeddings(_RowVectors):
    """One unit vector per user pseudonym, learnt from clicks; ``space`` names this trained
    space (vectors of two spaces are never compared)."""

    ids: np.ndarray  # (n,) user pseudonyms
    vectors: np.ndarray  # (n, d) float32 unit rows
    space: str  # "users:<fingerprint of the vectors>"
    isolated: np.ndarray  # (n,) bool: no co-click neighbour, vector = the global mean
    provenance: TrainingProvenance

    def __post_init__(self) -> None:
        self._check_rows("UserEmbeddings")
        _coerce(self, "isolated", np.asarray(self.isolated, dtype=bool))
        _check_aligned("UserEmbeddings", "isolated", self.isolated, len(self.ids))

    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {pseudonym: row for row, pseudonym in enumerate(self.ids.tolist())}

    def row_of(self, pseudonym: str) -> int | None:
        """Row of a user, ``None`` for a user absent from training (O(1) after the first call)."""
        return self._row_of.get(pseudonym)

    def trained_vectors(self) -> np.ndarray:
        """The vectors of users with a co-click neighbour (what the global mean averages)."""
        return self.vectors if self.isolated.all() else self.vectors[~self.isolated]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **pack_strings("ids", self.ids),
            "vectors": _f32(self.vectors),
            "space": np.asarray(self.space),
            "isolated": self.isolated,
            **self.provenance.to_arrays("provenance"),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> UserEmbeddings:
        f = Fields(arrays, cls.type_tag)
        return cls(
            f.strings("ids"), f.array("vectors"), f.text("space"), f.array("isolated"),
            TrainingProvenance.from_fields(f, "provenance"),
        )  # fmt: skip


@artifact_type("projected_ads")
@dataclass(frozen=True, eq=False)
class ProjectedAds(_RowVectors):
    """Every ad, clicked or not, in a trained user space: score = u . vector + score_bias.
    ``ad_projected`` holds the content projections (unit rows); ``served_ads`` the same ads
    after the ad refit, with the refit's settings in ``refit_params``."""

    ids: np.ndarray  # (n,) ad ids
    vectors: np.ndarray  # (n, d) float32 (unit rows for the projections)
    space: str  # the user space these live in (the projector's)
    encoder_id: str  # the content encoder they were projected from
    score_bias: np.ndarray  # (n,) float32: the content-predicted popularity term
    refit_params: str = ""  # JSON of the AdRefitParams the vectors were refitted with; "" = projections

    def __post_init__(self) -> None:
        self._check_rows("ProjectedAds")
        _coerce(self, "score_bias", np.asarray(self.score_bias, dtype=np.float32))
        _check_aligned("ProjectedAds", "score_bias", self.score_bias, len(self.ids))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            **pack_strings("ids", self.ids),
            "vectors": _f32(self.vectors),
            "space": np.asarray(self.space),
            "encoder_id": np.asarray(self.encoder_id),
            "score_bias": self.score_bias,
            "refit_params": np.asarray(self.refit_params),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ProjectedAds:
        f = Fields(arrays, cls.type_tag)
        return cls(
            f.strings("ids"), f.array("vectors"), f.text("space"), f.text("encoder_id"), f.array("score_bias"),
            f.text("refit_params"),
        )  # fmt: skip


@artifact_type("global_mean")
@dataclass(frozen=True, eq=False)
class GlobalMean:
    """Cold-start prior: the L2-normalized mean of the trained user vectors of ``space``."""

    vector: np.ndarray  # (d,) float32, unit norm
    n_users: int
    mean_norm: float  # norm of the raw mean before normalizing: how concentrated users are
    space: str  # the user space it averages; scoring refuses a prior from another space

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "vector": self.vector.astype(np.float32),
            "n_users": np.asarray(self.n_users),
            "mean_norm": np.asarray(self.mean_norm),
            "space": np.asarray(self.space),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GlobalMean:
        f = Fields(arrays, cls.type_tag)
        return cls(f.array("vector"), int(f.array("n_users")), float(f.array("mean_norm")), f.text("space"))


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
