"""File click sources (``adrec_assets.sources.files``): discovery, round trip, every kind of
bad input (each reported as a ``SourceError`` naming the source, the file, the row and the
fix, never quoting a user id), image-path confinement, unknown-ad policy, size limits,
already-pseudonymized ids, atomic writing, and chunked reading of a large file with bounded
memory.

All inputs are written by the tests themselves into ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec_assets.ml.encoders.base import ImageRefused
from adrec_assets.ml.types import AdCatalog, ArtifactError, check_unit_rows
from adrec_assets.privacy import pseudonymize
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources import AdReadReport, RawClicks, synthetic
from adrec_assets.sources.files import (
    ClickReadReport,
    FileSource,
    SourceError,
    SourceLimits,
    list_sources,
    read_ads,
    read_clicks,
    source_fingerprint,
    write_source,
)

CATALOG_IMAGES = Path(__file__).resolve().parents[1] / "data" / "catalog" / "images"
PNG = CATALOG_IMAGES / "ad-running-13.png"

# ---------------------------------------------------------------- a valid source, written by the tests

AD_IDS = [f"ad-{i}" for i in range(6)]
AD_TEXTS = [
    "Trail running shoes with aggressive lugs for rocks, roots and rain.",
    "Cushioned road running shoes: trade in your old pair for 25% off.",
    "Start investing with just 5 pounds in low-cost index funds.",
    "An easy-access savings account with no monthly fees.",
    "Hot pizza delivered in 30 minutes or it is free.",
    "Fresh sushi night: two rolls for the price of one on Fridays.",
]
N_USERS = 10
CLICKS_PER_USER = 4  # user u clicks ads u, u+1, u+2, u+3 (mod 6): plenty of co-click pairs
CLICK_COLUMNS = ["user_id", "ad_id", "timestamp", "weight"]


def valid_click_rows() -> list[tuple[str, str, int, float]]:
    return [
        (f"user-{u:02d}", AD_IDS[(u + k) % len(AD_IDS)], 1_700_000_000 + 10 * u + k, 1.0 + (k % 2))
        for u in range(N_USERS)
        for k in range(CLICKS_PER_USER)
    ]


def write_valid_source(
    root: Path,
    name: str = "shop",
    ads_format: str = "csv",
    clicks_format: str = "csv",
    images: dict[int, str] | None = None,
) -> Path:
    """``<root>/<name>/`` with 6 ads and 40 clicks by 10 users in ``clicks/part-000.<fmt>``.

    ``images`` maps an ad index to its (relative) image path; the files are not created here.
    """
    folder = root / name
    (folder / "clicks").mkdir(parents=True)
    ads = pd.DataFrame({"ad_id": AD_IDS, "text": AD_TEXTS})
    if images is not None:
        ads["image"] = [images.get(i, "") for i in range(len(AD_IDS))]
    if ads_format == "csv":
        ads.to_csv(folder / "ads.csv", index=False)
    elif ads_format == "parquet":
        ads.to_parquet(folder / "ads.parquet", index=False)
    else:
        with open(folder / "ads.jsonl", "w", encoding="utf-8") as handle:
            for record in ads.to_dict(orient="records"):
                handle.write(json.dumps(record) + "\n")
    clicks = pd.DataFrame(valid_click_rows(), columns=CLICK_COLUMNS)
    if clicks_format == "csv":
        clicks.to_csv(folder / "clicks" / "part-000.csv", index=False)
    else:
        clicks.to_parquet(folder / "clicks" / "part-000.parquet", index=False)
    return folder


def write_ads_csv(folder: Path, body: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ads.csv"
    path.write_bytes(body.encode("utf-8") if isinstance(body, str) else body)
    return path


def write_clicks(folder: Path, body: str | bytes, name: str = "part-000.csv") -> Path:
    (folder / "clicks").mkdir(parents=True, exist_ok=True)
    for old in (folder / "clicks").iterdir():
        old.unlink()
    path = folder / "clicks" / name
    path.write_bytes(body.encode("utf-8") if isinstance(body, str) else body)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


GOOD_ADS_CSV = "ad_id,text\n" + "".join(f"{a},{t.replace(',', ' ')}\n" for a, t in zip(AD_IDS, AD_TEXTS))


def source_with_ads(root: Path, name: str = "src") -> Path:
    folder = root / name
    write_ads_csv(folder, GOOD_ADS_CSV)
    return folder


def load_both(folder: Path, **kwargs) -> tuple[RawClicks, ClickReadReport]:
    return read_clicks(folder, read_ads(folder).ad_ids, **kwargs)


def source_error(call, *fragments: str) -> str:
    """Run ``call``; it must raise SourceError whose message holds every fragment."""
    with pytest.raises(SourceError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def click_triples(clicks: RawClicks) -> list[tuple[str, str, float]]:
    return sorted(
        zip(
            clicks.user_vocab[clicks.user_codes].tolist(),
            clicks.ad_vocab[clicks.ad_codes].tolist(),
            clicks.weights.tolist(),
        )
    )


def expected_triples() -> list[tuple[str, str, float]]:
    return sorted((u, a, w) for u, a, _, w in valid_click_rows())


# ---------------------------------------------------------------- discovery, fingerprint, round trip


def test_list_sources_only_lists_folders_with_an_ads_file(tmp_path):
    write_valid_source(tmp_path, "csv-src")
    write_valid_source(tmp_path, "parquet-src", ads_format="parquet")
    write_valid_source(tmp_path, "jsonl-src", ads_format="jsonl")
    (tmp_path / "clicks-only" / "clicks").mkdir(parents=True)
    (tmp_path / "clicks-only" / "clicks" / "part-000.csv").write_text("user_id,ad_id\nu,a\n")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "wrong-name").mkdir()
    (tmp_path / "wrong-name" / "ads.tsv").write_text("ad_id\ttext\n")
    (tmp_path / "ads-is-a-folder" / "ads.csv").mkdir(parents=True)
    write_valid_source(tmp_path, ".hidden")
    (tmp_path / "ads.csv").write_text(GOOD_ADS_CSV)  # a file at the root is not a source
    assert list_sources(tmp_path) == ["csv-src", "jsonl-src", "parquet-src"]
    assert list_sources(tmp_path / "does-not-exist") == []


def test_source_fingerprint_changes_only_with_ads_or_click_files(tmp_path):
    folder = write_valid_source(tmp_path)
    first = source_fingerprint(folder)
    assert source_fingerprint(folder) == first
    # Files that are not part of the source do not count.
    (folder / "README.md").write_text("notes")
    (folder / "images").mkdir()
    (folder / "images" / "x.png").write_bytes(b"png")
    (folder / "clicks" / "notes.txt").write_text("not clicks")
    (folder / "clicks" / ".part-001.csv.tmp").write_text("user_id,ad_id\n")
    (folder / "clicks" / ".hidden.csv").write_text("user_id,ad_id\n")
    assert source_fingerprint(folder) == first
    # Appending to a click file changes it.
    with open(folder / "clicks" / "part-000.csv", "a") as handle:
        handle.write("user-00,ad-5,1700000999,1.0\n")
    appended = source_fingerprint(folder)
    assert appended != first
    assert source_fingerprint(folder) == appended
    # So does a new click file...
    write_parquet(folder / "clicks" / "part-001.parquet", {"user_id": ["user-01"], "ad_id": ["ad-0"]})
    added = source_fingerprint(folder)
    assert added not in (first, appended)
    # ... and a rewritten ads file.
    (folder / "ads.csv").write_text(GOOD_ADS_CSV + "ad-6,A new ad\n")
    assert source_fingerprint(folder) not in (first, appended, added)


def test_write_source_round_trips_through_read_ads_and_read_clicks(tmp_path):
    image = tmp_path / "elsewhere" / "shoe.png"
    image.parent.mkdir()
    shutil.copyfile(PNG, image)
    catalog = AdCatalog(
        ad_ids=np.asarray(AD_IDS),
        texts=np.asarray(["Text, with a comma", 'and "quotes"', "café ünïcode", "d", "e", "f"]),
        image_paths=np.asarray([str(image), "", "", "", "", ""]),
        image_root=str(image.parent),
    )
    users = np.asarray(["user-a", "user-b", "user-c"])
    clicks = RawClicks(
        user_vocab=users,
        user_codes=np.asarray([0, 0, 1, 2, 2, 1]),
        ad_vocab=np.asarray(AD_IDS),
        ad_codes=np.asarray([0, 1, 1, 2, 5, 0]),
        weights=np.asarray([1.0, 2.0, 0.5, 1.0, 3.0, 1.0], dtype=np.float32),
    )
    out = tmp_path / "sources" / "written"
    write_source(out, catalog, clicks)
    assert list_sources(out.parent) == ["written"]
    assert (out / "images" / "ad-0.png").read_bytes() == PNG.read_bytes()  # copied in: self-contained
    back = read_ads(out)
    assert back.ad_ids.tolist() == catalog.ad_ids.tolist()
    assert back.texts.tolist() == catalog.texts.tolist()
    assert back.image_paths.tolist() == [str((out / "images" / "ad-0.png").resolve()), "", "", "", "", ""]
    back_clicks, report = read_clicks(out, back.ad_ids)
    assert report == ClickReadReport(n_files=1, n_rows=6, n_unknown_ad_rows=0)
    assert click_triples(back_clicks) == click_triples(clicks)


@pytest.mark.parametrize("ads_format", ["csv", "parquet", "jsonl"])
@pytest.mark.parametrize("clicks_format", ["csv", "parquet"])
def test_every_format_reads_the_same(tmp_path, ads_format, clicks_format):
    folder = write_valid_source(tmp_path, ads_format=ads_format, clicks_format=clicks_format)
    catalog = read_ads(folder)
    assert catalog.ad_ids.tolist() == AD_IDS
    assert catalog.texts.tolist() == AD_TEXTS
    assert catalog.image_paths.tolist() == [""] * 6
    clicks, report = read_clicks(folder, catalog.ad_ids)
    assert report == ClickReadReport(n_files=1, n_rows=40, n_unknown_ad_rows=0)
    assert len(clicks) == 40 and len(clicks.user_vocab) == N_USERS
    assert clicks.ad_vocab.tolist() == AD_IDS
    assert clicks.user_codes.dtype == clicks.ad_codes.dtype == np.int64 and clicks.weights.dtype == np.float32
    assert click_triples(clicks) == expected_triples()


def test_several_click_files_and_small_chunks_give_the_same_clicks(tmp_path):
    folder = write_valid_source(tmp_path)
    rows = pd.read_csv(folder / "clicks" / "part-000.csv", dtype=str)
    (folder / "clicks" / "part-000.csv").unlink()
    rows.iloc[:15].to_csv(folder / "clicks" / "a.csv", index=False)
    rows.iloc[15:].to_parquet(folder / "clicks" / "b.parquet", index=False)
    for chunk_rows in (1, 3, 7, 500_000):
        clicks, report = load_both(folder, chunk_rows=chunk_rows)
        assert report == ClickReadReport(n_files=2, n_rows=40, n_unknown_ad_rows=0), chunk_rows
        assert click_triples(clicks) == expected_triples(), chunk_rows


def test_resource_reads_a_file_source_and_refuses_a_missing_folder(tmp_path):
    write_valid_source(tmp_path)
    resource = ClickSourceResource(root=str(tmp_path), chunk_rows=7)
    source = resource.source("shop")
    ads = source.read_ads()
    assert ads.ad_ids.tolist() == AD_IDS
    clicks, report = source.read_clicks(ads.ad_ids)
    assert report.n_rows == 40 and click_triples(clicks) == expected_triples()
    source_error(lambda: resource.source("nope"), "'nope'", str(tmp_path / "nope"), "create it with ads.csv")


def test_no_ads_file_and_several_ads_files(tmp_path):
    folder = tmp_path / "src"
    (folder / "clicks").mkdir(parents=True)
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "no ads file",
        "add one of ads.csv, ads.parquet, ads.jsonl",
    )
    write_ads_csv(folder, GOOD_ADS_CSV)
    pd.DataFrame({"ad_id": AD_IDS, "text": AD_TEXTS}).to_parquet(folder / "ads.parquet")
    source_error(lambda: read_ads(folder), "source 'src'", "ads.csv, ads.parquet", "keep exactly one")


def test_no_click_files(tmp_path):
    folder = source_with_ads(tmp_path)
    source_error(lambda: load_both(folder), "source 'src'", "no click files", "add .csv or .parquet files")


# ---------------------------------------------------------------- 1. missing / misnamed columns

# Column problems concern the header rather than a data row: the message names the columns it found
# and the fix (it gives no line number; the header is line 1).


@pytest.mark.parametrize(
    "header, fix",
    [
        ("text", "expected columns ad_id, text[, image]"),
        ("ad_id", "expected columns ad_id, text[, image]"),
        ("AdID,text", "rename column 'AdID' to 'ad_id'"),
        ("ad id,text", "rename column 'ad id' to 'ad_id'"),
        ("Ad-ID,text", "rename column 'Ad-ID' to 'ad_id'"),
        ("ad_id,Text", "rename column 'Text' to 'text'"),
    ],
)
def test_ads_csv_missing_or_misnamed_column(tmp_path, header, fix):
    folder = tmp_path / "src"
    n_columns = header.count(",") + 1
    write_ads_csv(folder, header + "\n" + "".join(",".join(["x"] * n_columns) + "\n" for _ in range(2)))
    message = source_error(lambda: read_ads(folder), "source 'src'", "ads.csv", "missing column(s)", "Fix: " + fix)
    assert f"found {header.split(',')}" in message


def test_ads_parquet_misnamed_column(tmp_path):
    folder = tmp_path / "src"
    write_parquet(folder / "ads.parquet", {"AdID": AD_IDS, "text": AD_TEXTS})
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.parquet",
        "missing column(s) ['ad_id']",
        "rename column 'AdID' to 'ad_id'",
    )


@pytest.mark.parametrize(
    "header, fix",
    [
        ("user_id", "expected columns user_id or user_pseudonym, ad_id[, timestamp, weight]"),
        ("user_id,AdID", "rename column 'AdID' to 'ad_id'"),
        ("user_id,ad id", "rename column 'ad id' to 'ad_id'"),
        ("UserID,ad_id", "rename column 'UserID' to 'user_id'"),
        ("User ID,ad_id", "rename column 'User ID' to 'user_id'"),
    ],
)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_clicks_missing_or_misnamed_column(tmp_path, header, fix, fmt):
    folder = source_with_ads(tmp_path)
    columns = header.split(",")
    if fmt == "csv":
        write_clicks(folder, header + "\n" + "".join(",".join(["ad-0"] * len(columns)) + "\n" for _ in range(3)))
    else:
        write_parquet(folder / "clicks" / "part-000.parquet", {c: ["ad-0"] * 3 for c in columns})
    message = source_error(
        lambda: load_both(folder), "source 'src'", f"part-000.{fmt}", "missing column(s)", "Fix: " + fix
    )
    assert f"found {columns}" in message


def test_ads_csv_with_a_repeated_column_is_refused_not_renamed(tmp_path):
    """pandas would silently read the second 'ad_id' as 'ad_id.1'; which one is meant is unknowable."""
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text,ad_id\nad-0,hello,ad-9\nad-1,world,ad-8\n")
    source_error(lambda: read_ads(folder), "source 'src'", "ads.csv", "column(s) ['ad_id'] more than once")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_clicks_with_a_repeated_column_are_refused(tmp_path, fmt):
    folder = source_with_ads(tmp_path)
    if fmt == "csv":
        write_clicks(folder, "user_id,ad_id,user_id\nu1,ad-0,u2\n")
    else:
        (folder / "clicks").mkdir(parents=True, exist_ok=True)
        columns = [pa.array(["u1"]), pa.array(["ad-0"]), pa.array(["u2"])]
        pq.write_table(
            pa.Table.from_arrays(columns, names=["user_id", "ad_id", "user_id"]), folder / "clicks" / "part-000.parquet"
        )
    source_error(lambda: load_both(folder), "source 'src'", f"part-000.{fmt}", "column(s) ['user_id'] more than once")


# ---------------------------------------------------------------- 2. wrong types


@pytest.mark.parametrize(
    "ad_ids, shown",
    [([1.0, 2.0, 3.0], "ad_id=1.0 of type float"), ([True, False, True], "ad_id=True of type bool")],
)
def test_parquet_ads_with_non_string_ad_id(tmp_path, ad_ids, shown):
    folder = tmp_path / "src"
    write_parquet(folder / "ads.parquet", {"ad_id": ad_ids, "text": AD_TEXTS[:3]})
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.parquet",
        f"row 1 has {shown}",
        "must be a string (or an integer)",
    )


def test_parquet_ads_with_integer_ad_id_are_accepted(tmp_path):
    folder = tmp_path / "src"
    write_parquet(folder / "ads.parquet", {"ad_id": pa.array([7, 8, 9], pa.int64()), "text": AD_TEXTS[:3]})
    assert read_ads(folder).ad_ids.tolist() == ["7", "8", "9"]


@pytest.mark.parametrize("text, kind", [(42, "a int, not text"), (4.5, "a float, not text"), ("   ", "empty")])
def test_jsonl_ads_text_not_a_string(tmp_path, text, kind):
    folder = tmp_path / "src"
    folder.mkdir()
    lines = [{"ad_id": "a", "text": "fine"}, {"ad_id": "b", "text": "fine too"}, {"ad_id": "c", "text": text}]
    (folder / "ads.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.jsonl",
        f"line 3 has text that is {kind}",
        "every ad needs ad copy",
    )


def test_csv_ads_empty_text_names_the_line(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text\na,x\nb,\nc,z\n")
    source_error(lambda: read_ads(folder), "source 'src'", "ads.csv", "line 3 has text that is empty")


def test_csv_line_numbers_count_the_line_breaks_inside_quoted_text(tmp_path):
    """Ad copy may span lines; the row after it starts where an editor shows it."""
    folder = tmp_path / "src"
    write_ads_csv(folder, 'ad_id,text\na,"first line\nsecond line\nthird line"\n\nb,\n')
    source_error(lambda: read_ads(folder), "source 'src'", "ads.csv", "line 6 has text that is empty")
    write_ads_csv(folder, 'ad_id,text\na,"two\nlines"\nc,ok\na,"x\ny"\n')
    source_error(lambda: read_ads(folder), "ad_id 'a' appears on lines 2 and 5")


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "-0.5", "nan", "NaN", "inf", "-inf", "1e400", ""])
def test_clicks_csv_bad_weight(tmp_path, bad):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"user_id,ad_id,weight\nu1,ad-0,1\nu2,ad-1,2.5\nu3,ad-2,{bad}\nu4,ad-3,1\n")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.csv",
        f"line 4 has weight={bad!r}",
        "it must be a finite number > 0",
    )


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf"), None])
def test_clicks_parquet_bad_weight(tmp_path, bad):
    folder = source_with_ads(tmp_path)
    write_parquet(
        folder / "clicks" / "part-000.parquet",
        {"user_id": ["u1", "u2", "u3"], "ad_id": ["ad-0", "ad-1", "ad-2"], "weight": pa.array([1.0, 2.0, bad])},
    )
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.parquet",
        "row 3 has weight=",
        "must be a finite number > 0",
    )


def test_clicks_bad_timestamp(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id,timestamp\nu1,ad-0,1700000000\nu2,ad-1,yesterday\n")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.csv",
        "line 3 has timestamp='yesterday'",
        "must be an integer",
    )


def test_bad_value_in_a_later_chunk_names_the_absolute_line(tmp_path):
    folder = source_with_ads(tmp_path)
    rows = [f"u{i},ad-{i % 6},1" for i in range(20)]
    rows[12] = "u12,ad-0,0"  # data row 13 -> line 14
    write_clicks(folder, "user_id,ad_id,weight\n" + "\n".join(rows) + "\n")
    for chunk_rows in (1, 3, 5, 100):
        source_error(lambda: load_both(folder, chunk_rows=chunk_rows), "line 14 has weight='0'")  # noqa: B023 - called at once
    write_parquet(
        folder / "clicks" / "part-000.parquet",
        {"user_id": [f"u{i}" for i in range(20)], "ad_id": ["ad-1"] * 20, "weight": [1.0] * 12 + [-1.0] + [1.0] * 7},
    )
    (folder / "clicks" / "part-000.csv").unlink()
    for chunk_rows in (1, 3, 5, 100):
        source_error(lambda: load_both(folder, chunk_rows=chunk_rows), "part-000.parquet", "row 13 has weight=")  # noqa: B023 - called at once


# ---------------------------------------------------------------- 3. empty files


def test_zero_byte_ads_csv(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, b"")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "the file is empty",
        "write a header row and data",
    )


def test_zero_byte_ads_jsonl(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ads.jsonl").write_bytes(b"")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.jsonl",
        "the file is empty",
        "one JSON object per line",
    )


def test_header_only_ads_csv(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text\n")
    source_error(lambda: read_ads(folder), "source 'src'", "ads.csv", "no ads", "add at least one row")


def test_header_only_clicks_csv(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id,weight\n")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.csv",
        "a header but no click rows",
        "add clicks or remove the file",
    )


def test_zero_byte_clicks_csv(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, b"")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.csv",
        "the file is empty",
        "write a header row and data, or remove it",
    )


def test_an_empty_click_file_next_to_good_ones_still_fails(tmp_path):
    folder = write_valid_source(tmp_path)
    (folder / "clicks" / "part-001.csv").write_bytes(b"")
    source_error(lambda: load_both(folder), "source 'shop'", "part-001.csv", "the file is empty")


# ---------------------------------------------------------------- 4. truncated parquet


def _truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_ads_parquet(tmp_path):
    folder = write_valid_source(tmp_path, "src", ads_format="parquet")
    _truncate_to_half(folder / "ads.parquet")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.parquet",
        "not a readable parquet file",
        "truncated",
        "rewrite it completely",
    )


def test_truncated_clicks_parquet(tmp_path):
    folder = write_valid_source(tmp_path, "src", clicks_format="parquet")
    _truncate_to_half(folder / "clicks" / "part-000.parquet")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.parquet",
        "not a readable parquet file",
        "truncated",
        "rewrite it completely",
    )


# ---------------------------------------------------------------- 5. non-UTF-8 text


def test_latin1_bytes_in_ads_csv(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, b"ad_id,text\na,Fresh coffee\nb,Our caf\xe9 opens early\nc,Tea\n")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "line 3 is not valid UTF-8",
        "re-save the file as UTF-8",
    )


def test_latin1_bytes_in_clicks_csv(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, b"user_id,ad_id\nu1,ad-0\ncaf\xe9,ad-1\nu3,ad-2\n")
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.csv",
        "line 3 is not valid UTF-8",
        "re-save the file as UTF-8",
    )


def test_latin1_bytes_deep_in_a_chunked_clicks_csv(tmp_path):
    folder = source_with_ads(tmp_path)
    lines = [b"user_id,ad_id"] + [b"u%d,ad-0" % i for i in range(30)]
    lines[25] = b"caf\xe9,ad-1"
    write_clicks(folder, b"\n".join(lines) + b"\n")
    source_error(lambda: load_both(folder, chunk_rows=4), "part-000.csv", "line 26 is not valid UTF-8")


def test_latin1_bytes_in_ads_jsonl(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ads.jsonl").write_bytes(
        b'{"ad_id": "a", "text": "Fresh coffee"}\n{"ad_id": "b", "text": "Tea"}\n{"ad_id": "c", "text": "caf\xe9"}\n'
    )
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.jsonl",
        "line 3 is not valid UTF-8",
        "re-save the file as UTF-8",
    )


def test_jsonl_broken_json_and_non_object(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ads.jsonl").write_text('{"ad_id": "a", "text": "x"}\n\n{"ad_id": "b", "text": \n')
    source_error(lambda: read_ads(folder), "source 'src'", "ads.jsonl", "line 3 is not valid JSON")
    (folder / "ads.jsonl").write_text('{"ad_id": "a", "text": "x"}\n["b", "y"]\n')
    source_error(lambda: read_ads(folder), "ads.jsonl", "line 2 must be a JSON object, got list")


# ---------------------------------------------------------------- 6. duplicate ad ids


def test_duplicate_ad_id_in_csv_names_both_lines(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text\na,x\nb,y\nc,z\na,again\n")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "ad_id 'a' appears on lines 2 and 5",
        "ad ids must be unique",
    )


def test_duplicate_ad_id_in_parquet_and_jsonl(tmp_path):
    folder = tmp_path / "pq"
    write_parquet(folder / "ads.parquet", {"ad_id": ["a", "b", "b"], "text": ["x", "y", "z"]})
    source_error(lambda: read_ads(folder), "source 'pq'", "ads.parquet", "ad_id 'b' appears on rows 2 and 3")
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "ads.jsonl").write_text(
        '{"ad_id": "a", "text": "x"}\n\n{"ad_id": "b", "text": "y"}\n{"ad_id": "a", "text": "z"}\n'
    )
    source_error(lambda: read_ads(folder), "source 'js'", "ads.jsonl", "ad_id 'a' appears on lines 1 and 4")


def test_csv_line_numbers_count_blank_lines(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text\na,x\n\nb,y\na,z\n")  # the duplicate is on physical line 5
    source_error(lambda: read_ads(folder), "ad_id 'a' appears on lines 2 and 5")


# ---------------------------------------------------------------- 7. clicks naming unknown ads


def _clicks_with_unknown(folder: Path, n_unknown: int) -> None:
    rows = [",".join(map(str, r)) for r in valid_click_rows()]
    # Put the unknown-ad clicks at the end, by a user who clicks nothing else.
    rows += [f"ghost-user,ad-404-{i},1700009999,1.0" for i in range(n_unknown)]
    write_clicks(folder, ",".join(CLICK_COLUMNS) + "\n" + "\n".join(rows) + "\n")


def test_few_unknown_ad_clicks_are_dropped_and_counted(tmp_path):
    folder = write_valid_source(tmp_path, "src")
    _clicks_with_unknown(folder, 1)  # 1 of 41 = 2.4% < 5%
    clicks, report = load_both(folder)
    assert report == ClickReadReport(
        n_files=1, n_rows=41, n_unknown_ad_rows=1, unknown_examples=["part-000.csv line 42: ad_id 'ad-404-0'"]
    )
    assert report.n_usable == 40 == len(clicks)
    assert click_triples(clicks) == expected_triples()
    assert "ghost-user" not in clicks.user_vocab.tolist()  # their only click was dropped
    assert clicks.ad_vocab.tolist() == AD_IDS


def test_unknown_ad_share_exactly_at_the_limit_passes(tmp_path):
    folder = write_valid_source(tmp_path, "src")
    rows = [",".join(map(str, r)) for r in valid_click_rows()[:38]] + ["u,gone-1,1,1", "u,gone-2,1,1"]
    write_clicks(folder, ",".join(CLICK_COLUMNS) + "\n" + "\n".join(rows) + "\n")  # 2 of 40 = 5.0%
    clicks, report = load_both(folder, max_unknown_ad_share=0.05)
    assert report.n_unknown_ad_rows == 2 and len(clicks) == 38


def test_too_many_unknown_ad_clicks_fail_naming_share_and_examples(tmp_path):
    folder = write_valid_source(tmp_path, "src")
    _clicks_with_unknown(folder, 5)  # 5 of 45 = 11.1%
    message = source_error(
        lambda: load_both(folder),
        "source 'src'",
        "5 of 45 clicks (11.1%)",
        "above the allowed 5.0%",
        "part-000.csv line 42: ad_id 'ad-404-0'",
        "part-000.csv line 44: ad_id 'ad-404-2'",
        "add the missing ads, or raise max_unknown_ad_share",
    )
    assert "ad-404-3" not in message  # at most three examples
    # Raising the share lets the same files through, dropping (and counting) the unknown clicks.
    clicks, report = load_both(folder, max_unknown_ad_share=0.2)
    assert report.n_unknown_ad_rows == 5 and report.n_usable == 40 == len(clicks)
    assert click_triples(clicks) == expected_triples()

    # The resource passes its setting through.
    def resource_clicks(resource: ClickSourceResource):
        source = resource.source("src")
        return source.read_clicks(source.read_ads().ad_ids)

    clicks, report = resource_clicks(ClickSourceResource(root=str(tmp_path), max_unknown_ad_share=0.2))
    assert report.n_unknown_ad_rows == 5 and len(clicks) == 40
    source_error(lambda: resource_clicks(ClickSourceResource(root=str(tmp_path))), "(11.1%)")


def test_unknown_ad_share_is_counted_across_files(tmp_path):
    folder = write_valid_source(tmp_path, "src")
    write_parquet(folder / "clicks" / "part-001.parquet", {"user_id": ["x", "y", "z"], "ad_id": ["n1", "n2", "ad-0"]})
    clicks, report = load_both(folder)  # 2 of 43 = 4.7%: allowed
    assert report.n_files == 2 and report.n_rows == 43 and report.n_unknown_ad_rows == 2
    assert report.unknown_examples == ["part-001.parquet row 1: ad_id 'n1'", "part-001.parquet row 2: ad_id 'n2'"]
    assert len(clicks) == 41 and "z" in clicks.user_vocab.tolist() and "x" not in clicks.user_vocab.tolist()


# ---------------------------------------------------------------- 8. null ids


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("user_id,ad_id\nu1,ad-0\nu2,ad-1\n,ad-2\n", "line 4 has an empty user_id"),
        ("user_id,ad_id\nu1,ad-0\nu2,ad-1\nu3,\n", "line 4 has an empty ad_id"),
    ],
)
def test_empty_ids_in_clicks_csv(tmp_path, body, fragment):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, body)
    source_error(lambda: load_both(folder), "source 'src'", "part-000.csv", fragment, "every row needs one")


def test_empty_ad_id_in_ads_csv(tmp_path):
    folder = tmp_path / "src"
    write_ads_csv(folder, "ad_id,text\na,x\n,y\n")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "line 3 has an empty ad_id",
        "every row needs one",
    )


@pytest.mark.parametrize("column", ["user_id", "ad_id"])
def test_none_ids_in_clicks_parquet(tmp_path, column):
    folder = source_with_ads(tmp_path)
    columns = {"user_id": ["u1", "u2", "u3"], "ad_id": ["ad-0", "ad-1", "ad-2"]}
    columns[column] = [columns[column][0], columns[column][1], None]
    write_parquet(folder / "clicks" / "part-000.parquet", columns)
    source_error(
        lambda: load_both(folder),
        "source 'src'",
        "part-000.parquet",
        f"row 3 has an empty {column}",
        "every row needs one",
    )


def test_none_ad_id_in_ads_parquet(tmp_path):
    folder = tmp_path / "src"
    write_parquet(folder / "ads.parquet", {"ad_id": ["a", None, "c"], "text": ["x", "y", "z"]})
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.parquet",
        "row 2 has an empty ad_id",
        "every row needs one",
    )


@pytest.mark.parametrize("record", ['{"ad_id": null, "text": "y"}', '{"text": "y"}'])
def test_null_or_absent_ad_id_in_ads_jsonl(tmp_path, record):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ads.jsonl").write_text('{"ad_id": "a", "text": "x"}\n' + record + "\n")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.jsonl",
        "line 2 has an empty ad_id",
        "every row needs one",
    )


def test_null_in_integer_id_column_names_the_null_row(tmp_path):
    folder = tmp_path / "pq"
    write_parquet(folder / "ads.parquet", {"ad_id": pa.array([1, 2, None], pa.int64()), "text": ["x", "y", "z"]})
    source_error(lambda: read_ads(folder), "row 3 has an empty ad_id")


def test_null_in_integer_user_id_column_of_clicks_parquet_names_the_null_row(tmp_path):
    folder = source_with_ads(tmp_path)
    write_parquet(
        folder / "clicks" / "part-000.parquet",
        {"user_id": pa.array([1, 2, None], pa.int64()), "ad_id": ["ad-0", "ad-1", "ad-2"]},
    )
    source_error(lambda: load_both(folder), "row 3 has an empty user_id")


def test_integer_user_ids_without_nulls_are_accepted(tmp_path):
    folder = source_with_ads(tmp_path)
    write_parquet(
        folder / "clicks" / "part-000.parquet", {"user_id": pa.array([10, 11, 10], pa.int64()), "ad_id": ["ad-0"] * 3}
    )
    clicks, _ = load_both(folder)
    assert sorted(clicks.user_vocab.tolist()) == ["10", "11"] and len(clicks) == 3


# ---------------------------------------------------------------- 9. image paths must stay inside the source


def _ads_with_image(folder: Path, image: str) -> None:
    write_ads_csv(folder, f"ad_id,text,image\na,first ad,\nb,second ad,{image}\nc,third ad,\n")


@pytest.mark.parametrize("image", ["../../etc/passwd", "images/../../outside.png", "../src-sibling/x.png"])
def test_image_path_climbing_out_is_refused(tmp_path, image):
    folder = tmp_path / "src"
    _ads_with_image(folder, image)
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        f"line 3 has image path {image!r} that resolves outside the source folder",
        "refused: keep images (and symlink targets) inside the source folder",
    )


def test_absolute_image_path_is_refused(tmp_path):
    folder = tmp_path / "src"
    _ads_with_image(folder, "/etc/passwd")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "line 3 has absolute image path '/etc/passwd'",
        "use a path relative to the source folder",
    )


def test_absolute_image_path_inside_the_folder_is_refused_too(tmp_path):
    folder = tmp_path / "src"
    (folder / "images").mkdir(parents=True)
    shutil.copyfile(PNG, folder / "images" / "b.png")
    _ads_with_image(folder, str(folder / "images" / "b.png"))
    source_error(lambda: read_ads(folder), "line 3 has absolute image path")


def test_symlink_pointing_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the encoder")
    folder = tmp_path / "src"
    (folder / "images").mkdir(parents=True)
    os.symlink(secret, folder / "images" / "b.png")
    _ads_with_image(folder, "images/b.png")
    source_error(
        lambda: read_ads(folder),
        "source 'src'",
        "ads.csv",
        "line 3 has image path 'images/b.png' that resolves outside the source folder",
        str(secret),
        "symlink targets",
    )


def test_symlinked_directory_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "shared-images"
    outside.mkdir()
    shutil.copyfile(PNG, outside / "b.png")
    folder = tmp_path / "src"
    folder.mkdir()
    os.symlink(outside, folder / "images")
    _ads_with_image(folder, "images/b.png")
    source_error(lambda: read_ads(folder), "line 3 has image path 'images/b.png' that resolves outside")


def test_symlink_inside_the_folder_and_plain_relative_paths_are_accepted(tmp_path):
    folder = tmp_path / "src"
    (folder / "images" / "real").mkdir(parents=True)
    shutil.copyfile(PNG, folder / "images" / "real" / "b.png")
    os.symlink(folder / "images" / "real" / "b.png", folder / "images" / "link.png")
    write_ads_csv(
        folder,
        "ad_id,text,image\na,first,images/link.png\nb,second,images/real/b.png\n"
        "c,third,images/real/../real/b.png\nd,fourth,\ne,fifth,images/not-there.png\n",
    )
    catalog = read_ads(folder)
    target = str((folder / "images" / "real" / "b.png").resolve())
    assert catalog.image_paths.tolist() == [
        target,
        target,
        target,
        "",
        str((folder / "images" / "not-there.png").resolve()),  # missing files are the encoder's business
    ]


def test_non_string_image_in_jsonl_is_refused(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "ads.jsonl").write_text('{"ad_id": "a", "text": "x"}\n{"ad_id": "b", "text": "y", "image": 7}\n')
    source_error(lambda: read_ads(folder), "source 'src'", "line 2 has image=7", "must be a relative path string")


# ---------------------------------------------------------------- 10. unreadable images fall back to text


def _source_with_bad_images(root: Path, name: str) -> Path:
    """Ad 0: a real PNG; ad 1: garbage bytes named .png; ad 2: a missing file; others: no image."""
    folder = write_valid_source(
        root, name, images={0: "images/good.png", 1: "images/garbage.png", 2: "images/missing.png"}
    )
    (folder / "images").mkdir()
    shutil.copyfile(PNG, folder / "images" / "good.png")
    (folder / "images" / "garbage.png").write_bytes(b"\x89PNG not really a png \x00\x01\x02" * 8)
    return folder


def test_corrupt_and_missing_images_fall_back_to_text_and_are_counted(tmp_path, encoder):
    folder = _source_with_bad_images(tmp_path, "src")
    catalog = read_ads(folder)  # not an error here
    names = [Path(p).name if p else "" for p in catalog.image_paths]
    assert names == ["good.png", "garbage.png", "missing.png", "", "", ""]
    result = encoder.encode(list(catalog.texts), [p or None for p in catalog.image_paths])
    assert result.has_image.tolist() == [True, False, False, False, False, False]
    assert result.n_image_failures == 2
    failures = {row: (path, reason) for row, path, reason in result.image_failures}
    assert sorted(failures) == [1, 2]
    assert failures[1][0] == catalog.image_paths[1] and failures[1][1].startswith("unreadable image")
    assert failures[2] == (catalog.image_paths[2], "file not found")
    text_only = encoder.encode(list(catalog.texts[:3]), [None, None, None]).vectors
    np.testing.assert_allclose(result.vectors[1:3], text_only[1:3], atol=1e-6)
    assert not result.vectors[1:3, 384:].any()  # no image half
    assert np.abs(result.vectors[0] - text_only[0]).max() > 1e-3  # the good image did contribute
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- 11. NaN / inf in vectors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_unit_rows_names_label_and_row(bad):
    vectors = np.eye(5, 768, dtype=np.float32)
    vectors[3, 7] = bad
    with pytest.raises(ArtifactError, match=r"ad_embeddings_raw\[shop\]: 1 rows contain NaN or inf \(first row 3\)"):
        check_unit_rows(vectors, "ad_embeddings_raw[shop]", dim=768)
    vectors[1, 0] = bad
    with pytest.raises(ArtifactError, match=r"2 rows contain NaN or inf \(first row 1\).*re-materialize"):
        check_unit_rows(vectors, "ad_embeddings_raw[shop]", dim=768)


# ---------------------------------------------------------------- 12. no usable clicks


def test_source_where_every_click_names_an_unknown_ad(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id\nu1,old-1\nu2,old-2\nu3,old-1\n")
    source_error(
        lambda: load_both(folder, max_unknown_ad_share=1.0),  # even when any share is allowed
        "source 'src'",
        "none of the 3 click rows in 1 file(s) is usable",
        "3 name ads missing from the ads file",
        "part-000.csv line 2: ad_id 'old-1'",
        "check that click ad_ids match the ads file",
    )


# ---------------------------------------------------------------- 13. a large file, read in chunks


def test_million_row_click_file_is_read_in_chunks_with_bounded_memory(tmp_path, monkeypatch):
    """1,000,000 clicks by 100,000 users. Reading with chunk_rows=100_000 must give the right
    clicks while the peak of Python-tracked memory stays well below what the rows need as Python
    strings (the object-dtype frame of the whole file, measured here).

    Measured when written: reference ~125 MB, chunked peak ~69 MB (40 MB of it is the 20 B/click
    result held twice during the final concatenation), unchunked (one 1M-row chunk) ~190 MB.
    """
    n_rows, n_users = 1_000_000, 100_000
    folder = tmp_path / "big"
    write_ads_csv(folder, GOOD_ADS_CSV)
    rng = np.random.default_rng(7)
    users = rng.permutation(np.arange(n_rows) % n_users) + 100_000  # every user clicks 10 times
    ad_index = rng.integers(0, len(AD_IDS), n_rows)
    (folder / "clicks").mkdir()
    path = folder / "clicks" / "huge.csv"
    pd.DataFrame({"user_id": np.char.add("u", users.astype(str)), "ad_id": np.asarray(AD_IDS)[ad_index]}).to_csv(
        path, index=False
    )
    # Reference: the whole file held at once as Python strings.
    whole = pd.read_csv(path, dtype=object, keep_default_na=False)
    assert len(whole) == n_rows and whole["user_id"].iloc[0] == f"u{users[0]}"
    python_strings_bytes = int(whole.memory_usage(deep=True).sum())
    del whole

    catalog = read_ads(folder)
    calls: list[dict] = []
    chunk_sizes: list[int] = []
    real_read_csv = pd.read_csv

    class CountingReader:
        def __init__(self, reader) -> None:
            self.reader = reader

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None:
            self.reader.close()

        def __iter__(self):
            for chunk in self.reader:
                chunk_sizes.append(len(chunk))
                yield chunk

    def spy_read_csv(*args, **kwargs):
        reader = real_read_csv(*args, **kwargs)
        if not kwargs.get("chunksize"):
            return reader  # the header row
        calls.append(kwargs)
        return CountingReader(reader)

    monkeypatch.setattr(pd, "read_csv", spy_read_csv)
    started = time.perf_counter()
    tracemalloc.start()
    try:
        clicks, report = read_clicks(folder, catalog.ad_ids, chunk_rows=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        monkeypatch.undo()
    seconds = time.perf_counter() - started

    assert [c.get("chunksize") for c in calls] == [100_000]
    assert max(chunk_sizes) == 100_000 and sum(chunk_sizes) == n_rows + 1  # the header row is read as a row too
    assert report == ClickReadReport(n_files=1, n_rows=n_rows, n_unknown_ad_rows=0)
    assert len(clicks) == n_rows and len(clicks.user_vocab) == n_users
    assert set(clicks.user_vocab.tolist()) == {f"u{u}" for u in range(100_000, 200_000)}
    np.testing.assert_array_equal(np.bincount(clicks.ad_codes, minlength=6), np.bincount(ad_index, minlength=6))
    assert clicks.user_vocab[clicks.user_codes[:3]].tolist() == [f"u{u}" for u in users[:3]]
    assert clicks.ad_vocab[clicks.ad_codes[-3:]].tolist() == np.asarray(AD_IDS)[ad_index[-3:]].tolist()
    assert (clicks.weights == 1.0).all()
    bound = 0.6 * python_strings_bytes
    assert peak < bound, (
        f"peak {peak / 1e6:.1f} MB >= bound {bound / 1e6:.1f} MB "
        f"(whole file as Python strings: {python_strings_bytes / 1e6:.1f} MB; read took {seconds:.1f} s)"
    )


# ---------------------------------------------------------------- 14. bounded inputs (SourceLimits)


def limited(folder: Path, **limits) -> FileSource:
    return FileSource(folder, folder.name, limits=SourceLimits(**limits))


def read_limited(folder: Path, **limits) -> tuple[RawClicks, ClickReadReport]:
    source = limited(folder, **limits)
    return source.read_clicks(source.read_ads().ad_ids)


def test_source_limits_defaults_and_refusal_of_non_positive_values():
    assert SourceLimits() == SourceLimits(
        max_text_chars=10_000, max_id_chars=256, max_image_bytes=32 * 2**20, max_click_rows_per_file=50_000_000
    )
    assert FileSource(Path("x"), "x").limits == SourceLimits()  # the old positional signature still works
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_id_chars must be a positive integer"):
            SourceLimits(max_id_chars=bad)


def test_ad_text_over_the_limit_is_cut_counted_and_reported(tmp_path, caplog):
    folder = tmp_path / "src"
    long_text = "Trail shoes for rocks and rain. " * 4
    write_ads_csv(folder, f"ad_id,text\na,short\nb,{long_text}\nc,{'x' * 40}\n")
    source = limited(folder, max_text_chars=40)
    with caplog.at_level(logging.WARNING, logger="adrec_assets.sources.files"):
        catalog, report = source.read_ads_with_report()
    assert catalog.texts.tolist() == ["short", long_text[:40], "x" * 40]  # exactly at the limit: kept whole
    assert report == AdReadReport(
        n_ads=3, n_texts_truncated=1, max_text_chars=40, truncated_examples=["ads.csv line 3: ad_id 'b'"]
    )
    assert report.metadata() == {
        "n_ad_texts_truncated": 1, "max_ad_text_chars": 40, "truncated_ad_examples": "ads.csv line 3: ad_id 'b'"
    }  # fmt: skip
    assert "1 ad texts longer than 40 characters were cut" in caplog.text and "ads.csv line 3" in caplog.text
    assert source.read_ads().texts.tolist() == catalog.texts.tolist()
    _, untouched = limited(folder, max_text_chars=len(long_text)).read_ads_with_report()
    assert untouched.n_texts_truncated == 0 and untouched.truncated_examples == []


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_over_long_ad_id_in_the_ads_file_fails_naming_file_and_row(tmp_path, fmt):
    folder = tmp_path / "src"
    ids = ["ok-1", "a" * 300, "ok-2"]
    if fmt == "csv":
        write_ads_csv(folder, "ad_id,text\n" + "".join(f"{i},some text\n" for i in ids))
        row = "line 3"
    elif fmt == "parquet":
        write_parquet(folder / "ads.parquet", {"ad_id": ids, "text": ["some text"] * 3})
        row = "row 2"
    else:
        folder.mkdir()
        (folder / "ads.jsonl").write_text("".join(json.dumps({"ad_id": i, "text": "t"}) + "\n" for i in ids))
        row = "line 2"
    source_error(
        lambda: read_ads(folder),
        f"ads.{fmt}",
        f"{row} has ad_id of 300 characters ('aaaa",
        "more than the limit of 256; shorten it or raise max_id_chars",
    )
    assert len(limited(folder, max_id_chars=300).read_ads().ad_ids[1]) == 300


@pytest.mark.parametrize("column", ["user_id", "ad_id"])
def test_over_long_click_id_fails_naming_the_row_and_never_showing_a_user_id(tmp_path, column):
    folder = source_with_ads(tmp_path)
    long_id = "secret-person-" + "z" * 300
    row = {"user_id": long_id, "ad_id": "ad-1"} if column == "user_id" else {"user_id": "u2", "ad_id": long_id}
    write_clicks(folder, f"user_id,ad_id\nu1,ad-0\n{row['user_id']},{row['ad_id']}\n")
    message = source_error(
        lambda: load_both(folder),
        "part-000.csv",
        f"line 3 has {column} of {len(long_id)} characters",
        "more than the limit of 256",
    )
    if column == "user_id":
        assert f"<redacted str of {len(long_id)} chars>" in message and "secret-person" not in message
    else:
        assert "secret-person" in message  # ad ids may be shown


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_click_file_over_the_row_limit_fails_naming_the_file(tmp_path, fmt):
    folder = write_valid_source(tmp_path, "src", clicks_format=fmt)  # 40 click rows
    evidence = "line 41 is data row 40" if fmt == "csv" else "it has 40"
    source_error(
        lambda: read_limited(folder, max_click_rows_per_file=39),
        "source 'src'",
        f"part-000.{fmt}",
        f"more than 39 data rows ({evidence})",
        "split it into files of at most 39 rows, or raise max_click_rows_per_file",
    )
    clicks, report = read_limited(folder, max_click_rows_per_file=40)
    assert report.n_rows == 40 and click_triples(clicks) == expected_triples()


def test_row_limit_stops_reading_before_the_rest_of_the_file(tmp_path):
    """The limit bounds the work: a bad value after the limit is never reached."""
    folder = source_with_ads(tmp_path)
    rows = [f"u{i},ad-{i % 6},1" for i in range(30)]
    rows[25] = "u25,ad-0,not-a-weight"
    write_clicks(folder, "user_id,ad_id,weight\n" + "\n".join(rows) + "\n")
    source = FileSource(folder, "src", chunk_rows=4, limits=SourceLimits(max_click_rows_per_file=10))
    read = lambda: source.read_clicks(source.read_ads().ad_ids)  # noqa: E731
    source_error(read, "more than 10 data rows (line 12 is data row 11)")
    source_error(lambda: load_both(folder), "line 27 has weight='not-a-weight'")


@pytest.mark.parametrize("weight", ["1e39", "-1e39", "1e-46", "3.5e38"])
def test_weight_that_does_not_survive_float32_is_refused(tmp_path, weight):
    """Finite (and for 1e-46 positive) in float64, but inf or 0 once stored as float32."""
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"user_id,ad_id,weight\nu1,ad-0,1\nu2,ad-1,{weight}\n")
    message = source_error(lambda: load_both(folder), "part-000.csv", f"line 3 has weight='{weight}'; it must be")
    if not weight.startswith("-"):
        assert "a finite number > 0 that stays so as float32 (from 1.4e-45 to 3.4e+38)" in message


def test_weights_at_the_float32_extremes_are_kept_exactly(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id,weight\nu1,ad-0,3e38\nu2,ad-1,1e-44\nu3,ad-2,0.1\n")
    clicks, _ = load_both(folder)
    assert clicks.weights.dtype == np.float32
    np.testing.assert_array_equal(clicks.weights, np.asarray([3e38, 1e-44, 0.1], dtype=np.float32))
    assert (clicks.weights > 0).all() and np.isfinite(clicks.weights).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_timestamp_outside_int64_is_refused(tmp_path, fmt):
    folder = source_with_ads(tmp_path)
    if fmt == "csv":
        write_clicks(folder, "user_id,ad_id,timestamp\nu1,ad-0,-9223372036854775808\nu2,ad-1,9223372036854775808\n")
        shown = "line 3 has timestamp='9223372036854775808'"
    else:
        write_parquet(
            folder / "clicks" / "part-000.parquet",
            {"user_id": ["u1", "u2"], "ad_id": ["ad-0", "ad-1"], "timestamp": pa.array([1, 2**63], pa.uint64())},
        )
        shown = "row 2 has timestamp=9223372036854775808"
    source_error(
        lambda: load_both(folder),
        f"part-000.{fmt}",
        shown,
        "it must be an integer from -9223372036854775808 to 9223372036854775807",
    )


def test_timestamps_at_the_int64_extremes_are_accepted(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id,timestamp\nu1,ad-0,-9223372036854775808\nu2,ad-1,+9223372036854775807\n")
    clicks, report = load_both(folder)
    assert report.n_rows == 2 and len(clicks) == 2


def test_ids_and_texts_are_object_arrays_of_str_never_fixed_width(tmp_path):
    folder = write_valid_source(tmp_path, "src")
    catalog = read_ads(folder)
    clicks, _ = read_clicks(folder, catalog.ad_ids)
    for array in (catalog.ad_ids, catalog.texts, catalog.image_paths, clicks.user_vocab, clicks.ad_vocab):
        assert array.dtype == object and all(type(v) is str for v in array.tolist())


def test_a_500_kb_user_id_costs_its_own_length_not_its_length_times_the_users(tmp_path):
    """100,000 clicks by 1,000 users, one of whom has a 500 KB id (the limit raised to allow it).
    A fixed-width numpy vocabulary would hold 1,001 x 500,000 x 4 bytes (~1.9 GiB); object
    strings hold each id once. Measured when written: peak ~19 MiB."""
    folder = source_with_ads(tmp_path)
    rng = np.random.default_rng(3)
    users = [f"user-{u:04d}" for u in rng.integers(0, 1000, 100_000)]
    users[50_000] = "x" * 500_000
    ads = rng.integers(0, len(AD_IDS), 100_000)
    (folder / "clicks").mkdir()
    with open(folder / "clicks" / "part-000.csv", "w") as handle:
        handle.write("user_id,ad_id\n")
        handle.writelines(f"{u},ad-{a}\n" for u, a in zip(users, ads))
    source = limited(folder, max_id_chars=600_000)
    catalog = source.read_ads()
    tracemalloc.start()
    try:
        clicks, report = source.read_clicks(catalog.ad_ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.n_rows == 100_000 and len(clicks.user_vocab) == 1001
    assert clicks.user_vocab[clicks.user_codes[50_000]] == "x" * 500_000
    fixed_width_bytes = len(clicks.user_vocab) * 500_000 * 4
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB; fixed-width: {fixed_width_bytes / 2**30:.1f} GiB"


# ---------------------------------------------------------------- 15. every failure is a SourceError naming the file


SECRET_USER = "user-secret-4242"


@pytest.mark.parametrize(
    "error",
    [
        ValueError(f"could not convert {SECRET_USER!r}"),
        OverflowError(f"{SECRET_USER} too large"),
        UnicodeError(SECRET_USER),
        csv.Error(f"field {SECRET_USER}"),
        pa.ArrowInvalid(f"cannot cast {SECRET_USER}"),
        RuntimeError(SECRET_USER),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_any_parser_failure_on_a_click_file_is_a_source_error_that_hides_its_text(tmp_path, monkeypatch, error, fmt):
    """A click file holds user ids, so whatever a parser says about it (which may quote a cell) is
    reduced to its type, and the parser's exception is not chained into logged tracebacks."""
    folder = write_valid_source(tmp_path, "src", clicks_format=fmt)
    catalog = read_ads(folder)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(pd, "read_csv", failing)
    monkeypatch.setattr(pq, "ParquetFile", failing)
    with pytest.raises(SourceError) as info:
        read_clicks(folder, catalog.ad_ids)
    message = str(info.value)
    assert f"source 'src', file {folder / 'clicks' / f'part-000.{fmt}'}" in message
    assert type(error).__name__ in message and SECRET_USER not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_parser_failure_on_the_ads_file_keeps_its_text_and_cause(tmp_path, monkeypatch):
    folder = write_valid_source(tmp_path, "src")
    error = OverflowError("Python int too large to convert to C long")

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(pd, "read_csv", failing)
    with pytest.raises(SourceError) as info:
        read_ads(folder)
    assert "ads.csv: could not be read (OverflowError: Python int too large" in str(info.value)
    assert info.value.__cause__ is error


