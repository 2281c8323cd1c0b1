"""Convert a MovieLens folder into a file click source (plain Python, no Dagster).

Why: MovieLens gives real users with real interests over items with real text (title with
release year, genres), so the pipeline can be evaluated on something other than synthetic
clicks. Movies become ads, ratings become clicks, and movies nobody rated are the cold ads.

Licence: GroupLens data is for research use and may not be redistributed. Convert into a
git-ignored folder (the repo's .gitignore ignores ``data/sources/``) and never commit the
converted output or the dataset itself::

    python -m adrec_assets.sources.movielens path/to/ml-latest-small data/sources/ml-latest-small

Two layouts are detected automatically: ``ml-latest`` (``movies.csv`` + ``ratings.csv``,
also ml-latest-small, ml-20m, ml-25m) and ``ml-100k`` (``u.item`` + ``u.data``, latin-1).
Output: ``OUT/ads.csv`` (``ad_id``, ``text``) and ``OUT/clicks/ratings.csv`` (``user_id``,
``ad_id``, ``timestamp``), written into a hidden sibling folder and renamed into place, so
a watcher of OUT never sees a half-written source.

By default every rating is a click: rating a movie means having watched it, which is the
interest signal a click carries, low ratings included. ``--min-rating R`` keeps only ratings
``>= R`` (e.g. 4 for "liked"). The ml-100k "unknown" genre flag is not written as a genre.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

LAYOUT_LATEST = "ml-latest"
LAYOUT_100K = "ml-100k"
LAYOUT_FILES: dict[str, tuple[str, str]] = {
    LAYOUT_LATEST: ("movies.csv", "ratings.csv"),
    LAYOUT_100K: ("u.item", "u.data"),
}

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRES = "(no genres listed)"

ADS_FILE = "ads.csv"
CLICKS_DIR = "clicks"
CLICKS_FILE = "ratings.csv"


class MovieLensFormatError(ValueError):
    """The input folder is not a readable MovieLens dataset; the message names file and problem."""


@dataclass(frozen=True)
class ConversionReport:
    layout: str  # LAYOUT_LATEST or LAYOUT_100K
    n_ads: int  # every movie in the movie file, rated or not
    n_clicks: int  # ratings written as clicks
    n_users: int  # distinct users among the written clicks
    n_dropped_below_rating: int  # known-movie ratings below min_rating
    n_dropped_unknown_movie: int  # ratings of movies absent from the movie file

    def summary(self) -> str:
        return (
            f"layout {self.layout}: {self.n_ads} ads, {self.n_clicks} clicks from {self.n_users} users; "
            f"dropped {self.n_dropped_below_rating} ratings below min rating and "
            f"{self.n_dropped_unknown_movie} ratings of unknown movies"
        )


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _TableSpec:
    """How to read one delimited file: column kinds are 'int', 'float', 'text' (non-empty
    string), 'flag' (0 or 1) or 'str' (anything). Keys are header names, or 0-based positions
    when the file has no header (then ``n_fields`` is the exact number of fields a row has)."""

    path: Path
    columns: dict[str | int, str]
    sep: str = ","
    encoding: str = "utf-8-sig"
    header: bool = True
    n_fields: int | None = None
    quoting: int = csv.QUOTE_MINIMAL


_PANDAS_DTYPES = {"int": "int64", "float": "float64", "flag": "int64", "text": str, "str": str}
_INT_RE = re.compile(r"\s*[+-]?\d+\s*")


def _read_table(spec: _TableSpec) -> pd.DataFrame:
    """Read with explicit dtypes; on any problem, locate the first bad line for the error."""
    path = spec.path
    if spec.header:
        try:
            found = list(pd.read_csv(path, nrows=0, sep=spec.sep, encoding=spec.encoding).columns)
        except (ValueError, pd.errors.EmptyDataError) as exc:
            raise _diagnose(spec, exc) from exc
        missing = [c for c in spec.columns if c not in found]
        if missing:
            raise MovieLensFormatError(f"{path}: missing columns {missing}; header has {found}")
    try:
        frame = pd.read_csv(
            path,
            sep=spec.sep,
            header=0 if spec.header else None,
            # no usecols: with it pandas silently ignores rows with extra fields
            dtype={c: _PANDAS_DTYPES[k] for c, k in spec.columns.items()},
            na_filter=False,  # an empty or "nan" field is an error, not a silent NaN
            encoding=spec.encoding,
            quoting=spec.quoting,
        )
    except (ValueError, pd.errors.EmptyDataError) as exc:  # ParserError, UnicodeDecodeError are ValueErrors
        raise _diagnose(spec, exc) from exc
    if not spec.header and len(frame) and frame.shape[1] != spec.n_fields:
        raise _diagnose(spec, None)
    for col, kind in spec.columns.items():
        values = frame[col]
        bad = (
            (kind == "float" and not np.isfinite(values.to_numpy()).all())
            or (kind == "flag" and not values.isin((0, 1)).all())
            or (kind == "text" and (values.str.strip() == "").any())
        )
        if bad:
            raise _diagnose(spec, None)
    return frame[list(spec.columns)] if spec.header else frame


def _value_problem(kind: str, raw: str) -> str | None:
    if kind in ("int", "flag"):
        if not _INT_RE.fullmatch(raw) or not -(2**63) <= int(raw) < 2**63:
            return "is not an integer"
        if kind == "flag" and int(raw) not in (0, 1):
            return "is not 0 or 1"
    elif kind == "float":
        try:
            if not math.isfinite(float(raw)):
                return "is not a finite number"
        except ValueError:
            return "is not a number"
    elif kind == "text" and not raw.strip():
        return "is empty"
    return None


def _diagnose(spec: _TableSpec, exc: BaseException | None) -> MovieLensFormatError:
    """Slow pass over the file (error path only) that names the first bad line."""
    path = spec.path
    data = path.read_bytes()
    try:
        text = data.decode(spec.encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return MovieLensFormatError(f"{path}, line {line}: not valid {spec.encoding} text ({err.reason})")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=spec.sep, quoting=spec.quoting)
    positions: dict[str | int, int] = {}
    n_fields = spec.n_fields
    n_rows = 0
    for row in reader:
        if not row:  # blank line: pandas skips these too
            continue
        n_rows += 1
        if spec.header and not positions:
            positions = {name: row.index(name) for name in spec.columns if name in row}
            n_fields = len(row)
            continue
        where = f"{path}, line {reader.line_num}"
        if len(row) != n_fields:
            return MovieLensFormatError(f"{where}: expected {n_fields} fields, found {len(row)}: {row!r}")
        for col, kind in spec.columns.items():
            raw = row[positions[col] if spec.header else col]
            problem = _value_problem(kind, raw)
            if problem:
                name = col if spec.header else f"field {col + 1}"
                return MovieLensFormatError(f"{where}: {name} {raw!r} {problem}")
    if n_rows == 0:
        return MovieLensFormatError(f"{path}: file is empty")
    return MovieLensFormatError(f"{path}: could not be parsed: {exc}")


def _check_unique_movies(movie_ids: pd.Series, path: Path) -> None:
    dupes = sorted(int(i) for i in movie_ids[movie_ids.duplicated()].unique())
    if dupes:
        raise MovieLensFormatError(f"{path}: movie ids appear on more than one row: {dupes[:10]}")


def _ad_text(title: str, genres: list[str]) -> str:
    return f"{title}. Genres: {', '.join(genres)}." if genres else f"{title}."


def _load_latest(src_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    movies_path = src_dir / "movies.csv"
    movies = _read_table(_TableSpec(movies_path, {"movieId": "int", "title": "text", "genres": "str"}))
    _check_unique_movies(movies["movieId"], movies_path)
    texts = []
    for title, genres in zip(movies["title"], movies["genres"]):
        names = [g.strip() for g in genres.split("|")]
        texts.append(_ad_text(title.strip(), [g for g in names if g and g != NO_GENRES]))
    ratings = _read_table(
        _TableSpec(
            src_dir / "ratings.csv",
            {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "int"},
        )
    )
    return (
        pd.DataFrame({"movie_id": movies["movieId"], "text": texts}),
        ratings.rename(columns={"userId": "user_id", "movieId": "movie_id"})[
            ["user_id", "movie_id", "rating", "timestamp"]
        ],
    )


def _load_100k(src_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    item_path = src_dir / "u.item"
    n_meta = 5  # id | title | release date | video release date | IMDb URL
    item_columns: dict[str | int, str] = {0: "int", 1: "text"}
    item_columns.update({n_meta + i: "flag" for i in range(len(ML100K_GENRES))})
    items = _read_table(
        _TableSpec(
            item_path,
            item_columns,
            sep="|",
            encoding="latin-1",
            header=False,
            n_fields=n_meta + len(ML100K_GENRES),
            quoting=csv.QUOTE_NONE,
        )
    )
    _check_unique_movies(items[0], item_path)
    flags = items[[n_meta + i for i in range(len(ML100K_GENRES))]].to_numpy(dtype=bool)
    texts = [
        _ad_text(title.strip(), [g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown"])
        for title, row in zip(items[1], flags)
    ]
    ratings = _read_table(
        _TableSpec(
            src_dir / "u.data",
            {0: "int", 1: "int", 2: "float", 3: "int"},
            sep="\t",
            encoding="latin-1",
            header=False,
            n_fields=4,
            quoting=csv.QUOTE_NONE,
        )
    )
    ratings.columns = ["user_id", "movie_id", "rating", "timestamp"]
    return pd.DataFrame({"movie_id": items[0], "text": texts}), ratings


_LOADERS = {LAYOUT_LATEST: _load_latest, LAYOUT_100K: _load_100k}


def detect_layout(src_dir: Path) -> str:
    """``LAYOUT_LATEST`` or ``LAYOUT_100K``; a clear error listing what the folder holds otherwise."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        what = "is not a folder" if src_dir.exists() else "does not exist"
        raise MovieLensFormatError(f"MovieLens folder {src_dir} {what}")
    complete = [lay for lay, files in LAYOUT_FILES.items() if all((src_dir / f).is_file() for f in files)]
    if len(complete) == 1:
        return complete[0]
    expected = " or ".join(f"{' + '.join(files)} ({lay} layout)" for lay, files in LAYOUT_FILES.items())
    if complete:
        raise MovieLensFormatError(f"{src_dir} holds both {expected}; keep one layout per folder")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in src_dir.iterdir())
    found = ", ".join(entries[:30]) + (f", ... ({len(entries) - 30} more)" if len(entries) > 30 else "")
    hints = []
    for lay, files in LAYOUT_FILES.items():
        present = [f for f in files if (src_dir / f).is_file()]
        if present:
            missing = [f for f in files if f not in present]
            hints.append(f"it has {', '.join(present)} but lacks {', '.join(missing)} ({lay} layout)")
    for sub in sorted(p for p in src_dir.iterdir() if p.is_dir()):
        if any(all((sub / f).is_file() for f in files) for files in LAYOUT_FILES.values()):
            hints.append(f"did you mean the subfolder {sub}?")
    found = found or "nothing (empty folder)"
    message = f"{src_dir} is not a MovieLens folder: expected {expected}; found: {found}"
    raise MovieLensFormatError("; ".join([message, *hints]))


