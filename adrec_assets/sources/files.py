"""File click sources: a team drops a folder, the pipeline picks it up (no Dagster here).

Layout of one source, ``<root>/<source>/``::

    ads.csv | ads.parquet | ads.jsonl   ad_id (string), text (string), optional image
                                        (path relative to the source folder)
    clicks/*.csv | clicks/*.parquet     user_id, ad_id, optional timestamp, optional weight

Every problem is reported as a :class:`SourceError` that names the source, the file, the
row (line numbers count the header as line 1) and what to do. Policies:

* clicks naming an ad that is not in the ads file are dropped and counted; the read fails
  when they exceed ``max_unknown_ad_share`` of a source's clicks;
* an image path that is absolute or resolves outside the source folder (``..``, symlinks)
  is refused; a missing or corrupt image file is not an error here: the encoder falls back
  to text and counts it;
* click files are read in chunks of ``chunk_rows`` rows and kept as integer codes, so
  memory grows with the number of clicks and distinct ids, not with file size.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adrec_assets.ml.types import AdCatalog
from adrec_assets.sources import ClickReadReport, RawClicks

ADS_FILENAMES = ("ads.csv", "ads.parquet", "ads.jsonl")
CLICKS_DIRNAME = "clicks"
CLICK_SUFFIXES = (".csv", ".parquet")
AD_COLUMNS = ("ad_id", "text")
CLICK_COLUMNS = ("user_id", "ad_id")
DEFAULT_CHUNK_ROWS = 500_000
DEFAULT_MAX_UNKNOWN_AD_SHARE = 0.05


class SourceError(ValueError):
    """Bad input in a click source; the message says where and how to fix it."""


@dataclass(frozen=True)
class FileSource:
    """A source folder ``<root>/<name>/`` in the format above."""

    folder: Path
    name: str
    max_unknown_ad_share: float = DEFAULT_MAX_UNKNOWN_AD_SHARE
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def read_ads(self) -> AdCatalog:
        return read_ads(self.folder, self.name)

    def read_clicks(self, ad_ids: np.ndarray) -> tuple[RawClicks, ClickReadReport]:
        return read_clicks(self.folder, ad_ids, self.name, self.max_unknown_ad_share, self.chunk_rows)


# ----------------------------------------------------------------------------- discovery


def ads_file(source_dir: Path) -> Path:
    found = [source_dir / name for name in ADS_FILENAMES if (source_dir / name).is_file()]
    if not found:
        raise SourceError(
            f"source {source_dir.name!r}: no ads file in {source_dir}; add one of {', '.join(ADS_FILENAMES)}"
        )
    if len(found) > 1:
        raise SourceError(
            f"source {source_dir.name!r}: several ads files ({', '.join(p.name for p in found)}); keep exactly one"
        )
    return found[0]


def click_files(source_dir: Path) -> list[Path]:
    folder = source_dir / CLICKS_DIRNAME
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CLICK_SUFFIXES and not p.name.startswith("."))


def list_sources(root: Path) -> list[str]:
    """Names of the folders under ``root`` that look like sources (have an ads file)."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / n).is_file() for n in ADS_FILENAMES)
    )