def test_a_user_id_of_the_wrong_type_is_redacted(tmp_path):
    folder = source_with_ads(tmp_path)
    write_parquet(folder / "clicks" / "part-000.parquet", {"user_id": [1.25, 2.5], "ad_id": ["ad-0", "ad-1"]})
    message = source_error(
        lambda: load_both(folder),
        "part-000.parquet",
        "row 1 has user_id=<redacted float of 4 chars> of type float",
        "must be a string (or an integer)",
    )
    assert "1.25" not in message


def test_a_click_file_without_a_header_row_does_not_show_its_first_user_id(tmp_path):
    """The first row is read as the header: its cells are not column names, and one is a user id."""
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"{SECRET_USER},ad-0\nu2,ad-1\n")
    message = source_error(
        lambda: load_both(folder),
        "part-000.csv",
        f"missing column(s) ['user_id' or 'user_pseudonym', 'ad_id']; found [<redacted str of {len(SECRET_USER)} chars>, "
        "<redacted str of 4 chars>]",
        "is the header row missing?",
    )
    assert SECRET_USER not in message


def test_a_short_row_is_reported_as_missing_fields_not_as_an_empty_value(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, "user_id,ad_id,weight\nu1,ad-0,1\n\nu2\n")
    source_error(lambda: load_both(folder), "part-000.csv", "line 4 has 1 fields, expected 3")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('user_id,ad_id\nu1,ad-0\nu2,"ad-1\nu3,ad-2\n', "line 3 opens a quoted field that is never closed"),
        ('user_id,ad_id\nu1,"ad\n-0"\nu2,ad-1,extra\n', "line 4 has 3 fields, expected 2"),  # after a quoted line break
    ],
)
def test_malformed_csv_names_the_editor_line(tmp_path, body, fragment):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, body)
    source_error(lambda: load_both(folder), "part-000.csv", fragment)