# ---------------------------------------------------------------------------- writing


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it"
        )


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)
        handle.flush()
        os.fsync(handle.fileno())


def _write_source_atomically(ads: pd.DataFrame, clicks: pd.DataFrame, out_dir: Path, overwrite: bool) -> None:
    """Write into a hidden sibling folder, then rename it to ``out_dir``: OUT either does
    not change or appears complete. An existing OUT (with ``overwrite``) is moved aside
    first and deleted only once the new one is in place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        (tmp / CLICKS_DIR).mkdir()
        _write_csv(ads, tmp / ADS_FILE)
        _write_csv(clicks, tmp / CLICKS_DIR / CLICKS_FILE)
        _check_target(out_dir, overwrite)  # again: it may have changed while we were parsing
        if not out_dir.exists():
            os.rename(tmp, out_dir)
        elif not any(out_dir.iterdir()):
            out_dir.rmdir()
            os.rename(tmp, out_dir)
        else:
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- conversion


def convert_movielens(
    src_dir: Path, out_dir: Path, min_rating: float | None = None, overwrite: bool = False
) -> ConversionReport:
    """Convert the MovieLens folder ``src_dir`` into the file click source ``out_dir``.

    ``min_rating=None`` keeps every rating. Ratings of movies missing from the movie file
    are dropped first (counted in ``n_dropped_unknown_movie``), then the rating filter
    applies to the rest (``n_dropped_below_rating``).
    """
    src_dir = Path(src_dir)
    out_dir = Path(os.path.abspath(out_dir))
    if min_rating is not None and not math.isfinite(min_rating):
        raise ValueError(f"min_rating must be a finite number, got {min_rating}")
    if out_dir.resolve() == src_dir.resolve() or out_dir.resolve() in src_dir.resolve().parents:
        raise ValueError(f"output folder {out_dir} would contain or replace the input folder {src_dir}")
    _check_target(out_dir, overwrite)  # fail before the (slower) parse
    layout = detect_layout(src_dir)
    movies, ratings = _LOADERS[layout](src_dir)

    known = ratings["movie_id"].isin(movies["movie_id"]).to_numpy()
    keep = known.copy()
    if min_rating is not None:
        keep &= ratings["rating"].to_numpy() >= min_rating
    kept = ratings[keep]
    if kept.empty:  # a click source needs at least one click to be readable
        raise ValueError(
            f"{src_dir}: no ratings left to write as clicks ({len(ratings)} read, "
            f"{int((~known).sum())} of unknown movies, {int(known.sum())} below min rating {min_rating}); "
            "lower --min-rating or check the ratings file"
        )

    ads = pd.DataFrame({"ad_id": "movie-" + movies["movie_id"].astype(str), "text": movies["text"]})
    clicks = pd.DataFrame(
        {
            "user_id": "ml-user-" + kept["user_id"].astype(str),
            "ad_id": "movie-" + kept["movie_id"].astype(str),
            "timestamp": kept["timestamp"].astype("int64"),
        }
    )
    _write_source_atomically(ads, clicks, out_dir, overwrite)
    return ConversionReport(
        layout=layout,
        n_ads=len(ads),
        n_clicks=len(clicks),
        n_users=int(kept["user_id"].nunique()),
        n_dropped_below_rating=int(known.sum() - keep.sum()),
        n_dropped_unknown_movie=int((~known).sum()),
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adrec_assets.sources.movielens",
        description="Convert a MovieLens folder (ml-latest or ml-100k layout) into a file click source. "
        "GroupLens licence: research use, no redistribution; never commit the output.",
    )
    parser.add_argument(
        "src_dir", type=Path, help="MovieLens folder (movies.csv + ratings.csv, or u.item + u.data)"
    )
    parser.add_argument(
        "out_dir", type=Path, help="click source folder to create, e.g. data/sources/ml-latest-small"
    )
    parser.add_argument(
        "--min-rating",
        type=_finite_float,
        default=None,
        metavar="R",
        help="keep only ratings >= R as clicks (default: every rating is a click)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty output folder"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        report = convert_movielens(args.src_dir, args.out_dir, args.min_rating, args.overwrite)
    except (ValueError, FileExistsError) as exc:  # MovieLensFormatError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} in {time.perf_counter() - started:.2f} s")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
