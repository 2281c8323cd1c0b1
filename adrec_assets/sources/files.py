"""File click sources: a team drops a folder, the pipeline picks it up (no Dagster here).

Layout of one source, ``<root>/<source>/``::

    ads.csv | ads.parquet | ads.jsonl   ad_id (string), text (string), optional image
                                        (path relative to the source folder), and the
                                        structured fields ad_fields.json declares
    ad_fields.json                      optional: {"<column>": {"kind": "categorical" |
                                        "numeric"[, "separator": "|"]}, ...}: ad properties
                                        (category, advertiser, year, price) the projector
                                        reads beside the encoder's vector
    clicks/*.csv | clicks/*.parquet     user_id or user_pseudonym, ad_id, optional timestamp,
                                        optional weight

``user_pseudonym`` holds ids already pseudonymized with adrec's key (32 lowercase hex
characters, as :func:`adrec_assets.privacy.pseudonymize` writes them); a file has either it or
``user_id``, never both.

Every problem is reported as a :class:`SourceError` that names the source, the file, the
row (line numbers count the header as line 1) and what to do; a raw user id is never quoted,
only redacted. Policies:

* clicks naming an ad that is not in the ads file are dropped and counted; the read fails
  when they exceed ``max_unknown_ad_share`` of a source's clicks;
* sizes are bounded by :class:`SourceLimits`: an ad text over ``max_text_chars`` is cut and
  counted in the :class:`AdReadReport`; a longer id, or a click file with more rows, fails;
* an image path that is absolute or resolves outside the source folder (``..``, symlinks)
  is refused; a missing, corrupt or oversized image is not an error here: the encoder falls
  back to text and counts it (and re-checks the path when it opens the file);
* click files are read in chunks of ``chunk_rows`` rows and kept as integer codes, so
  memory grows with the number of clicks and distinct ids, not with file size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from adrec_assets.ml.encoders.base import DEFAULT_MAX_IMAGE_BYTES, ImageAccess
from adrec_assets.ml.fields import MAX_FIELD_CHARS, AdFields, FieldError, FieldSpec
from adrec_assets.ml.types import AdCatalog, str_array
from adrec_assets.sources import AdReadReport, ClickReadReport, RawClicks, SourceError
from adrec_assets.sources.folders import write_folder_atomically
from adrec_assets.sources.limits import SourceLimits
from adrec_assets.sources.tables import Column, Kind, Rows, TableSpec, read_table

__all__ = [
    "AdReadReport", "ClickReadReport", "FileSource", "RawClicks", "SourceError", "SourceLimits", "ads_file",
    "click_files", "list_sources", "read_ads", "read_ads_with_report", "read_clicks", "read_field_specs",
    "source_fingerprint", "write_field_specs", "write_source",
]  # fmt: skip

log = logging.getLogger(__name__)

ADS_FILENAMES = ("ads.csv", "ads.parquet", "ads.jsonl")
FIELDS_FILENAME = "ad_fields.json"
CLICKS_DIRNAME = "clicks"
CLICK_SUFFIXES = (".csv", ".parquet")
AD_ID, TEXT, IMAGE = "ad_id", "text", "image"
USER_ID, USER_PSEUDONYM, TIMESTAMP, WEIGHT = "user_id", "user_pseudonym", "timestamp", "weight"
AD_COLUMNS = (AD_ID, TEXT)
CLICK_COLUMNS = (USER_ID, AD_ID)
DEFAULT_CHUNK_ROWS = 500_000
DEFAULT_MAX_UNKNOWN_AD_SHARE = 0.05
MAX_IMAGE_PATH_CHARS = 4096  # PATH_MAX on Linux: no longer path can be opened
_AD_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class FileSource:
    """A source folder ``<root>/<name>/`` in the format above."""

    folder: Path
    name: str
    max_unknown_ad_share: float = DEFAULT_MAX_UNKNOWN_AD_SHARE
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    limits: SourceLimits = field(default_factory=SourceLimits)

    def read_ads(self) -> AdCatalog:
        return read_ads(self.folder, self.name, self.limits)

    def read_ads_with_report(self) -> tuple[AdCatalog, AdReadReport]:
        return read_ads_with_report(self.folder, self.name, self.limits)

    def read_clicks(self, ad_ids: np.ndarray) -> tuple[RawClicks, ClickReadReport]:
        return read_clicks(
            self.folder, ad_ids, self.name, self.max_unknown_ad_share, self.chunk_rows, limits=self.limits
        )


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
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in CLICK_SUFFIXES and not p.name.startswith(".")
    )


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
    """Changes whenever an ads, fields or click file is added, removed, or rewritten (size/mtime)."""
    entries = []
    for path in [*(source_dir / n for n in (*ADS_FILENAMES, FIELDS_FILENAME)), *click_files(source_dir)]:
        if path.is_file():
            stat = path.stat()
            entries.append(f"{path.relative_to(source_dir)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _where(source: str, path: Path) -> str:
    return f"source {source!r}, file {path}"


# ----------------------------------------------------------------------------- ads


def _ads_spec(path: Path, where: str, limits: SourceLimits, fields: tuple[FieldSpec, ...] = ()) -> TableSpec:
    return TableSpec(
        path,
        where,
        (
            Column(AD_ID, Kind.ID, max_chars=limits.max_id_chars, limit_name="max_id_chars"),
            Column(TEXT, Kind.TEXT, max_chars=limits.max_text_chars, truncate=True, fix="every ad needs ad copy"),
            Column(IMAGE, Kind.STR, required=False, max_chars=MAX_IMAGE_PATH_CHARS, rule="a relative path string"),
            *(Column(spec.name, Kind.CELL, max_chars=MAX_FIELD_CHARS, rule=f"a {spec.kind} value") for spec in fields),
        ),
    )


def write_field_specs(folder: Path, fields: tuple[FieldSpec, ...]) -> None:
    """``ad_fields.json`` declaring ``fields`` (what :func:`read_field_specs` reads back)."""
    declared = {f.name: {"kind": f.kind, **({"separator": f.separator} if f.separator else {})} for f in fields}
    (folder / FIELDS_FILENAME).write_text(json.dumps(declared, indent=1) + "\n", encoding="utf-8")


def read_field_specs(source_dir: Path, source: str | None = None) -> tuple[FieldSpec, ...]:
    """The structured fields ``ad_fields.json`` declares (none without the file), in file order."""
    path = source_dir / FIELDS_FILENAME
    if not path.is_file():
        return ()
    where = _where(source or source_dir.name, path)
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{where}: not valid UTF-8 JSON ({exc}); fix it or remove the file") from None
    if not isinstance(declared, dict) or not all(isinstance(v, dict) for v in declared.values()):
        raise SourceError(f'{where}: expected an object like {{"year": {{"kind": "numeric"}}}}, one entry per column')
    specs = []
    for name, entry in declared.items():
        if name in (AD_ID, TEXT, IMAGE) or not name.strip():
            raise SourceError(f"{where}: {name!r} cannot be a structured field (reserved or empty column name)")
        unknown = sorted(set(entry) - {"kind", "separator"})
        if unknown:
            raise SourceError(f"{where}: field {name!r} has unknown keys {unknown}; use 'kind' and 'separator'")
        try:
            specs.append(FieldSpec(name, str(entry.get("kind", "")), str(entry.get("separator", ""))))
        except FieldError as exc:
            raise SourceError(f"{where}: {exc}") from None
    return tuple(specs)


def read_ads(source_dir: Path, source: str | None = None, limits: SourceLimits | None = None) -> AdCatalog:
    """The ads file of a source as a validated :class:`AdCatalog` (image paths resolved);
    texts over ``limits.max_text_chars`` are cut (see :func:`read_ads_with_report`)."""
    return read_ads_with_report(source_dir, source, limits)[0]


def read_ads_with_report(
    source_dir: Path, source: str | None = None, limits: SourceLimits | None = None
) -> tuple[AdCatalog, AdReadReport]:
    """:func:`read_ads` and what the read changed: the ad texts cut to the length limit."""
    source = source or source_dir.name
    limits = limits or SourceLimits()
    path = ads_file(source_dir)
    where = _where(source, path)
    fields = read_field_specs(source_dir, source)
    chunks = list(read_table(_ads_spec(path, where, limits, fields), chunk_rows=_AD_CHUNK_ROWS))  # held whole anyway
    if not chunks:
        raise SourceError(f"{where}: no ads; add at least one row")
    rows = _concat(chunks)
    label = chunks[0].label
    ad_ids, texts = rows.values[AD_ID], rows.values[TEXT]
    seen: dict[str, int] = {}
    for ad_id, number in zip(ad_ids.tolist(), rows.numbers.tolist()):
        if ad_id in seen:
            raise SourceError(
                f"{where}: ad_id {ad_id!r} appears on {label}s {seen[ad_id]} and {number}; ad ids must be unique"
            )
        seen[ad_id] = number
    images = rows.values.get(IMAGE, np.full(len(ad_ids), "", dtype=object))
    root = source_dir.resolve()
    resolved = str_array(
        _safe_image_path(source_dir, root, image, where, f"{label} {number}")
        for image, number in zip(images.tolist(), rows.numbers.tolist())
    )
    cut = rows.truncated[TEXT]
    report = AdReadReport(
        n_ads=len(ad_ids),
        n_texts_truncated=int(cut.sum()),
        max_text_chars=limits.max_text_chars,
        truncated_examples=[
            f"{path.name} {label} {rows.numbers[i]}: ad_id {ad_ids[i]!r}" for i in np.flatnonzero(cut)[:3]
        ],
    )
    if report.n_texts_truncated:
        log.warning(
            "%s: %d ad texts longer than %d characters were cut to that length (e.g. %s)",
            where, report.n_texts_truncated, limits.max_text_chars, "; ".join(report.truncated_examples),
        )  # fmt: skip
    catalog = AdCatalog(
        ad_ids=ad_ids, texts=texts, image_paths=resolved, image_root=str(root),
        fields=AdFields(fields, {spec.name: rows.values[spec.name] for spec in fields}),
    )  # fmt: skip
    return catalog, report


def _concat(chunks: list[Rows]) -> Rows:
    if len(chunks) == 1:
        return chunks[0]
    keys = chunks[0].values.keys()
    return Rows(
        np.concatenate([c.numbers for c in chunks]),
        chunks[0].label,
        {k: np.concatenate([c.values[k] for c in chunks]) for k in keys},
        {k: np.concatenate([c.truncated[k] for c in chunks]) for k in chunks[0].truncated},
    )


def _safe_image_path(source_dir: Path, root: Path, image: str, where: str, row: str) -> str:
    """Absolute path of an ad's image inside the source folder, '' for none; refuses escapes."""
    if not image:
        return ""
    if "\x00" in image:
        raise SourceError(f"{where}: {row} has an image path with a NUL character; refused: write a relative path")
    if Path(image).is_absolute():
        raise SourceError(
            f"{where}: {row} has absolute image path {image!r}; refused: use a path relative to the source folder"
        )
    try:
        resolved = (source_dir / image).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long, ...
        raise SourceError(
            f"{where}: {row} has image path {image!r} that cannot be resolved ({exc}); fix or remove it"
        ) from None
    if not resolved.is_relative_to(root):
        raise SourceError(
            f"{where}: {row} has image path {image!r} that resolves outside the source folder ({resolved}); "
            "refused: keep images (and symlink targets) inside the source folder"
        )
    return str(resolved)


