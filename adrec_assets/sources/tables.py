"""Reading a source's tables against declared columns: delimited text (CSV, TSV, ``|``),
parquet and JSON lines, under one set of rules shared by the file source and the MovieLens
adapter (plain Python, no Dagster).

Each cell is checked against its column's :class:`Kind` and converted to the array it is
kept as: object arrays of ``str`` for ids and text (never fixed-width numpy strings),
``int64`` for integers, the stored float dtype for numbers, so a value that only breaks
once stored (a weight that overflows float32) is caught here. Every problem, whatever the
parser underneath raised, is a :class:`SourceError` naming the file, the first bad line
(text formats: the editor line where the row starts, blank lines and line breaks inside
quoted fields counted) or row (parquet, 1-based), the column, the value (redacted for
secret columns such as user ids) and the fix.
"""

from __future__ import annotations

import codecs
import csv
import enum
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from adrec_assets.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PATTERN, redact
from adrec_assets.sources import SourceError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT64_SAFE_DIGITS = 18  # any integer written with at most this many characters fits int64
_SHOWN_CHARS = 80


class Kind(enum.Enum):
    ID = "id"  # non-empty string; an integer cell is kept as its decimal text
    PSEUDONYM = "pseudonym"  # PSEUDONYM_HEX_CHARS lowercase hex characters
    TEXT = "text"  # string that is not blank
    STR = "str"  # any string; an empty or null cell is ""
    CELL = "cell"  # a string or a number, kept as its text (structured ad fields); null is ""
    INT = "int"  # integer within int64
    FLAG = "flag"  # 0 or 1
    FLOAT = "float"  # finite number, still finite in the stored dtype
    POSITIVE = "positive"  # finite number > 0, still finite and > 0 in the stored dtype


@dataclass(frozen=True)
class Column:
    """One declared column: how its cells are checked and what array they become."""

    key: str | int  # header name, or 0-based field position in a file without a header
    kind: Kind
    required: bool = True
    secret: bool = False  # user ids: a value is never shown in a message, only redacted
    max_chars: int | None = None  # string kinds: a longer value is an error (TEXT: see truncate)
    truncate: bool = False  # TEXT: cut at max_chars and report it instead of failing
    dtype: str = "float64"  # FLOAT/POSITIVE: what the value is stored as
    limit_name: str = ""  # the setting that raises max_chars, named in the fix
    rule: str = ""  # STR: what a value must be, e.g. "a relative path string"
    fix: str = ""  # what to do about an empty value (ID, PSEUDONYM, TEXT) or a malformed one

    @property
    def label(self) -> str:
        return self.key if isinstance(self.key, str) else f"field {self.key + 1}"


@dataclass(frozen=True)
class TableSpec:
    """How to read one file. The format follows the suffix: ``.parquet``, ``.jsonl``, or
    delimited text (``sep``, ``quoting``, ``encoding``, with or without a header row)."""

    path: Path
    where: str  # message prefix naming the file, e.g. "source 'shop', file /data/shop/ads.csv"
    columns: tuple[Column, ...]
    one_of: tuple[tuple[str, ...], ...] = ()  # groups of optional columns: exactly one must be present
    sep: str = ","
    encoding: str = "utf-8"
    header: bool = True
    n_fields: int | None = None  # no header: the exact number of fields of every row
    quoting: int = csv.QUOTE_MINIMAL
    max_rows: int | None = None  # more data rows than this is an error
    max_rows_name: str = ""  # the setting that raises max_rows, named in the fix

    @property
    def holds_secrets(self) -> bool:
        return any(column.secret for column in self.columns)

    def expected(self) -> str:
        """The declared layout, e.g. ``user_id or user_pseudonym, ad_id[, timestamp, weight]``."""
        grouped = {name: group for group in self.one_of for name in group}
        shown, optional = [], []
        for column in self.columns:
            group = grouped.get(column.label)
            if group is not None:
                if column.label == group[0]:
                    shown.append(" or ".join(group))
            elif column.required:
                shown.append(column.label)
            else:
                optional.append(column.label)
        return ", ".join(shown) + (f"[, {', '.join(optional)}]" if optional else "")