# ---------------------------------------------------------------- 16. already-pseudonymized user ids

KEY = b"test-key"


def test_clicks_with_user_pseudonyms_are_read_and_flagged(tmp_path):
    folder = source_with_ads(tmp_path)
    alice, bob = pseudonymize("alice", KEY), pseudonymize("bob", KEY)
    write_clicks(folder, f"user_pseudonym,ad_id,weight\n{alice},ad-0,1\n{bob},ad-1,2\n{alice},ad-2,1\n")
    clicks, report = load_both(folder)
    assert report.n_rows == 3
    assert clicks.user_vocab.tolist() == [alice, bob] and clicks.pseudonymized.tolist() == [True, True]
    assert click_triples(clicks) == sorted([(alice, "ad-0", 1.0), (bob, "ad-1", 2.0), (alice, "ad-2", 1.0)])


def test_a_raw_id_never_shares_a_user_with_a_pseudonym_of_the_same_text(tmp_path):
    folder = source_with_ads(tmp_path)
    looks_hashed = "0123456789abcdef0123456789abcdef"
    write_clicks(folder, f"user_id,ad_id\n{looks_hashed},ad-0\nu2,ad-1\n", name="a-raw.csv")
    write_parquet(folder / "clicks" / "b-pseudo.parquet", {"user_pseudonym": [looks_hashed], "ad_id": ["ad-2"]})
    clicks, report = load_both(folder)
    assert report.n_files == 2 and len(clicks) == 3
    assert clicks.user_vocab.tolist() == [looks_hashed, "u2", looks_hashed]
    assert clicks.pseudonymized.tolist() == [False, False, True]
    by_user = {(clicks.user_vocab[u], bool(clicks.pseudonymized[u])): clicks.ad_vocab[a]
               for u, a in zip(clicks.user_codes, clicks.ad_codes)}  # fmt: skip
    assert by_user == {(looks_hashed, False): "ad-0", ("u2", False): "ad-1", (looks_hashed, True): "ad-2"}


