"""MovieLens -> file click source conversion: both layouts, filters, errors, CLI, atomicity,
and (when present next to the repo) the real ml-latest-small dataset."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from adrec_assets.sources import SourceError, files, movielens
from adrec_assets.sources.files import read_ads, read_clicks
from adrec_assets.sources.movielens import (
    ConversionReport,
    MovieLensFormatError,
    convert_movielens,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ML_LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared/datasets/ml-latest-small"

# ---------------------------------------------------------------- fixtures written by the tests

LATEST_MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Some Documentary (2015),(no genres listed)
4,Unrated Film (2001),Drama
"""
LATEST_RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,1000
1,2,2.5,1001
2,1,5.0,1002
2,3,3.0,1003
3,2,1.0,1004
3,999,4.5,1005
"""
LATEST_ADS = [  # ad_id, text, and the structured fields year and genres
    ("movie-1", "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy.", "1995",
     "Adventure|Animation|Children|Comedy|Fantasy"),
    ("movie-2", "American President, The (1995). Genres: Comedy, Drama, Romance.", "1995", "Comedy|Drama|Romance"),
    ("movie-3", "Some Documentary (2015).", "2015", ""),
    ("movie-4", "Unrated Film (2001). Genres: Drama.", "2001", "Drama"),
]  # fmt: skip


def _u_item_line(movie_id: int, title: str, genres: set[str], release: str = "01-Jan-1995") -> str:
    flags = "|".join("1" if g in genres else "0" for g in movielens.ML100K_GENRES)
    return f"{movie_id}|{title}|{release}||http://us.imdb.com/M/title-exact?x|{flags}"


U_ITEM = (
    "\n".join(
        [
            _u_item_line(1, "Toy Story (1995)", {"Animation", "Children's", "Comedy"}),
            _u_item_line(2, "Café Society (1995)", {"Drama"}),
            _u_item_line(3, "unknown", {"unknown"}, release=""),
            _u_item_line(4, "GoldenEye (1995)", {"Action", "Adventure", "Thriller"}),
        ]
    )
    + "\n"
)
U_DATA = "".join(
    f"{u}\t{m}\t{r}\t{t}\n"
    for u, m, r, t in [
        (196, 1, 5, 881250949),
        (196, 2, 3, 881250950),
        (22, 2, 4, 881250951),
        (22, 3, 1, 881250952),
        (7, 99, 4, 881250953),  # movie 99 is not in u.item
    ]
)
ML100K_ADS = [  # the year from the release date ("" when it is missing)
    ("movie-1", "Toy Story (1995). Genres: Animation, Children's, Comedy.", "1995", "Animation|Children's|Comedy"),
    ("movie-2", "Café Society (1995). Genres: Drama.", "1995", "Drama"),
    ("movie-3", "unknown.", "", ""),
    ("movie-4", "GoldenEye (1995). Genres: Action, Adventure, Thriller.", "1995", "Action|Adventure|Thriller"),
]


@pytest.fixture
def latest_dir(tmp_path: Path) -> Path:
    src = tmp_path / "ml-latest-tiny"
    src.mkdir()
    (src / "movies.csv").write_text(LATEST_MOVIES, encoding="utf-8")
    (src / "ratings.csv").write_text(LATEST_RATINGS, encoding="utf-8")
    return src


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    src = tmp_path / "ml-100k-tiny"
    src.mkdir()
    (src / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    (src / "u.data").write_text(U_DATA, encoding="ascii")
    return src


def _read_source(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "ad_fields.json",
        "ads.csv",
        "clicks",
        "clicks/ratings.csv",
    ]
    ads = pd.read_csv(out / "ads.csv", dtype=str, keep_default_na=False, encoding="utf-8")
    clicks = pd.read_csv(out / "clicks/ratings.csv", dtype={"user_id": str, "ad_id": str, "timestamp": "int64"})
    assert list(ads.columns) == ["ad_id", "text", "year", "genres"]
    assert list(clicks.columns) == ["user_id", "ad_id", "timestamp"]
    return ads, clicks


def _click_rows(clicks: pd.DataFrame) -> list[tuple[str, str, int]]:
    return [(u, a, int(t)) for u, a, t in clicks.itertuples(index=False)]


# ---------------------------------------------------------------- conversion


def test_latest_layout_exact_output(latest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sources" / "ml"
    report = convert_movielens(latest_dir, out)
    assert report == ConversionReport(
        layout="ml-latest",
        n_ads=4,
        n_clicks=5,
        n_users=3,
        n_dropped_below_rating=0,
        n_dropped_unknown_movie=1,
    )
    ads, clicks = _read_source(out)
    assert list(ads.itertuples(index=False, name=None)) == LATEST_ADS
    assert _click_rows(clicks) == [
        ("ml-user-1", "movie-1", 1000),
        ("ml-user-1", "movie-2", 1001),
        ("ml-user-2", "movie-1", 1002),
        ("ml-user-2", "movie-3", 1003),
        ("ml-user-3", "movie-2", 1004),
    ]
    assert "movie-4" in set(ads["ad_id"]) and "movie-4" not in set(clicks["ad_id"])  # cold ad
    assert set(clicks["ad_id"]) <= set(ads["ad_id"])


def test_latest_layout_min_rating(latest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    report = convert_movielens(latest_dir, out, min_rating=3.0)
    assert (report.n_clicks, report.n_users) == (3, 2)
    assert (report.n_dropped_below_rating, report.n_dropped_unknown_movie) == (2, 1)
    ads, clicks = _read_source(out)
    assert len(ads) == 4  # the rating filter never removes ads
    assert _click_rows(clicks) == [  # 3.0 == threshold is kept
        ("ml-user-1", "movie-1", 1000),
        ("ml-user-2", "movie-1", 1002),
        ("ml-user-2", "movie-3", 1003),
    ]


def test_100k_layout_latin1_to_utf8(ml100k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    report = convert_movielens(ml100k_dir, out)
    assert report == ConversionReport(
        layout="ml-100k",
        n_ads=4,
        n_clicks=4,
        n_users=2,
        n_dropped_below_rating=0,
        n_dropped_unknown_movie=1,
    )
    ads, clicks = _read_source(out)
    assert list(ads.itertuples(index=False, name=None)) == ML100K_ADS
    raw = (out / "ads.csv").read_bytes()
    assert "Café Society".encode() in raw and "Café".encode("latin-1") not in raw
    assert _click_rows(clicks) == [
        ("ml-user-196", "movie-1", 881250949),
        ("ml-user-196", "movie-2", 881250950),
        ("ml-user-22", "movie-2", 881250951),
        ("ml-user-22", "movie-3", 881250952),
    ]
    assert "movie-4" not in set(clicks["ad_id"])  # GoldenEye: unrated, cold ad


def test_100k_layout_min_rating(ml100k_dir: Path, tmp_path: Path) -> None:
    report = convert_movielens(ml100k_dir, tmp_path / "ml", min_rating=4)
    assert (report.n_clicks, report.n_users) == (2, 2)
    assert (report.n_dropped_below_rating, report.n_dropped_unknown_movie) == (2, 1)
    _, clicks = _read_source(tmp_path / "ml")
    assert _click_rows(clicks) == [
        ("ml-user-196", "movie-1", 881250949),
        ("ml-user-22", "movie-2", 881250951),
    ]


def test_converted_output_is_read_back_by_the_file_source(latest_dir: Path, tmp_path: Path) -> None:
    """The adapter writes the folder format the file source reads (it shares its constants)."""
    out = tmp_path / "sources" / "ml"
    convert_movielens(latest_dir, out)
    catalog = read_ads(out)
    assert catalog.ad_ids.tolist() == [row[0] for row in LATEST_ADS]
    assert catalog.fields.specs == movielens.MOVIE_FIELDS  # declared in ad_fields.json
    assert catalog.fields.cells["year"].tolist() == [row[2] for row in LATEST_ADS]
    assert catalog.fields.cells["genres"].tolist() == [row[3] for row in LATEST_ADS]
    clicks, report = read_clicks(out, catalog.ad_ids)
    assert report.n_rows == len(clicks) == 5
    assert sorted(clicks.user_vocab.tolist()) == ["ml-user-1", "ml-user-2", "ml-user-3"]
    assert (out / files.CLICKS_DIRNAME / movielens.CLICKS_FILE).is_file() and (out / files.ADS_FILENAMES[0]).is_file()


def test_format_errors_are_source_errors_and_never_show_a_user_id(latest_dir: Path, tmp_path: Path) -> None:
    (latest_dir / "ratings.csv").write_text(RATINGS_HEADER + "person-7,1,4.0,1001\n")
    with pytest.raises(SourceError) as err:
        convert_movielens(latest_dir, tmp_path / "out")
    assert isinstance(err.value, MovieLensFormatError)
    assert "ratings.csv: line 3 has userId=<redacted str of 8 chars>; it must be an integer" in str(err.value)
    assert "person-7" not in str(err.value)


def test_overwrite_replaces_and_empty_out_is_accepted(latest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    out.mkdir()  # an existing empty folder is fine without --overwrite
    convert_movielens(latest_dir, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_movielens(latest_dir, out)
    report = convert_movielens(latest_dir, out, min_rating=4.5, overwrite=True)
    assert report.n_clicks == 1
    _read_source(out)  # stale.txt is gone, the new source is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml", "ml-latest-tiny"]  # no temp/old leftovers


def test_no_clicks_left_is_refused(latest_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no ratings left to write as clicks"):
        convert_movielens(latest_dir, tmp_path / "out", min_rating=5.5)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- format errors


def test_folder_with_neither_layout(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    (src / "sub").mkdir(parents=True)
    (src / "movies.csv").write_text(LATEST_MOVIES)
    (src / "notes.txt").write_text("hi")
    with pytest.raises(MovieLensFormatError) as err:
        convert_movielens(src, tmp_path / "out")
    message = str(err.value)
    assert "found: movies.csv, notes.txt, sub/" in message
    assert "lacks ratings.csv" in message and "u.item + u.data" in message
    assert not (tmp_path / "out").exists()


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(MovieLensFormatError, match="does not exist"):
        convert_movielens(tmp_path / "nope", tmp_path / "out")


def test_missing_columns_named(latest_dir: Path, tmp_path: Path) -> None:
    (latest_dir / "ratings.csv").write_text("userId,movieId,rating\n1,1,4.0\n")
    expected = r"ratings\.csv: missing column\(s\) \['timestamp'\]; found \['userId', 'movieId', 'rating'\]"
    with pytest.raises(MovieLensFormatError, match=expected):
        convert_movielens(latest_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


RATINGS_HEADER = "userId,movieId,rating,timestamp\n1,1,4.0,1000\n"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("2,1,abc,1001\n", r"ratings\.csv: line 3 has rating='abc'; it must be a finite number"),
        ("\n2,1.5,4,1001\n", r"ratings\.csv: line 4 has movieId='1\.5'; it must be an integer"),  # blank line counts
        ("2,1,,1001\n", r"line 3 has rating=''; it must be a finite number"),
        ("2,1,nan,1001\n", r"line 3 has rating='nan'; it must be a finite number"),
        ("2,1,4,1001,9\n", r"line 3 has 5 fields, expected 4; fix the quoting or the number of ',' separators"),
        ("2,1,4,99999999999999999999\n", r"line 3 has timestamp='9{20}'; it must be an integer from"),
        ("2,1,4\n", r"line 3 has 3 fields, expected 4"),  # not "timestamp is empty": the field is missing
    ],
)
def test_unparsable_latest_rows_name_the_line(latest_dir: Path, tmp_path: Path, rows: str, expected: str) -> None:
    (latest_dir / "ratings.csv").write_text(RATINGS_HEADER + rows)
    with pytest.raises(MovieLensFormatError, match=expected):
        convert_movielens(latest_dir, tmp_path / "out")


def test_unparsable_100k_rows_name_the_line(ml100k_dir: Path, tmp_path: Path) -> None:
    (ml100k_dir / "u.data").write_text(U_DATA + "5\t1\t4\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.data: line 6 has 3 fields, expected 4"):
        convert_movielens(ml100k_dir, tmp_path / "out")
    (ml100k_dir / "u.data").write_text(U_DATA)
    bad_item = U_ITEM.replace("|0|0|0|0\n", "|0|0|0|2\n", 1).encode("latin-1")
    (ml100k_dir / "u.item").write_bytes(bad_item)
    with pytest.raises(MovieLensFormatError, match=r"u\.item: line 1 has field 24='2'; it must be 0 or 1"):
        convert_movielens(ml100k_dir, tmp_path / "out")


def test_latin1_movies_csv_is_reported(latest_dir: Path, tmp_path: Path) -> None:
    (latest_dir / "movies.csv").write_bytes((LATEST_MOVIES + "5,Café (2000),Drama\n").encode("latin-1"))
    with pytest.raises(MovieLensFormatError, match=r"movies\.csv: line 6 is not valid UTF-8 .*re-save the file as"):
        convert_movielens(latest_dir, tmp_path / "out")


def test_duplicate_movie_ids(latest_dir: Path, tmp_path: Path) -> None:
    (latest_dir / "movies.csv").write_text(LATEST_MOVIES + "2,Again (1999),Drama\n")
    expected = r"movies\.csv: movie id 2 appears on lines 3 and 6; movie ids must be unique"
    with pytest.raises(MovieLensFormatError, match=expected):
        convert_movielens(latest_dir, tmp_path / "out")


# ---------------------------------------------------------------- atomicity


def test_failure_while_writing_ratings_leaves_nothing(
    latest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pd.DataFrame.to_csv

    def failing_to_csv(self, *args, **kwargs):
        if "user_id" in self.columns:  # the clicks table
            original(self.head(2), *args, **kwargs)  # a partial file exists when it fails
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    parent = tmp_path / "sources"
    parent.mkdir()
    with pytest.raises(OSError, match="simulated"):
        convert_movielens(latest_dir, parent / "ml")
    assert list(parent.iterdir()) == []  # no OUT, no temp folder

    # An existing source being overwritten survives a failed overwrite untouched.
    monkeypatch.setattr(pd.DataFrame, "to_csv", original)
    convert_movielens(latest_dir, parent / "ml")
    before = {p.name: p.read_bytes() for p in (parent / "ml").rglob("*.csv")}
    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="simulated"):
        convert_movielens(latest_dir, parent / "ml", min_rating=4, overwrite=True)
    assert [p.name for p in parent.iterdir()] == ["ml"]
    assert {p.name: p.read_bytes() for p in (parent / "ml").rglob("*.csv")} == before


# ---------------------------------------------------------------- CLI


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adrec_assets.sources.movielens", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_success_prints_report(latest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    result = _cli(latest_dir, out, "--min-rating", "3")
    assert result.returncode == 0, result.stderr
    assert (
        "layout ml-latest: 4 ads, 3 clicks from 2 users; "
        "dropped 2 ratings below min rating and 1 ratings of unknown movies"
    ) in result.stdout
    _read_source(out)


def test_cli_neither_layout_exits_2(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "readme.md").write_text("x")
    (src / "u.data").write_text(U_DATA)
    result = _cli(src, tmp_path / "out")
    assert result.returncode == 2
    assert "is not a MovieLens folder" in result.stderr
    assert "found: readme.md, u.data" in result.stderr and "lacks u.item" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_out_without_overwrite(latest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli(latest_dir, out)
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _cli(latest_dir, out, "--overwrite").returncode == 0
    _read_source(out)


def test_module_does_not_import_dagster() -> None:
    code = "import sys, adrec_assets.sources.movielens; assert 'dagster' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


# ---------------------------------------------------------------- real data


def test_real_ml_latest_small(tmp_path: Path) -> None:
    if not (ML_LATEST_SMALL / "movies.csv").is_file():
        pytest.skip(f"real MovieLens data not available: {ML_LATEST_SMALL} is missing (never copy it into the repo)")
    out = tmp_path / "ml-latest-small"
    started = time.perf_counter()
    report = convert_movielens(ML_LATEST_SMALL, out)
    elapsed = time.perf_counter() - started
    print(f"ml-latest-small conversion: {elapsed:.2f} s")
    assert (report.layout, report.n_ads, report.n_clicks, report.n_users) == ("ml-latest", 9125, 100004, 671)
    assert (report.n_dropped_below_rating, report.n_dropped_unknown_movie) == (0, 0)
    ads, clicks = _read_source(out)
    assert (len(ads), len(clicks), clicks["user_id"].nunique()) == (9125, 100004, 671)
    assert ads["ad_id"].is_unique
    assert clicks["ad_id"].isin(set(ads["ad_id"])).all()
    toy_story = ads.loc[ads["ad_id"] == "movie-1", "text"].item()
    assert toy_story == "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy."