@dataclass(frozen=True)
class Rows:
    """One chunk of validated rows of a table."""

    numbers: np.ndarray  # (n,) int64: the line (text formats) or row (parquet) of each row
    label: str  # "line" or "row"
    values: dict[str | int, np.ndarray]  # declared columns present in the file, converted
    truncated: dict[str | int, np.ndarray]  # TEXT columns with truncate: which rows were cut

    def __len__(self) -> int:
        return len(self.numbers)


def read_table(spec: TableSpec, chunk_rows: int) -> Iterator[Rows]:
    """Validated rows of ``spec.path``, ``chunk_rows`` at a time (JSON lines: all at once)."""
    suffix = spec.path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(spec, chunk_rows)
        elif suffix == ".jsonl":
            yield from _jsonl_rows(spec)
        else:
            yield from _delimited_rows(spec, chunk_rows)
    except (SourceError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a parser raises, the caller gets the file
        # A parser's own message may quote a cell; for tables holding user ids only its type is shown.
        detail = type(exc).__name__ if spec.holds_secrets else f"{type(exc).__name__}: {_clip(str(exc))}"
        raise SourceError(
            f"{spec.where}: could not be read ({detail}); check that it is a complete, well-formed "
            f"{suffix.lstrip('.') or 'text'} file"
        ) from (None if spec.holds_secrets else exc)


# ----------------------------------------------------------------------------- columns


def present_columns(spec: TableSpec, found: list[Any], what: str) -> list[Column]:
    """The declared columns ``found`` holds; refuses repeated names, missing required ones
    (with a rename hint when a near spelling is there) and both columns of a one-of group."""
    found = [str(name) for name in found]
    repeated = sorted(name for name, count in Counter(found).items() if count > 1)
    if repeated:
        raise SourceError(
            f"{spec.where}: the {what} names column(s) {_names(spec, repeated)} more than once "
            f"({_names(spec, found)}); keep one column of each name"
        )
    for group in spec.one_of:
        there = [name for name in group if name in found]
        if len(there) > 1:
            raise SourceError(
                f"{spec.where}: the {what} has columns {there}; keep exactly one of them (they are alternatives)"
            )
    grouped = {name: group for group in spec.one_of for name in group}
    missing: list[tuple[str, ...]] = []  # in declared order; a group counts once, at its first column
    for column in spec.columns:
        group = grouped.get(column.label)
        if group is None and column.required and column.label not in found:
            missing.append((column.label,))
        elif group is not None and column.label == group[0] and not any(name in found for name in group):
            missing.append(group)
    if missing:
        squashed = {_squash(name): name for name in found}
        hints = []
        for names in missing:
            near = next((squashed[_squash(n)] for n in names if _squash(n) in squashed), None)
            if near is not None:
                target = next(n for n in names if _squash(n) == _squash(near))
                hints.append(f"rename column {near!r} to {target!r} (names are case- and space-sensitive)")
        hint = "; ".join(hints) if hints else f"expected columns {spec.expected()}"
        if not any(_resembles_a_column(spec, name) for name in found):
            hint += f" (is the {what} row missing? the first row is read as the {what})" if what == "header" else ""
        shown = "[" + ", ".join(" or ".join(repr(n) for n in names) for names in missing) + "]"
        raise SourceError(f"{spec.where}: missing column(s) {shown}; found {_names(spec, found)}. Fix: {hint}")
    return [c for c in spec.columns if c.label in found]


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _resembles_a_column(spec: TableSpec, name: str) -> bool:
    return any(_squash(name) == _squash(c.label) for c in spec.columns)


def _names(spec: TableSpec, names: list[str], most: int = 20) -> str:
    """Column names as a message may list them. In a table holding user ids a name that is no
    (near) spelling of a declared column is redacted: without a header row, the first row's
    cells, a user id among them, are read as names."""
    shown = [
        redact(name) if spec.holds_secrets and not _resembles_a_column(spec, name) else _clip(repr(name))
        for name in names[:most]
    ]
    more = f", ... ({len(names)} columns)" if len(names) > most else ""
    return "[" + ", ".join(shown) + more + "]"


# ----------------------------------------------------------------------------- delimited text


def _delimited_rows(spec: TableSpec, chunk_rows: int) -> Iterator[Rows]:
    where = spec.where
    if spec.path.stat().st_size == 0:
        raise SourceError(
            f"{where}: the file is empty; write {'a header row and data' if spec.header else 'data'}, or remove it"
        )
    options: dict[str, Any] = dict(
        sep=spec.sep, quoting=spec.quoting, encoding=spec.encoding, encoding_errors="strict", dtype=str,
        keep_default_na=False, na_filter=False, engine="c", header=None,
    )  # fmt: skip
    n_fields = spec.n_fields or 0
    try:
        if spec.header:
            names = pd.read_csv(spec.path, nrows=1, skip_blank_lines=True, **options).iloc[0].tolist()
            columns = present_columns(spec, names, "header")
            positions = {c.key: names.index(c.key) for c in columns}
            n_fields = len(names)
        else:
            columns = list(spec.columns)
            positions = {c.key: int(c.key) for c in columns}
        # Every physical row comes back as data, header included, as exactly n_fields strings
        # (a row with more fields is a ParserError, one with fewer is padded with "").
        reader = pd.read_csv(
            spec.path, names=list(range(n_fields)), skip_blank_lines=False, chunksize=chunk_rows, **options
        )
        line, header_pending, n_rows = 1, spec.header, 0
        with reader:
            for chunk in reader:
                spans = np.ones(len(chunk), dtype=np.int64)  # lines each row spans
                if spec.quoting != csv.QUOTE_NONE:
                    for position in range(n_fields):
                        spans += chunk[position].str.count("\n").to_numpy(dtype=np.int64)
                starts = line + np.cumsum(spans) - spans
                line = int(starts[-1] + spans[-1]) if len(chunk) else line
                keep = ~(chunk == "").all(axis=1).to_numpy(dtype=bool)  # blank lines are skipped
                if header_pending and keep.any():
                    keep[int(np.flatnonzero(keep)[0])] = False
                    header_pending = False
                if not keep.any():
                    continue
                frame, numbers = chunk[keep], starts[keep]
                if spec.max_rows is not None and n_rows + len(frame) > spec.max_rows:
                    over = int(numbers[spec.max_rows - n_rows])
                    raise _too_many_rows(spec, f"line {over} is data row {spec.max_rows + 1}")
                n_rows += len(frame)
                cells = {c.key: frame[positions[c.key]] for c in columns}
                values, truncated = _validate(spec, columns, cells, numbers, "line", True, n_fields)
                yield Rows(numbers, "line", values, truncated)
    except UnicodeDecodeError:
        raise _undecodable(spec) from None
    except pd.errors.EmptyDataError:
        raise SourceError(f"{where}: the file has no header row; write one ({spec.path.name})") from None
    except pd.errors.ParserError as exc:
        raise _malformed(spec, n_fields, exc) from None


@dataclass(frozen=True)
class _Scan:
    first_bad: tuple[int, int] | None  # (line, number of fields) of the first row with a wrong count
    last_start: int  # line where the last row scanned starts
    undecodable: bool  # the scan stopped at bytes that do not decode


def _scan_field_counts(spec: TableSpec, n_fields: int, until_line: int | None) -> _Scan:
    """Error path only: the first row up to ``until_line`` whose field count is not
    ``n_fields``. The csv module keeps each row's fields (pandas pads a short row), so a
    missing field is told from an empty one."""
    first_bad, last_start, previous_end = None, 0, 0
    try:
        with open(spec.path, newline="", encoding=spec.encoding, errors="strict") as handle:
            reader = csv.reader(handle, delimiter=spec.sep, quoting=spec.quoting)
            for row in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if until_line is not None and start > until_line:
                    break
                if row:
                    last_start = start
                    if len(row) != n_fields and first_bad is None:
                        first_bad = (start, len(row))
                        if until_line is not None:
                            break
    except UnicodeDecodeError:
        return _Scan(first_bad, last_start, True)
    except (csv.Error, OSError):  # e.g. a field over the csv module's size limit
        pass
    return _Scan(first_bad, last_start, False)


def _field_count_error(spec: TableSpec, n_fields: int, bad: tuple[int, int]) -> SourceError:
    line, found = bad
    return SourceError(
        f"{spec.where}: line {line} has {found} fields, expected {n_fields}; fix the quoting or the number "
        f"of {spec.sep!r} separators on that line"
    )


def _malformed(spec: TableSpec, n_fields: int, exc: Exception) -> SourceError:
    message = str(exc).strip()
    scan = _scan_field_counts(spec, n_fields, None)
    # An unclosed quote swallows the rest of the file into the last row, whose field count is then off too.
    unclosed = "EOF inside string" in message and scan.last_start and not scan.undecodable
    if scan.first_bad is not None and not (unclosed and scan.first_bad[0] == scan.last_start):
        return _field_count_error(spec, n_fields, scan.first_bad)
    if scan.undecodable:
        return _undecodable(spec)
    if unclosed:
        return SourceError(
            f"{spec.where}: line {scan.last_start} opens a quoted field that is never closed; close the quote or "
            "remove it"
        )
    return SourceError(f"{spec.where}: malformed CSV ({_clip(message)}); fix the quoting or field count")


def _undecodable(spec: TableSpec) -> SourceError:
    """Error path only: the first line that does not decode, read in binary line by line."""
    name = "UTF-8" if spec.encoding.lower().replace("_", "-").startswith("utf-8") else spec.encoding
    decoder = codecs.getincrementaldecoder(spec.encoding)(errors="strict")
    number = 0
    with open(spec.path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as err:
                return SourceError(
                    f"{spec.where}: line {number} is not valid {name} ({err.reason}); re-save the file as UTF-8"
                )
    return SourceError(f"{spec.where}: line {number} is not valid {name} (it ends mid-character); re-save it as UTF-8")


def _too_many_rows(spec: TableSpec, evidence: str) -> SourceError:
    setting = f", or raise {spec.max_rows_name}" if spec.max_rows_name else ""
    return SourceError(
        f"{spec.where}: more than {spec.max_rows} data rows ({evidence}); "
        f"split it into files of at most {spec.max_rows} rows{setting}"
    )


# ----------------------------------------------------------------------------- parquet


def _parquet_rows(spec: TableSpec, chunk_rows: int) -> Iterator[Rows]:
    where = spec.where
    try:
        parquet = pq.ParquetFile(spec.path)
        names = list(parquet.schema_arrow.names)
        n_rows = parquet.metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise SourceError(
            f"{where}: not a readable parquet file ({_detail(spec, exc)}); it may be truncated or still being "
            "written — rewrite it completely (write to a temp name, then rename into place)"
        ) from None
    try:
        columns = present_columns(spec, names, "schema")
        if spec.max_rows is not None and n_rows > spec.max_rows:
            raise _too_many_rows(spec, f"it has {n_rows}")
        batches = parquet.iter_batches(batch_size=chunk_rows, columns=[c.key for c in columns])
        row = 1
        while True:
            try:
                batch = next(batches, None)
                frame = None if batch is None else batch.to_pandas(integer_object_nulls=True)
            except Exception as exc:  # noqa: BLE001
                raise SourceError(
                    f"{where}: parquet data is corrupt after row {row - 1} ({_detail(spec, exc)}); rewrite the file"
                ) from None
            if frame is None:
                break
            numbers = np.arange(row, row + len(frame), dtype=np.int64)
            row += len(frame)
            if not len(frame):
                continue
            if spec.max_rows is not None and row - 1 > spec.max_rows:
                raise _too_many_rows(spec, f"row {spec.max_rows + 1} exists")
            cells = {c.key: frame[c.key] for c in columns}
            values, truncated = _validate(spec, columns, cells, numbers, "row", False, None)
            yield Rows(numbers, "row", values, truncated)
    finally:
        parquet.close()


# ----------------------------------------------------------------------------- JSON lines


def _jsonl_rows(spec: TableSpec) -> Iterator[Rows]:
    where = spec.where
    if spec.path.stat().st_size == 0:
        raise SourceError(f"{where}: the file is empty; write one JSON object per line")
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    with open(spec.path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(spec.encoding)
            except UnicodeDecodeError:
                raise SourceError(f"{where}: line {number} is not valid UTF-8; re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: line {number} is not valid JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
                raise SourceError(f"{where}: line {number} is not valid JSON ({type(exc).__name__})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{where}: line {number} must be a JSON object, got {type(record).__name__}")
            if spec.max_rows is not None and len(records) == spec.max_rows:
                raise _too_many_rows(spec, f"line {number} is record {spec.max_rows + 1}")
            records.append(record)
            numbers.append(number)
    if not records:
        raise SourceError(f"{where}: no records; write one JSON object per line")
    found = list(dict.fromkeys(key for record in records for key in record))
    columns = present_columns(spec, found, "records")
    cells = {c.key: pd.Series([record.get(c.key) for record in records], dtype=object) for c in columns}
    line_numbers = np.asarray(numbers, dtype=np.int64)
    values, truncated = _validate(spec, columns, cells, line_numbers, "line", False, None)
    yield Rows(line_numbers, "line", values, truncated)


# ----------------------------------------------------------------------------- cell checks


@dataclass
class _Checked:
    values: np.ndarray
    bad: np.ndarray  # (n,) bool
    reason: Callable[[int], str]  # what is wrong with bad row i, e.g. "has weight='x'; it must be ..."
    truncated: np.ndarray | None = None


def _validate(
    spec: TableSpec,
    columns: list[Column],
    cells: dict[str | int, pd.Series],
    numbers: np.ndarray,
    label: str,
    text_cells: bool,
    n_fields: int | None,
) -> tuple[dict[str | int, np.ndarray], dict[str | int, np.ndarray]]:
    """Check and convert every column; the first bad row in file order is the error."""
    checked = {c.key: _check(c, cells[c.key].reset_index(drop=True), text_cells) for c in columns}
    first = None
    for order, column in enumerate(columns):
        bad = checked[column.key].bad
        if bad.any():
            candidate = (int(np.argmax(bad)), order)
            first = candidate if first is None or candidate < first else first
    if first is not None:
        row, order = first
        number = int(numbers[row])
        if n_fields is not None:  # a row with missing fields reads as empty cells: say so instead
            bad_count = _scan_field_counts(spec, n_fields, number).first_bad
            if bad_count is not None:
                raise _field_count_error(spec, n_fields, bad_count)
        raise SourceError(f"{spec.where}: {label} {number} {checked[columns[order].key].reason(row)}")
    values = {key: c.values for key, c in checked.items()}
    truncated = {key: c.truncated for key, c in checked.items() if c.truncated is not None}
    return values, truncated


def _check(column: Column, cells: pd.Series, text_cells: bool) -> _Checked:
    if column.kind in (Kind.ID, Kind.PSEUDONYM, Kind.TEXT, Kind.STR, Kind.CELL):
        return _check_strings(column, cells, text_cells)
    if column.kind in (Kind.INT, Kind.FLAG):
        return _check_integers(column, cells, text_cells)
    return _check_numbers(column, cells, text_cells)


def _is_null(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _shown(value: object, column: Column) -> str:
    """A cell as a message may show it: redacted for secret columns, clipped when long."""
    if isinstance(value, np.generic):
        value = value.item()
    if column.secret:
        return redact(value)
    return _clip(repr(value))


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 20]}... ({len(text)} characters)"


def _as_str_cells(cells: pd.Series, text_cells: bool) -> bool:
    return text_cells or isinstance(cells.dtype, pd.StringDtype)


def _check_strings(column: Column, cells: pd.Series, text_cells: bool) -> _Checked:
    n, kind, name = len(cells), column.kind, column.label
    strings = np.empty(n, dtype=object)
    null = np.zeros(n, dtype=bool)
    wrong_type = np.zeros(n, dtype=bool)
    raw = cells.to_numpy(dtype=object)
    if _as_str_cells(cells, text_cells):
        null = cells.isna().to_numpy(dtype=bool)
        strings[:] = raw
    else:
        for i, value in enumerate(raw):
            if _is_null(value):
                null[i] = True
            elif isinstance(value, str):
                strings[i] = str(value)
            elif kind is Kind.ID and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                strings[i] = str(value)
            elif kind is Kind.CELL and isinstance(value, (int, float, np.integer, np.floating)):
                strings[i] = str(value)
            else:
                wrong_type[i] = True
    strings[null | wrong_type] = ""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    if kind is Kind.TEXT:
        empty = np.fromiter((not s.strip() for s in strings), dtype=bool, count=n)
    elif kind in (Kind.STR, Kind.CELL):
        empty = np.zeros(n, dtype=bool)
    else:
        empty = lengths == 0
    empty &= ~wrong_type
    too_long = np.zeros(n, dtype=bool) if column.max_chars is None else lengths > column.max_chars
    truncated = None
    if column.truncate and column.max_chars is not None:
        truncated = too_long & ~empty & ~wrong_type
        for i in np.flatnonzero(truncated):
            strings[i] = strings[i][: column.max_chars]
        too_long = np.zeros(n, dtype=bool)
    malformed = np.zeros(n, dtype=bool)
    if kind is Kind.PSEUDONYM:
        malformed = np.fromiter((PSEUDONYM_PATTERN.fullmatch(s) is None for s in strings), dtype=bool, count=n)
        malformed &= ~empty & ~wrong_type

    def reason(i: int) -> str:
        value = raw[i]
        if wrong_type[i]:
            if kind is Kind.TEXT:
                return f"has {name} that is a {type(value).__name__}, not text; {column.fix or 'write text'}"
            if kind in (Kind.STR, Kind.CELL):
                return f"has {name}={_shown(value, column)}; {name} must be {column.rule or 'a string'}"
            allowed = "a string (or an integer)" if kind is Kind.ID else "a string"
            return f"has {name}={_shown(value, column)} of type {type(value).__name__}; {name} must be {allowed}"
        if empty[i]:
            if kind is Kind.TEXT:
                return f"has {name} that is empty; {column.fix or 'every row needs one'}"
            return f"has an empty {name}; {column.fix or 'every row needs one'}"
        if too_long[i]:
            preview = redact(strings[i]) if column.secret else _clip(repr(strings[i]))
            setting = f" or raise {column.limit_name}" if column.limit_name else ""
            return (
                f"has {name} of {lengths[i]} characters ({preview}), more than the limit of "
                f"{column.max_chars}; shorten it{setting}"
            )
        return f"has {name}={_shown(value, column)}, which is not {PSEUDONYM_HEX_CHARS} lowercase hex characters" + (
            f"; {column.fix}" if column.fix else ""
        )

    return _Checked(strings, wrong_type | empty | too_long | malformed, reason, truncated)


def _check_integers(column: Column, cells: pd.Series, text_cells: bool) -> _Checked:
    n = len(cells)
    out = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    dtype = cells.dtype
    if _as_str_cells(cells, text_cells):
        text = cells.str.strip()
        ok = text.str.fullmatch(r"[+-]?[0-9]+").eq(True).to_numpy(dtype=bool, copy=True)
        lengths = text.str.len().to_numpy(dtype=np.float64, na_value=0)
        stripped = text.to_numpy(dtype=object)
        for i in np.flatnonzero(ok & (lengths > _INT64_SAFE_DIGITS)):
            ok[i] = INT64_MIN <= _int_text(stripped[i]) <= INT64_MAX
        if ok.any():
            out[ok] = pd.to_numeric(pd.Series(stripped[ok], dtype=object)).to_numpy(dtype=np.int64)
    elif pd.api.types.is_bool_dtype(dtype):
        pass
    elif pd.api.types.is_integer_dtype(dtype):
        values = cells.to_numpy()
        ok = values <= INT64_MAX if values.dtype.kind == "u" else np.ones(n, dtype=bool)
        out[ok] = values[ok].astype(np.int64)
    elif pd.api.types.is_float_dtype(dtype):
        values = cells.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (values == np.floor(values)) & (values >= -(2.0**63)) & (values < 2.0**63)
        out[ok] = values[ok].astype(np.int64)
    elif pd.api.types.is_datetime64_any_dtype(dtype):
        ok = ~cells.isna().to_numpy(dtype=bool)
        out[ok] = cells.array.asi8[ok]
    else:
        for i, value in enumerate(cells.tolist()):
            parsed = _python_int(value)
            if parsed is not None and INT64_MIN <= parsed <= INT64_MAX:
                ok[i], out[i] = True, parsed
    bad = ~ok
    if column.kind is Kind.FLAG:
        bad |= ok & (out != 0) & (out != 1)

    def reason(i: int) -> str:
        value = cells.iloc[i]
        if column.kind is Kind.FLAG:
            rule = "0 or 1"
        elif _python_int(value) is not None:
            rule = f"an integer from {INT64_MIN} to {INT64_MAX}"
        else:
            rule = "an integer"
        return f"has {column.label}={_shown(value, column)}; it must be {rule}"

    return _Checked(out, bad, reason)


def _python_int(value: object) -> int | None:
    """``value`` as an exact integer, or None (bool, non-integral, non-finite, not a number)."""
    if isinstance(value, (bool, np.bool_)) or _is_null(value):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating, Decimal)):
        return int(value) if math.isfinite(value) and value == int(value) else None
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return _int_text(value)
    return None


def _int_text(text: str) -> int:
    """A decimal integer string as an int; one with more digits than any int64 has maps to a
    value just outside int64 (Python refuses to convert strings of thousands of digits)."""
    digits = text.strip().lstrip("+-").lstrip("0")
    if len(digits) > len(str(INT64_MAX)):
        return INT64_MIN - 1 if text.strip().startswith("-") else INT64_MAX + 1
    return int(text)


def _check_numbers(column: Column, cells: pd.Series, text_cells: bool) -> _Checked:
    n = len(cells)
    dtype = cells.dtype
    numbers = np.full(n, np.nan)
    if _as_str_cells(cells, text_cells):
        numbers = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    elif pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_datetime64_any_dtype(dtype):
        pass
    elif pd.api.types.is_numeric_dtype(dtype):
        numbers = cells.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        for i, value in enumerate(cells.tolist()):
            if isinstance(value, (bool, np.bool_)) or _is_null(value):
                continue
            if isinstance(value, (int, float, np.integer, np.floating, Decimal)):
                try:
                    numbers[i] = float(value)
                except (OverflowError, ValueError):  # an int beyond float64, a signalling NaN
                    numbers[i] = np.inf
            elif isinstance(value, str):
                numbers[i] = pd.to_numeric(pd.Series([value], dtype=object), errors="coerce").iloc[0]
    positive = column.kind is Kind.POSITIVE
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        finite = np.isfinite(numbers)
        stored = numbers.astype(column.dtype)
        in_range = np.isfinite(stored)
        if positive:
            finite &= numbers > 0
            in_range &= stored > 0
    bad = ~finite | ~in_range
    rule = "a finite number > 0" if positive else "a finite number"
    info = np.finfo(column.dtype)

    def reason(i: int) -> str:
        detail = rule
        if finite[i]:
            low = f"{float(info.smallest_subnormal):.1e}" if positive else f"{float(info.min):.1e}"
            detail = f"{rule} that stays so as {column.dtype} (from {low} to {float(info.max):.1e})"
        return f"has {column.label}={_shown(cells.iloc[i], column)}; it must be {detail}"

    return _Checked(stored, bad, reason)


def _detail(spec: TableSpec, exc: Exception) -> str:
    return type(exc).__name__ if spec.holds_secrets else f"{type(exc).__name__}: {_clip(str(exc))}"