def test_a_click_file_with_both_user_id_and_user_pseudonym_is_refused(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"user_id,user_pseudonym,ad_id\nu1,{pseudonymize('u1', KEY)},ad-0\n")
    source_error(
        lambda: load_both(folder), "part-000.csv", "columns ['user_id', 'user_pseudonym']; keep exactly one of them"
    )


@pytest.mark.parametrize(
    "bad",
    ["0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcde", "raw-person-id-in-the-wrong-column"],
    ids=["uppercase", "31-chars", "raw-id"],
)
def test_a_malformed_pseudonym_fails_naming_the_row_without_showing_it(tmp_path, bad):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"user_pseudonym,ad_id\n{pseudonymize('a', KEY)},ad-0\n{bad},ad-1\n")
    message = source_error(
        lambda: load_both(folder),
        "part-000.csv",
        f"line 3 has user_pseudonym=<redacted str of {len(bad)} chars>, which is not 32 lowercase hex characters",
        "python -m adrec_assets.cli pseudonym",
    )
    assert bad not in message


def test_a_misnamed_pseudonym_column_gets_a_rename_hint(tmp_path):
    folder = source_with_ads(tmp_path)
    write_clicks(folder, f"User Pseudonym,ad_id\n{pseudonymize('a', KEY)},ad-0\n")
    source_error(
        lambda: load_both(folder),
        "missing column(s) ['user_id' or 'user_pseudonym']",
        "rename column 'User Pseudonym' to 'user_pseudonym'",
    )


