"""Structured ad fields (category, advertiser, year, price ...) as content beside the encoder's vector.

A text encoder reads "Toy Story (1995). Genres: Adventure, Animation" as words; what it makes
of the year or of a category list is fuzzy, and a linear map from its vector recovers little
of either. Declared fields give the projector those properties exactly: a categorical field
becomes a multi-hot over its vocabulary, a numeric one a one-hot of its quantile bin plus
its standardized value. They are properties of the ad, not of any user, so the privacy promise
holds.

The encoding is *fitted* on a catalogue (vocabularies, bin edges, mean and spread) and then
frozen: the projector stores it, so a brand-new ad's fields are encoded exactly as its
training ads' were. Everything here is plain numpy and JSON (no pickles).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

CATEGORICAL, NUMERIC = "categorical", "numeric"
KINDS = (CATEGORICAL, NUMERIC)
MAX_VALUES = 256  # vocabulary cap per categorical field: the most frequent values
MIN_ADS_PER_VALUE = 2  # a value on one ad only teaches nothing that transfers to a new ad
N_BINS = 10
MAX_FIELD_CHARS = 1000  # a longer cell is refused where ads come in (source files, the service)


class FieldError(ValueError):
    """A field declaration or value that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class FieldSpec:
    """One declared column of a source's ads file.

    ``separator`` (categorical only) splits a cell into several values ("Comedy|Drama").
    """

    name: str
    kind: str
    separator: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FieldError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.separator and self.kind != CATEGORICAL:
            raise FieldError(f"field {self.name!r}: only a categorical field takes a separator")


@dataclass(frozen=True)
class FittedField:
    spec: FieldSpec
    vocabulary: tuple[str, ...] = ()  # categorical: one column per value
    edges: tuple[float, ...] = ()  # numeric: interior quantile edges (len = bins - 1)
    mean: float = 0.0
    std: float = 1.0

    @property
    def width(self) -> int:
        return len(self.vocabulary) if self.spec.kind == CATEGORICAL else len(self.edges) + 2

    def values_of(self, cell: str) -> list[str]:
        cell = cell.strip()
        if not cell:
            return []
        parts = cell.split(self.spec.separator) if self.spec.separator else [cell]
        return [p.strip() for p in parts if p.strip()]


def parse_number(cell: str) -> float | None:
    """A numeric cell as a finite float, or None when empty or not a number."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class FieldEncoder:
    """Fitted encoding of declared fields into ``width`` columns: a categorical field's known
    values share unit length, a numeric field is a one-hot bin plus its z-score (clipped to
    ±3); the whole is multiplied by ``scale`` (the projector's ``field_scale``)."""

    fields: tuple[FittedField, ...] = ()
    scale: float = 1.0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.spec.name for f in self.fields)

    @property
    def width(self) -> int:
        return sum(f.width for f in self.fields)

    def transform(self, columns: Mapping[str, Sequence[str]], n: int) -> np.ndarray:
        """(n, width) float32 from string cells per field; a field absent from ``columns``,
        an empty cell, an unknown category or a non-number leaves its block at zero."""
        out = np.zeros((n, self.width), dtype=np.float32)
        start = 0
        for fitted in self.fields:
            cells = columns.get(fitted.spec.name)
            if cells is not None:
                if len(cells) != n:
                    raise FieldError(f"field {fitted.spec.name!r} has {len(cells)} cells for {n} ads")
                _encode_block(fitted, cells, out[:, start : start + fitted.width])
            start += fitted.width
        return out * np.float32(self.scale)

    def to_json(self) -> str:
        return json.dumps({"scale": self.scale, "fields": [asdict(f) for f in self.fields]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FieldEncoder:
        if not text:
            return cls()
        data = json.loads(text)
        fields = tuple(
            FittedField(
                FieldSpec(**f["spec"]), tuple(f["vocabulary"]), tuple(float(e) for e in f["edges"]),
                float(f["mean"]), float(f["std"]),
            )
            for f in data["fields"]
        )  # fmt: skip
        return cls(fields, float(data["scale"]))


def _encode_block(fitted: FittedField, cells: Sequence[str], block: np.ndarray) -> None:
    if fitted.spec.kind == CATEGORICAL:
        column = {value: i for i, value in enumerate(fitted.vocabulary)}
        for row, cell in enumerate(cells):
            hits = [column[v] for v in fitted.values_of(str(cell)) if v in column]
            if hits:
                block[row, hits] = 1.0 / math.sqrt(len(hits))
        return
    for row, cell in enumerate(cells):
        value = parse_number(str(cell))
        if value is None:
            continue
        block[row, int(np.searchsorted(fitted.edges, value, side="right"))] = 1.0
        block[row, -1] = float(np.clip((value - fitted.mean) / fitted.std, -3.0, 3.0))


def fit_field_encoder(
    specs: Sequence[FieldSpec], columns: Mapping[str, Sequence[str]], scale: float = 1.0
) -> FieldEncoder:
    """Fit vocabularies (values on at least ``MIN_ADS_PER_VALUE`` ads, the ``MAX_VALUES`` most
    frequent) and numeric bins (``N_BINS`` quantiles) on a catalogue's cells."""
    fitted = []
    for spec in specs:
        if spec.name not in columns:
            raise FieldError(
                f"field {spec.name!r} is declared but the ads have no such column; add it or drop the declaration"
            )
        cells = [str(c) for c in columns[spec.name]]
        if spec.kind == CATEGORICAL:
            probe = FittedField(spec)
            counts = Counter(v for cell in cells for v in set(probe.values_of(cell)))
            common = sorted((v for v, c in counts.items() if c >= MIN_ADS_PER_VALUE), key=lambda v: (-counts[v], v))
            fitted.append(FittedField(spec, vocabulary=tuple(common[:MAX_VALUES])))
            continue
        numbers = np.array([v for v in map(parse_number, cells) if v is not None], dtype=np.float64)
        if len(numbers) == 0:
            raise FieldError(
                f"numeric field {spec.name!r} has no number in any ad; fix the column or declare it categorical"
            )
        edges = np.unique(np.quantile(numbers, np.linspace(0, 1, N_BINS + 1)[1:-1]))
        std = float(numbers.std())
        fitted.append(FittedField(spec, edges=tuple(float(e) for e in edges), mean=float(numbers.mean()),
                                  std=std if std > 0 else 1.0))  # fmt: skip
    return FieldEncoder(tuple(fitted), float(scale))


@dataclass(frozen=True)
class AdFields:
    """The declared fields of a set of ads and their cells (name -> one string per ad)."""

    specs: tuple[FieldSpec, ...] = ()
    cells: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        declared = [spec.name for spec in self.specs]
        if sorted(declared) != sorted(self.cells) or len(set(declared)) != len(declared):
            raise FieldError(f"fields declared {declared} but cells given for {sorted(self.cells)}")
        lengths = {len(values) for values in self.cells.values()}
        if len(lengths) > 1:
            raise FieldError(f"field columns differ in length: { {n: len(v) for n, v in self.cells.items()} }")

    def take(self, rows: np.ndarray) -> AdFields:
        """The same fields for the ads at ``rows``."""
        return AdFields(self.specs, {name: values[rows] for name, values in self.cells.items()})

    def fit(self, scale: float) -> FieldEncoder:
        """:func:`fit_field_encoder` on these cells."""
        return fit_field_encoder(self.specs, self.cells, scale)