def source_fingerprint(source_dir: Path) -> str:
    """Changes whenever an ads or click file is added, removed, or rewritten (size/mtime)."""
    entries = []
    for path in [*(source_dir / n for n in ADS_FILENAMES), *click_files(source_dir)]:
        if path.is_file():
            stat = path.stat()
            entries.append(f"{path.relative_to(source_dir)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- low-level readers


def _where(source: str, path: Path) -> str:
    return f"source {source!r}, file {path}"


def _first_bad_utf8_line(path: Path) -> int:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return -1


def _check_columns(columns: list[str], required: tuple[str, ...], where: str, expected: str) -> None:
    missing = [c for c in required if c not in columns]
    if not missing:
        return
    hints = []
    normalized = {c.strip().lower().replace(" ", "_").replace("-", "_"): c for c in columns}
    for name in missing:
        near = normalized.get(name) or normalized.get(name.replace("_", ""))
        if near is not None:
            hints.append(f"rename column {near!r} to {name!r} (names are case- and space-sensitive)")
    hint = "; ".join(hints) if hints else f"expected columns {expected}"
    raise SourceError(f"{where}: missing column(s) {missing}; found {columns}. Fix: {hint}")


def _refuse_repeated_columns(names: list[str], where: str, what: str) -> None:
    """A column named twice is ambiguous (pandas would silently read it as 'name.1')."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SourceError(
            f"{where}: the {what} names column(s) {repeated} more than once ({names}); keep one column of each name"
        )


def _csv_chunks(path: Path, where: str, chunk_rows: int) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """(line numbers, frame of strings) per chunk; empty cells are ''. Blank lines are
    skipped but still counted, and a quoted field spanning several lines advances the count
    by its line breaks, so each row's number is the editor line where the row starts."""
    if path.stat().st_size == 0:
        raise SourceError(f"{where}: the file is empty; write a header row and data, or remove it")
    try:
        # pandas renames a repeated column to "name.1" and reads on: catch it on the raw header.
        with open(path, newline="", encoding="utf-8") as handle:
            names = next((row for row in csv.reader(handle) if row), [])
        _refuse_repeated_columns(names, where, "header")
        reader = pd.read_csv(
            path, dtype=str, keep_default_na=False, encoding="utf-8", chunksize=chunk_rows, skip_blank_lines=False
        )
        line = 2
        for chunk in reader:
            # Lines each row spans: 1 + the line breaks inside its (quoted) fields.
            spans = np.ones(len(chunk), dtype=np.int64)
            for column in chunk.columns:
                spans += chunk[column].str.count("\n").to_numpy(dtype=np.int64)
            ends = line + np.cumsum(spans)
            lines = ends - spans
            line = int(ends[-1]) if len(chunk) else line
            blank = (chunk == "").all(axis=1).to_numpy()
            if blank.any():
                chunk, lines = chunk[~blank], lines[~blank]
            yield lines, chunk
    except UnicodeDecodeError:
        raise SourceError(
            f"{where}: line {_first_bad_utf8_line(path)} is not valid UTF-8; re-save the file as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise SourceError(f"{where}: the file has no header row; write one ({path.name})") from None
    except pd.errors.ParserError as exc:
        raise SourceError(f"{where}: malformed CSV ({exc}); fix the quoting or field count") from None


def _parquet_chunks(
    path: Path, where: str, chunk_rows: int, columns: list[str]
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """(row numbers, frame) per batch; rows are 1-based. Integer columns with nulls stay
    Python ints and None (not floats), so a null is reported as a null."""
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(
            f"{where}: not a readable parquet file ({exc}); it may be truncated or still being written — "
            "rewrite it completely (write to a temp name, then rename into place)"
        ) from None
    wanted = [c for c in columns if c in names]
    row = 1
    try:
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted or None):
            frame = batch.to_pandas(integer_object_nulls=True)
            yield np.arange(row, row + len(frame)), frame
            row += len(frame)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"{where}: parquet data is corrupt after row {row - 1} ({exc}); rewrite the file") from None


def _parquet_columns(path: Path, where: str) -> list[str]:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(
            f"{where}: not a readable parquet file ({exc}); it may be truncated or still being written — "
            "rewrite it completely (write to a temp name, then rename into place)"
        ) from None
    _refuse_repeated_columns(names, where, "schema")
    return names


def _jsonl_frame(path: Path, where: str) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise SourceError(f"{where}: the file is empty; write one JSON object per line")
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SourceError(f"{where}: line {number} is not valid UTF-8; re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{where}: line {number} must be a JSON object, got {type(record).__name__}")
            record["__line__"] = number
            records.append(record)
    if not records:
        raise SourceError(f"{where}: no records; write one JSON object per line")
    # object dtype: keep ints, strings and None exactly as written (no int -> float upcast)
    return pd.DataFrame(records, dtype=object)


def _is_null(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) or value == ""


def _id_column(values: pd.Series, name: str, where: str, row_label: str, rows: np.ndarray) -> np.ndarray:
    """Ids as strings. Strings and integers are accepted; null or empty ids, then any other
    type, are errors naming the row."""
    items = values.tolist()
    for i, value in enumerate(items):
        if _is_null(value):
            raise SourceError(f"{where}: {row_label} {int(rows[i])} has an empty {name}; every row needs one")
    out = np.empty(len(items), dtype=object)
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
            raise SourceError(
                f"{where}: {row_label} {int(rows[i])} has {name}={value!r} of type {type(value).__name__}; "
                f"{name} must be a string (or an integer)"
            )
        out[i] = str(value)
    return out


# ----------------------------------------------------------------------------- ads


def read_ads(source_dir: Path, source: str | None = None) -> AdCatalog:
    """The ads file of a source as a validated :class:`AdCatalog` (image paths resolved)."""
    source = source or source_dir.name
    path = ads_file(source_dir)
    where = _where(source, path)
    expected = "ad_id, text[, image]"
    if path.suffix == ".csv":
        chunks = list(_csv_chunks(path, where, chunk_rows=1 << 30))
        row_label = "line"
    elif path.suffix == ".parquet":
        _check_columns(_parquet_columns(path, where), AD_COLUMNS, where, expected)
        chunks = list(_parquet_chunks(path, where, 1 << 20, ["ad_id", "text", "image"]))
        row_label = "row"
    else:
        frame = _jsonl_frame(path, where)
        chunks = [(frame.pop("__line__").to_numpy(dtype=np.int64), frame)]
        row_label = "line"
    frame = pd.concat([c for _, c in chunks]) if chunks else pd.DataFrame()
    rows = np.concatenate([r for r, _ in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    _check_columns(list(frame.columns), AD_COLUMNS, where, expected)
    if len(frame) == 0:
        raise SourceError(f"{where}: no ads; add at least one row")
    ad_ids = _id_column(frame["ad_id"], "ad_id", where, row_label, rows)
    texts = frame["text"].tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            kind = "empty" if isinstance(text, str) or _is_null(text) else f"a {type(text).__name__}, not text"
            raise SourceError(f"{where}: {row_label} {int(rows[i])} has text that is {kind}; every ad needs ad copy")
    seen: dict[str, int] = {}
    for i, ad_id in enumerate(ad_ids):
        row = int(rows[i])
        if ad_id in seen:
            raise SourceError(
                f"{where}: ad_id {ad_id!r} appears on {row_label}s {seen[ad_id]} and {row}; ad ids must be unique"
            )
        seen[ad_id] = row
    images = frame["image"].tolist() if "image" in frame.columns else [""] * len(frame)
    resolved = [
        _safe_image_path(source_dir, img, where, f"{row_label} {int(rows[i])}") for i, img in enumerate(images)
    ]
    return AdCatalog(
        ad_ids=np.asarray(ad_ids, dtype=str),
        texts=np.asarray(texts, dtype=str),
        image_paths=np.asarray(resolved, dtype=str),
        image_root=str(source_dir.resolve()),
    )


def _safe_image_path(source_dir: Path, image, where: str, row: str) -> str:
    """Absolute path of an ad's image inside the source folder, '' for none; refuses escapes."""
    if _is_null(image):
        return ""
    if not isinstance(image, str):
        raise SourceError(f"{where}: {row} has image={image!r}; image must be a relative path string")
    if Path(image).is_absolute():
        raise SourceError(
            f"{where}: {row} has absolute image path {image!r}; refused: use a path relative to the source folder"
        )
    root = source_dir.resolve()
    resolved = (source_dir / image).resolve()
    if not resolved.is_relative_to(root):
        raise SourceError(
            f"{where}: {row} has image path {image!r} that resolves outside the source folder ({resolved}); "
            "refused: keep images (and symlink targets) inside the source folder"
        )
    return str(resolved)


# ----------------------------------------------------------------------------- clicks


class _Vocab:
    """Incremental id -> integer code map (ids stay strings only once per distinct id)."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, ids: np.ndarray) -> np.ndarray:
        codes = self.codes
        return np.fromiter((codes.setdefault(i, len(codes)) for i in ids), dtype=np.int64, count=len(ids))

    def array(self) -> np.ndarray:
        out = np.empty(len(self.codes), dtype=object)
        for key, code in self.codes.items():
            out[code] = key
        return np.asarray(out.tolist(), dtype=str) if len(out) else np.zeros(0, dtype="<U1")


def _numeric_column(
    values: pd.Series, name: str, where: str, row_label: str, rows: np.ndarray, positive: bool
) -> np.ndarray:
    numbers = pd.to_numeric(values.replace("", np.nan) if values.dtype == object else values, errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers.astype(float))
    if positive:
        bad |= numbers.astype(float) <= 0
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        rule = "a finite number > 0" if positive else "an integer"
        value = values.iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        raise SourceError(f"{where}: {row_label} {int(rows[i])} has {name}={value!r}; it must be {rule}")
    return numbers.to_numpy(dtype=np.float64)


def read_clicks(
    source_dir: Path,
    known_ad_ids: np.ndarray,
    source: str | None = None,
    max_unknown_ad_share: float = DEFAULT_MAX_UNKNOWN_AD_SHARE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[RawClicks, ClickReadReport]:
    """All click files of a source, validated, as integer-coded :class:`RawClicks`."""
    source = source or source_dir.name
    files = click_files(source_dir)
    if not files:
        raise SourceError(
            f"source {source!r}: no click files in {source_dir / CLICKS_DIRNAME}; add .csv or .parquet files "
            "with columns user_id, ad_id[, timestamp, weight]"
        )
    ad_index = {str(a): i for i, a in enumerate(known_ad_ids)}
    users = _Vocab()
    user_parts: list[np.ndarray] = []
    ad_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    report = ClickReadReport(n_files=len(files))
    expected = "user_id, ad_id[, timestamp, weight]"
    for path in files:
        where = _where(source, path)
        if path.suffix == ".csv":
            chunks, row_label = _csv_chunks(path, where, chunk_rows), "line"
        else:
            _check_columns(_parquet_columns(path, where), CLICK_COLUMNS, where, expected)
            chunks = _parquet_chunks(path, where, chunk_rows, ["user_id", "ad_id", "timestamp", "weight"])
            row_label = "row"
        file_rows = 0
        for rows, frame in chunks:
            _check_columns(list(frame.columns), CLICK_COLUMNS, where, expected)
            user_ids = _id_column(frame["user_id"], "user_id", where, row_label, rows)
            ad_ids = _id_column(frame["ad_id"], "ad_id", where, row_label, rows)
            if "weight" in frame.columns:
                weights = _numeric_column(frame["weight"], "weight", where, row_label, rows, positive=True)
            else:
                weights = np.ones(len(frame))
            if "timestamp" in frame.columns:
                _numeric_column(frame["timestamp"], "timestamp", where, row_label, rows, positive=False)
            codes = np.fromiter((ad_index.get(a, -1) for a in ad_ids), dtype=np.int64, count=len(ad_ids))
            unknown = codes < 0
            if unknown.any():
                report.n_unknown_ad_rows += int(unknown.sum())
                for i in np.flatnonzero(unknown)[: max(0, 3 - len(report.unknown_examples))]:
                    report.unknown_examples.append(f"{path.name} {row_label} {int(rows[i])}: ad_id {ad_ids[i]!r}")
            keep = ~unknown
            user_parts.append(users.encode(user_ids[keep]))
            ad_parts.append(codes[keep])
            weight_parts.append(weights[keep].astype(np.float32))
            report.n_rows += len(frame)
            file_rows += len(frame)
        if file_rows == 0:
            raise SourceError(f"{where}: the file has a header but no click rows; add clicks or remove the file")
    if report.n_usable == 0:
        raise SourceError(
            f"source {source!r}: none of the {report.n_rows} click rows in {len(files)} file(s) is usable "
            f"({report.n_unknown_ad_rows} name ads missing from the ads file, e.g. {report.unknown_examples}); "
            "check that click ad_ids match the ads file"
        )
    share = report.n_unknown_ad_rows / report.n_rows
    if share > max_unknown_ad_share:
        raise SourceError(
            f"source {source!r}: {report.n_unknown_ad_rows} of {report.n_rows} clicks ({share:.1%}) name ads that "
            f"are not in the ads file (e.g. {'; '.join(report.unknown_examples)}), above the allowed "
            f"{max_unknown_ad_share:.1%}; add the missing ads, or raise max_unknown_ad_share to drop them"
        )
    clicks = RawClicks(
        user_vocab=users.array(),
        user_codes=np.concatenate(user_parts),
        ad_vocab=np.asarray(known_ad_ids, dtype=str),
        ad_codes=np.concatenate(ad_parts),
        weights=np.concatenate(weight_parts),
    )
    return clicks, report


# ----------------------------------------------------------------------------- writing


def write_source(out_dir: Path, catalog: AdCatalog, clicks: RawClicks, clicks_name: str = "clicks.csv") -> None:
    """Write a catalogue and clicks in the folder format; images are copied into
    ``out_dir/images/`` so the source is self-contained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLICKS_DIRNAME).mkdir(exist_ok=True)
    images = []
    for ad_id, path in zip(catalog.ad_ids, catalog.image_paths):
        if not path:
            images.append("")
            continue
        target = out_dir / "images" / f"{ad_id}{Path(path).suffix}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
        images.append(str(target.relative_to(out_dir)))
    pd.DataFrame({"ad_id": catalog.ad_ids, "text": catalog.texts, "image": images}).to_csv(
        out_dir / "ads.csv", index=False
    )
    pd.DataFrame(
        {
            "user_id": clicks.user_vocab[clicks.user_codes],
            "ad_id": clicks.ad_vocab[clicks.ad_codes],
            "weight": clicks.weights,
        }
    ).to_csv(out_dir / CLICKS_DIRNAME / clicks_name, index=False)