def test_write_source_writes_raw_ids_and_pseudonyms_to_separate_files(tmp_path):
    alice = pseudonymize("alice", KEY)
    catalog = AdCatalog(np.asarray(AD_IDS), np.asarray(AD_TEXTS), np.asarray([""] * 6), "")
    clicks = RawClicks(
        user_vocab=np.asarray(["raw-1", alice, "raw-2"]),
        user_codes=np.asarray([0, 1, 1, 2]),
        ad_vocab=np.asarray(AD_IDS),
        ad_codes=np.asarray([0, 1, 2, 3]),
        weights=np.asarray([1.0, 2.0, 1.0, 0.5], dtype=np.float32),
        pseudonymized=np.asarray([False, True, False]),
    )
    out = tmp_path / "out"
    write_source(out, catalog, clicks)
    assert sorted(p.name for p in (out / "clicks").iterdir()) == ["clicks-pseudonymized.csv", "clicks.csv"]
    assert (out / "clicks" / "clicks-pseudonymized.csv").read_text().splitlines()[0] == "user_pseudonym,ad_id,weight"
    back, _ = read_clicks(out, read_ads(out).ad_ids)
    assert click_triples(back) == click_triples(clicks)
    flags = {u: bool(f) for u, f in zip(back.user_vocab.tolist(), back.pseudonymized.tolist())}
    assert flags == {"raw-1": False, "raw-2": False, alice: True}