# ----------------------------------------------------------------------------- clicks


def _clicks_spec(path: Path, where: str, limits: SourceLimits) -> TableSpec:
    pseudonym_fix = (
        "write pseudonyms exactly as `python -m adrec_assets.cli pseudonym` prints them, or put raw ids in a "
        f"{USER_ID} column"
    )
    return TableSpec(
        path,
        where,
        (
            Column(
                USER_ID, Kind.ID, required=False, secret=True, max_chars=limits.max_id_chars, limit_name="max_id_chars"
            ),
            Column(USER_PSEUDONYM, Kind.PSEUDONYM, required=False, secret=True, fix=pseudonym_fix),
            Column(AD_ID, Kind.ID, max_chars=limits.max_id_chars, limit_name="max_id_chars"),
            Column(TIMESTAMP, Kind.INT, required=False),
            Column(WEIGHT, Kind.POSITIVE, required=False, dtype="float32"),
        ),  # fmt: skip
        one_of=((USER_ID, USER_PSEUDONYM),),
        max_rows=limits.max_click_rows_per_file,
        max_rows_name="max_click_rows_per_file",
    )


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
        return out


def read_clicks(
    source_dir: Path,
    known_ad_ids: np.ndarray,
    source: str | None = None,
    max_unknown_ad_share: float = DEFAULT_MAX_UNKNOWN_AD_SHARE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    limits: SourceLimits | None = None,
) -> tuple[RawClicks, ClickReadReport]:
    """All click files of a source, validated, as integer-coded :class:`RawClicks`. Raw ids
    and pseudonyms (``user_pseudonym`` files) get separate vocabulary entries, flagged in
    ``RawClicks.pseudonymized``."""
    source = source or source_dir.name
    limits = limits or SourceLimits()
    files = click_files(source_dir)
    if not files:
        raise SourceError(
            f"source {source!r}: no click files in {source_dir / CLICKS_DIRNAME}; add .csv or .parquet files "
            f"with columns {USER_ID} (or {USER_PSEUDONYM}), {AD_ID}[, {TIMESTAMP}, {WEIGHT}]"
        )
    ad_vocab = str_array(known_ad_ids)
    ad_index = {a: i for i, a in enumerate(ad_vocab.tolist())}
    vocabs = {False: _Vocab(), True: _Vocab()}  # keyed by "pseudonymized"
    user_parts: list[tuple[np.ndarray, bool]] = []
    ad_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    report = ClickReadReport(n_files=len(files))
    for path in files:
        where = _where(source, path)
        file_rows = 0
        for rows in read_table(_clicks_spec(path, where, limits), chunk_rows):
            pseudonymized = USER_PSEUDONYM in rows.values
            user_ids = rows.values[USER_PSEUDONYM if pseudonymized else USER_ID]
            ad_ids = rows.values[AD_ID]
            weights = rows.values.get(WEIGHT, np.ones(len(rows), dtype=np.float32))
            codes = np.fromiter((ad_index.get(a, -1) for a in ad_ids), dtype=np.int64, count=len(ad_ids))
            unknown = codes < 0
            if unknown.any():
                report.n_unknown_ad_rows += int(unknown.sum())
                for i in np.flatnonzero(unknown)[: max(0, 3 - len(report.unknown_examples))]:
                    example = f"{path.name} {rows.label} {rows.numbers[i]}: ad_id {ad_ids[i]!r}"
                    report.unknown_examples.append(example)
            keep = ~unknown
            user_parts.append((vocabs[pseudonymized].encode(user_ids[keep]), pseudonymized))
            ad_parts.append(codes[keep])
            weight_parts.append(weights[keep])
            report.n_rows += len(rows)
            file_rows += len(rows)
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
    n_raw = len(vocabs[False].codes)
    clicks = RawClicks(
        user_vocab=np.concatenate([vocabs[False].array(), vocabs[True].array()]),
        user_codes=np.concatenate([codes + (n_raw if pseudo else 0) for codes, pseudo in user_parts]),
        ad_vocab=ad_vocab,
        ad_codes=np.concatenate(ad_parts),
        weights=np.concatenate(weight_parts).astype(np.float32, copy=False),
        pseudonymized=np.concatenate([np.zeros(n_raw, dtype=bool), np.ones(len(vocabs[True].codes), dtype=bool)]),
    )
    return clicks, report


