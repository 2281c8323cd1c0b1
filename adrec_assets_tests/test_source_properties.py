"""Property: whatever a source folder holds (random bytes; truncated, mangled or mis-encoded CSV,
JSON lines and parquet; wrong types; huge, negative or non-finite numbers; missing, repeated or
misnamed columns; NULs, quotes and line breaks in cells), reading it with
``FileSource(...).read_ads()`` then ``.read_clicks(...)`` either succeeds with well-formed
results or raises a ``SourceError`` whose message names the offending file, never any other
exception.

Examples are generated deterministically (``derandomize=True``), so a failure reproduces.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adrec_assets.sources.files import FileSource, SourceError, SourceLimits

NAME = "prop"
LIMITS = SourceLimits(max_text_chars=40, max_id_chars=24, max_click_rows_per_file=12)
AD_HEADER = ["ad_id", "text", "image"]
CLICK_HEADER = ["user_id", "ad_id", "timestamp", "weight"]
ODD_NAMES = ["AdID", "User ID", "user_pseudonym", "Text", "", "ad_id ", "extra", "ad_id", "weight"]
AD_POOL = [f"ad-{i}" for i in range(4)]
ODD_CELLS = [
    "", " ", "nan", "NaN", "inf", "-inf", "0", "-0", "-1", "1e400", "1e-46", "3.5e38", "1e39",
    "9223372036854775808", "-9223372036854775809", "1" * 30, "9" * 5000, '"', '""', 'a"b', "\x00", "x\x00y",
    "\r", "\n", "\r\n", ",", "|", "\t", "../x.png", "/etc/passwd", "images/a.png", "images", "a" * 60,
    "0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF", "é", "\ufeff", "True", *AD_POOL,
]  # fmt: skip

cells = st.one_of(
    st.sampled_from(ODD_CELLS),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
)


@st.composite
def mangled(draw: st.DrawFn, data: bytes) -> bytes:
    """The bytes as written, cut short, with junk inserted, or with bytes overwritten."""
    how = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "insert", "overwrite"]))
    if how == "keep" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    junk = draw(st.binary(min_size=1, max_size=8))
    return data[:at] + junk + data[at + (len(junk) if how == "overwrite" else 0) :]


@st.composite
def delimited(draw: st.DrawFn, header: list[str], good_rows: st.SearchStrategy[list[list[str]]]) -> bytes:
    """A delimited file: usually the right header over good rows, maybe with a junk row put in,
    sometimes a random header; written by the csv module or naively joined (quotes and
    separators inside cells then break the structure), in some encoding, maybe mangled."""
    random_header = st.lists(st.sampled_from(header + ODD_NAMES), max_size=6)
    columns = draw(st.one_of(st.just(header), st.just(header), random_header))
    rows = draw(good_rows)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        rows.insert(draw(st.integers(0, len(rows))), draw(st.lists(cells, max_size=len(columns) + 2)))
    if draw(st.booleans()):
        buffer = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        writer = csv.writer(buffer, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
        writer.writerow(columns)
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = "".join(",".join(row) + "\n" for row in [columns, *rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return draw(mangled(text.encode(encoding, errors="replace")))


def _arrow_column(n: int) -> st.SearchStrategy[pa.Array]:
    def values(elements: st.SearchStrategy) -> st.SearchStrategy[list]:
        return st.lists(st.one_of(st.none(), elements), min_size=n, max_size=n)

    return st.one_of(
        values(st.one_of(st.sampled_from(ODD_CELLS), st.text(max_size=8))).map(lambda v: pa.array(v, pa.string())),
        values(st.integers(-(2**63), 2**63 - 1)).map(lambda v: pa.array(v, pa.int64())),
        values(st.integers(0, 2**64 - 1)).map(lambda v: pa.array(v, pa.uint64())),
        values(st.floats()).map(lambda v: pa.array(v, pa.float64())),
        values(st.booleans()).map(lambda v: pa.array(v, pa.bool_())),
        values(st.binary(max_size=6)).map(lambda v: pa.array(v, pa.binary())),
        values(st.lists(st.integers(-5, 5), max_size=3)).map(lambda v: pa.array(v, pa.list_(pa.int64()))),
        values(st.integers(-(2**40), 2**40)).map(lambda v: pa.array(v, pa.timestamp("s"))),
        values(st.sampled_from(AD_POOL)).map(lambda v: pa.array(v, pa.string()).dictionary_encode()),
    )


@st.composite
def parquet_file(draw: st.DrawFn, header: list[str], good_rows: st.SearchStrategy[list[list[str]]]) -> bytes:
    """Good rows as strings under the right names, or random names over columns of random types."""
    if draw(st.booleans()):
        names = list(header)
        rows = draw(good_rows)
        arrays = [pa.array([row[i] for row in rows], pa.string()) for i in range(len(names))]
    else:
        n = draw(st.integers(0, 6))
        names = draw(st.lists(st.sampled_from(header + ODD_NAMES), min_size=1, max_size=5))
        arrays = [draw(_arrow_column(n)) for _ in names]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), sink)
    return draw(mangled(sink.getvalue().to_pybytes()))


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10) | st.sampled_from(ODD_CELLS),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=5,
)


@st.composite
def jsonl_file(draw: st.DrawFn) -> bytes:
    record = st.dictionaries(st.sampled_from(AD_HEADER + ODD_NAMES), json_values, max_size=4)
    good = st.builds(lambda a, t: {"ad_id": a, "text": t}, st.sampled_from(AD_POOL), st.text(min_size=1, max_size=50))
    lines = draw(
        st.lists(
            st.one_of(
                good.map(json.dumps),
                record.map(json.dumps),  # ensure_ascii: lone surrogates arrive as escapes
                st.sampled_from(
                    [
                        "",
                        "[1, 2]",
                        "null",
                        "{",
                        '{"ad_id": 1e999, "text": "x"}',
                        '{"ad_id": NaN}',
                        '{"ad_id": ' + "1" * 5000 + "}",
                        "[" * 5000,
                    ]
                ),  # fmt: skip
                st.text(max_size=20),
            ),
            max_size=6,
        )
    )
    return draw(mangled("\n".join(lines).encode("utf-8", errors="replace")))


good_ad_rows = st.lists(
    st.tuples(st.text(min_size=1, max_size=60).filter(str.strip), st.sampled_from(["", "x.png", "../x.png"])),
    min_size=1,
    max_size=len(AD_POOL),
).map(lambda rows: [[ad_id, text, image] for ad_id, (text, image) in zip(AD_POOL, rows)])  # unique ids
good_click_rows = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2", "u3", "a-longer-user-id"]),
        st.sampled_from([*AD_POOL, *AD_POOL, "ad-gone"]),
        st.sampled_from(["1700000000", "-5", "0"]),
        st.sampled_from(["1", "2.5", "1e-3"]),
    ).map(list),
    min_size=1,
    max_size=14,  # over LIMITS.max_click_rows_per_file at the top end
)
PSEUDONYM_HEADER = ["user_pseudonym", "ad_id", "weight"]
good_pseudonym_rows = st.lists(
    st.tuples(
        st.sampled_from(["0123456789abcdef0123456789abcdef", "f" * 32]), st.sampled_from(AD_POOL), st.just("1")
    ).map(list),
    min_size=1,
    max_size=6,
)


def _ads_file(suffix: str) -> st.SearchStrategy[bytes]:
    content = {
        "csv": delimited(AD_HEADER, good_ad_rows),
        "parquet": parquet_file(AD_HEADER, good_ad_rows),
        "jsonl": jsonl_file(),
    }[suffix]
    return st.one_of(content, content, content, st.binary(max_size=64))


def _clicks_file(suffix: str) -> st.SearchStrategy[bytes]:
    kind = delimited if suffix == "csv" else parquet_file
    content = st.one_of(kind(CLICK_HEADER, good_click_rows), kind(PSEUDONYM_HEADER, good_pseudonym_rows))
    return st.one_of(content, content, content, st.binary(max_size=64))


@st.composite
def ads_folder(draw: st.DrawFn) -> dict[str, bytes]:
    """Relative path -> bytes: usually one fuzzed ads file (sometimes none or two) and a good click file."""
    files: dict[str, bytes] = {}
    n_ads_files = draw(st.sampled_from([1, 1, 1, 1, 0, 2]))
    for suffix in draw(st.permutations(["csv", "parquet", "jsonl"]))[:n_ads_files]:
        files[f"ads.{suffix}"] = draw(_ads_file(suffix))
    files["clicks/part-0.csv"] = GOOD_CLICKS
    return files


@st.composite
def clicks_folder(draw: st.DrawFn) -> dict[str, bytes]:
    """Relative path -> bytes: a good ads file and zero to three fuzzed click files."""
    files = {"ads.csv": GOOD_ADS}
    for i in range(draw(st.sampled_from([1, 1, 2, 3, 0]))):
        suffix = draw(st.sampled_from(["csv", "parquet"]))
        files[f"clicks/part-{i}.{suffix}"] = draw(_clicks_file(suffix))
    return files


GOOD_ADS = ("ad_id,text\n" + "".join(f"{ad_id},text of {ad_id}\n" for ad_id in AD_POOL)).encode()
GOOD_CLICKS = b"user_id,ad_id\nu1,ad-0\nu2,ad-1\nu1,ad-2\n"
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def read_succeeds_or_names_the_file(files: dict[str, bytes], chunk_rows: int, share: float) -> None:
    """Write ``files`` as a source folder and read it: a well-formed result, or a SourceError
    naming the file (or, for a problem of the folder as a whole, the source and its files)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / NAME
        (folder / "clicks").mkdir(parents=True)
        for relative, data in files.items():
            (folder / relative).write_bytes(data)
        source = FileSource(folder, NAME, max_unknown_ad_share=share, chunk_rows=chunk_rows, limits=LIMITS)
        try:
            catalog = source.read_ads()
            clicks, report = source.read_clicks(catalog.ad_ids)
        except SourceError as exc:
            message = str(exc)
            if f"source {NAME!r}, file " in message:  # a problem inside one file: its full path
                assert any(f"source {NAME!r}, file {folder / relative}" in message for relative in files), message
            else:
                assert message.startswith(f"source {NAME!r}: "), message
                assert str(folder) in message or any(Path(relative).name in message for relative in files), message
            return
    assert len(catalog) > 0 and all(len(text) <= LIMITS.max_text_chars for text in catalog.texts)
    assert len(clicks) == report.n_usable > 0
    assert clicks.user_vocab.dtype == object and clicks.pseudonymized.shape == clicks.user_vocab.shape
    assert clicks.weights.dtype == np.float32 and np.isfinite(clicks.weights).all() and (clicks.weights > 0).all()
    assert ((clicks.ad_codes >= 0) & (clicks.ad_codes < len(catalog))).all()
    assert ((clicks.user_codes >= 0) & (clicks.user_codes < len(clicks.user_vocab))).all()


@PROPERTY
@given(files=ads_folder(), chunk_rows=st.sampled_from([1, 3, 500_000]))
def test_reading_any_ads_file_succeeds_or_raises_a_source_error_naming_the_file(files, chunk_rows):
    read_succeeds_or_names_the_file(files, chunk_rows, share=1.0)


@PROPERTY
@given(files=clicks_folder(), chunk_rows=st.sampled_from([1, 3, 500_000]), share=st.sampled_from([0.0, 0.5, 1.0]))
def test_reading_any_click_files_succeeds_or_raises_a_source_error_naming_the_file(files, chunk_rows, share):
    read_succeeds_or_names_the_file(files, chunk_rows, share)