# ---------------------------------------------------------------- 17. writing a source folder atomically


def small_source() -> tuple[AdCatalog, RawClicks]:
    catalog = AdCatalog(np.asarray(AD_IDS), np.asarray(AD_TEXTS), np.asarray([""] * 6), "")
    clicks = RawClicks(
        user_vocab=np.asarray(["a", "b"]), user_codes=np.asarray([0, 1, 1]), ad_vocab=np.asarray(AD_IDS),
        ad_codes=np.asarray([0, 1, 2]), weights=np.ones(3, dtype=np.float32),
    )  # fmt: skip
    return catalog, clicks


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_source_replaces_a_folder_only_when_asked_and_a_failed_write_changes_nothing(tmp_path, monkeypatch):
    catalog, clicks = small_source()
    parent = tmp_path / "sources"
    write_source(parent / "w", catalog, clicks)
    before = folder_bytes(parent / "w")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        write_source(parent / "w", catalog, clicks)

    original = pd.DataFrame.to_csv

    def failing_to_csv(self, *args, **kwargs):
        if "user_id" in self.columns:  # the clicks table: a partial file exists when it fails
            original(self.head(1), *args, **kwargs)
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="simulated"):
        write_source(parent / "w", catalog, clicks, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        write_source(parent / "new", catalog, clicks)
    monkeypatch.undo()
    assert [p.name for p in parent.iterdir()] == ["w"]  # no temp folder, no half-written "new"
    assert folder_bytes(parent / "w") == before

    more = RawClicks(clicks.user_vocab, np.asarray([0, 0, 1, 1]), clicks.ad_vocab, np.asarray([0, 1, 2, 3]),
                     np.ones(4, dtype=np.float32))  # fmt: skip
    write_source(parent / "w", catalog, more, overwrite=True)
    assert [p.name for p in parent.iterdir()] == ["w"]
    assert len(read_clicks(parent / "w", read_ads(parent / "w").ad_ids)[0]) == 4


def test_write_source_names_copied_images_so_they_stay_inside_the_folder(tmp_path):
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    shutil.copyfile(PNG, root / "img" / "shoe.png")
    ids = ["../../escape", "ok-id", "a/b"]
    catalog = AdCatalog(
        np.asarray(ids), np.asarray(["x", "y", "z"]), np.asarray([str(root / "img" / "shoe.png")] * 3), str(root)
    )
    clicks = RawClicks(np.asarray(["u"]), np.asarray([0, 0, 0]), np.asarray(ids), np.asarray([0, 1, 2]),
                       np.ones(3, dtype=np.float32))  # fmt: skip
    out = tmp_path / "sources" / "out"
    write_source(out, catalog, clicks)
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) == 3 and "ok-id.png" in images and all("/" not in n and not n.startswith(".") for n in images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog", "sources"]  # nothing written elsewhere
    back = read_ads(out)
    assert back.ad_ids.tolist() == ids
    assert all(Path(p).read_bytes() == PNG.read_bytes() for p in back.image_paths)


def test_write_source_reads_images_only_inside_the_catalogue_root(tmp_path):
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    shutil.copyfile(PNG, root / "img" / "shoe.png")
    catalog = AdCatalog(np.asarray(["a"]), np.asarray(["x"]), np.asarray([str(root / "img" / "shoe.png")]), str(root))
    (tmp_path / "private.png").write_bytes(b"not for copying")
    (root / "img" / "shoe.png").unlink()
    os.symlink(tmp_path / "private.png", root / "img" / "shoe.png")  # swapped in after the catalogue was made
    clicks = RawClicks(np.asarray(["u"]), np.asarray([0]), np.asarray(["a"]), np.asarray([0]), np.ones(1, np.float32))
    with pytest.raises(ImageRefused, match="is a symlink now"):
        write_source(tmp_path / "out", catalog, clicks)
    assert not (tmp_path / "out").exists()


def test_synthetic_cli_writes_a_readable_source_and_needs_overwrite_to_replace_it(tmp_path, capsys):
    out = tmp_path / "sources" / "demo"
    assert synthetic.main([str(out), "--n-users", "20"]) == 0
    catalog = read_ads(out)
    clicks, _ = read_clicks(out, catalog.ad_ids)
    assert len(catalog) == 220 and len(clicks.user_vocab) == 20
    assert synthetic.main([str(out), "--n-users", "30"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert synthetic.main([str(out), "--n-users", "30", "--overwrite"]) == 0
    assert len(read_clicks(out, catalog.ad_ids)[0].user_vocab) == 30
    assert [p.name for p in out.parent.iterdir()] == ["demo"]