# ----------------------------------------------------------------------------- writing


def write_source(
    out_dir: Path,
    catalog: AdCatalog,
    clicks: RawClicks,
    clicks_name: str = "clicks.csv",
    *,
    overwrite: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> None:
    """Write a catalogue and clicks in the folder format, atomically (the folder appears
    complete or not at all). Images are copied into ``out_dir/images/`` so the source is
    self-contained; each is read with the catalogue's confinement (inside ``image_root``).
    Clicks by raw ids go to ``clicks/<clicks_name>`` (column ``user_id``), clicks by
    pseudonyms to ``clicks/<stem>-pseudonymized.csv`` (column ``user_pseudonym``)."""
    access = ImageAccess(catalog.image_root or None, max_image_bytes)

    def fill(folder: Path) -> None:
        (folder / CLICKS_DIRNAME).mkdir()
        images, used = [], set()
        for ad_id, path in zip(catalog.ad_ids.tolist(), catalog.image_paths.tolist()):
            if not path:
                images.append("")
                continue
            name = _image_file_name(ad_id, path, used)
            (folder / "images").mkdir(exist_ok=True)
            (folder / "images" / name).write_bytes(access.read(path))
            images.append(f"images/{name}")
        columns = {AD_ID: catalog.ad_ids, TEXT: catalog.texts, IMAGE: str_array(images)}
        pd.DataFrame({**columns, **catalog.fields.cells}).to_csv(folder / ADS_FILENAMES[0], index=False)
        if catalog.fields.specs:
            write_field_specs(folder, catalog.fields.specs)
        flags = clicks.pseudonymized[clicks.user_codes]
        stem = Path(clicks_name).stem
        for pseudonymized, column, name in (
            (False, USER_ID, clicks_name),
            (True, USER_PSEUDONYM, f"{stem}-pseudonymized.csv"),
        ):
            rows = np.flatnonzero(flags == pseudonymized)
            if len(rows) or (not pseudonymized and not flags.any()):
                pd.DataFrame(
                    {
                        column: clicks.user_vocab[clicks.user_codes[rows]],
                        AD_ID: clicks.ad_vocab[clicks.ad_codes[rows]],
                        WEIGHT: clicks.weights[rows],
                    }
                ).to_csv(folder / CLICKS_DIRNAME / name, index=False)

    write_folder_atomically(Path(out_dir), fill, overwrite=overwrite)


def _image_file_name(ad_id: str, path: str, used: set[str]) -> str:
    """A file name for an ad's copied image that cannot leave the images folder."""
    suffix = Path(path).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", Path(path).suffix) else ""
    stem = (
        ad_id
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", ad_id)
        else ("ad-" + hashlib.sha256(ad_id.encode("utf-8", "surrogatepass")).hexdigest()[:16])
    )
    name, n = stem + suffix, 1
    while name.lower() in used:
        n += 1
        name = f"{stem}-{n}{suffix}"
    used.add(name.lower())
    return name
