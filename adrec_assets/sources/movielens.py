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
Output: ``OUT/ads.csv`` (``ad_id``, ``text``, and the structured fields ``year`` and
``genres``), ``OUT/ad_fields.json`` declaring them (``year`` numeric, ``genres`` categorical
with ``|`` between values) and ``OUT/clicks/ratings.csv`` (``user_id``, ``ad_id``,
``timestamp``), written into a hidden sibling folder and renamed into place, so a watcher of
OUT never sees a half-written source.

By default every rating is a click: rating a movie means having watched it, which is the
interest signal a click carries, low ratings included. ``--min-rating R`` keeps only ratings
``>= R`` (e.g. 4 for "liked"). The ml-100k "unknown" genre flag is not written as a genre.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adrec_assets.ml.fields import CATEGORICAL, NUMERIC, FieldSpec
from adrec_assets.sources import SourceError
from adrec_assets.sources.files import AD_ID, ADS_FILENAMES, CLICKS_DIRNAME, TEXT, TIMESTAMP, USER_ID, write_field_specs
from adrec_assets.sources.folders import check_out_dir, write_folder_atomically
from adrec_assets.sources.tables import Column, Kind, TableSpec, read_table

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

CLICKS_FILE = "ratings.csv"
_CHUNK_ROWS = 1_000_000  # rows per read and per write: memory stays flat on ml-25m


class MovieLensFormatError(SourceError):
    """The input folder is not a readable MovieLens dataset; the message names file, line and problem."""


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


def _read_columns(spec: TableSpec) -> tuple[dict[str | int, np.ndarray], np.ndarray]:
    """Every declared column of a MovieLens file, validated by the shared table reader, and the
    line of each row; any problem is a :class:`MovieLensFormatError` naming file and line."""
    try:
        chunks = list(read_table(spec, _CHUNK_ROWS))
    except MovieLensFormatError:
        raise
    except SourceError as exc:
        raise MovieLensFormatError(str(exc)) from None
    if not chunks:
        raise MovieLensFormatError(f"{spec.where}: no data rows; the file is empty or holds only a header")
    columns = {key: np.concatenate([c.values[key] for c in chunks]) for key in chunks[0].values}
    return columns, np.concatenate([c.numbers for c in chunks])


def _where(path: Path) -> str:
    return f"MovieLens file {path}"


def _check_unique_movies(movie_ids: np.ndarray, lines: np.ndarray, path: Path) -> None:
    order = np.argsort(movie_ids, kind="stable")
    repeated = np.flatnonzero(movie_ids[order][1:] == movie_ids[order][:-1])
    if len(repeated):
        first, again = order[repeated[0]], order[repeated[0] + 1]
        raise MovieLensFormatError(
            f"{_where(path)}: movie id {int(movie_ids[first])} appears on lines {int(lines[first])} and "
            f"{int(lines[again])}; movie ids must be unique"
        )


def _ad_text(title: str, genres: list[str]) -> str:
    return f"{title}. Genres: {', '.join(genres)}." if genres else f"{title}."


_YEAR = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


def _year(title: str) -> str:
    """The release year a MovieLens title ends with ("Heat (1995)"), or "" when it has none."""
    found = _YEAR.search(title.strip())
    return found.group(1) if found else ""


#: the structured ad fields a converted source declares (``ad_fields.json``)
MOVIE_FIELDS = (FieldSpec("year", NUMERIC), FieldSpec("genres", CATEGORICAL, separator="|"))


def _ratings_frame(columns: dict[str | int, np.ndarray], keys: tuple[str | int, ...]) -> pd.DataFrame:
    user, movie, rating, timestamp = (columns[k] for k in keys)
    return pd.DataFrame({"user_id": user, "movie_id": movie, "rating": rating, "timestamp": timestamp})


def _load_latest(src_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    movies_path = src_dir / "movies.csv"
    movies, lines = _read_columns(
        TableSpec(
            movies_path,
            _where(movies_path),
            (Column("movieId", Kind.INT), Column("title", Kind.TEXT), Column("genres", Kind.STR)),
            encoding="utf-8-sig",
        )
    )
    _check_unique_movies(movies["movieId"], lines, movies_path)
    texts, genre_cells = [], []
    for title, genres in zip(movies["title"].tolist(), movies["genres"].tolist()):
        names = [g for g in (g.strip() for g in genres.split("|")) if g and g != NO_GENRES]
        texts.append(_ad_text(title.strip(), names))
        genre_cells.append("|".join(names))
    ratings_path = src_dir / "ratings.csv"
    ratings, _ = _read_columns(
        TableSpec(
            ratings_path,
            _where(ratings_path),
            (
                Column("userId", Kind.INT, secret=True),
                Column("movieId", Kind.INT),
                Column("rating", Kind.FLOAT),
                Column("timestamp", Kind.INT),
            ),
            encoding="utf-8-sig",
        )
    )
    years = [_year(title) for title in movies["title"].tolist()]
    return (
        pd.DataFrame({"movie_id": movies["movieId"], "text": texts, "year": years, "genres": genre_cells}),
        _ratings_frame(ratings, ("userId", "movieId", "rating", "timestamp")),
    )


def _load_100k(src_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    item_path = src_dir / "u.item"
    n_meta = 5  # id | title | release date | video release date | IMDb URL
    item_columns = [Column(0, Kind.INT), Column(1, Kind.TEXT), Column(2, Kind.STR)]
    item_columns += [Column(n_meta + i, Kind.FLAG) for i in range(len(ML100K_GENRES))]
    items, lines = _read_columns(
        TableSpec(
            item_path,
            _where(item_path),
            tuple(item_columns),
            sep="|",
            encoding="latin-1",
            header=False,
            n_fields=n_meta + len(ML100K_GENRES),
            quoting=csv.QUOTE_NONE,
        )
    )
    _check_unique_movies(items[0], lines, item_path)
    flags = np.stack([items[n_meta + i] for i in range(len(ML100K_GENRES))], axis=1).astype(bool)
    genres = [[g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown"] for row in flags]
    texts = [_ad_text(title.strip(), names) for title, names in zip(items[1].tolist(), genres)]
    # release date "01-Jan-1995"; the title's "(1995)" when the date is missing
    years = [date.strip()[-4:] if date.strip()[-4:].isdigit() else _year(title)
             for date, title in zip(items[2].tolist(), items[1].tolist())]  # fmt: skip
    data_path = src_dir / "u.data"
    ratings, _ = _read_columns(
        TableSpec(
            data_path,
            _where(data_path),
            (Column(0, Kind.INT, secret=True), Column(1, Kind.INT), Column(2, Kind.FLOAT), Column(3, Kind.INT)),
            sep="\t",
            encoding="latin-1",
            header=False,
            n_fields=4,
            quoting=csv.QUOTE_NONE,
        )
    )
    ads = pd.DataFrame({"movie_id": items[0], "text": texts, "year": years, "genres": ["|".join(g) for g in genres]})
    return ads, _ratings_frame(ratings, (0, 1, 2, 3))


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


def _write_csv(frames: Iterator[pd.DataFrame], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        for number, frame in enumerate(frames):
            frame.to_csv(handle, index=False, header=number == 0)


def _click_frames(user_ids: np.ndarray, movie_ids: np.ndarray, timestamps: np.ndarray) -> Iterator[pd.DataFrame]:
    """The clicks table a slice at a time, so memory does not grow with the ratings file."""
    for start in range(0, max(len(user_ids), 1), _CHUNK_ROWS):
        part = slice(start, start + _CHUNK_ROWS)
        yield pd.DataFrame(
            {
                USER_ID: "ml-user-" + pd.Series(user_ids[part]).astype(str),
                AD_ID: "movie-" + pd.Series(movie_ids[part]).astype(str),
                TIMESTAMP: timestamps[part].astype(np.int64),
            }
        )


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
    check_out_dir(out_dir, overwrite)  # fail before the (slower) parse
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
            f"{int((~known).sum())} of unknown movies, {int(known.sum() - keep.sum())} below min rating {min_rating}); "
            "lower --min-rating or check the ratings file"
        )

    ads = pd.DataFrame({AD_ID: "movie-" + movies["movie_id"].astype(str), TEXT: movies["text"],
                        **{spec.name: movies[spec.name] for spec in MOVIE_FIELDS}})  # fmt: skip
    user_ids, movie_ids, timestamps = (kept[c].to_numpy() for c in ("user_id", "movie_id", "timestamp"))

    def fill(folder: Path) -> None:
        (folder / CLICKS_DIRNAME).mkdir()
        _write_csv(iter([ads]), folder / ADS_FILENAMES[0])
        write_field_specs(folder, MOVIE_FIELDS)
        _write_csv(_click_frames(user_ids, movie_ids, timestamps), folder / CLICKS_DIRNAME / CLICKS_FILE)

    write_folder_atomically(out_dir, fill, overwrite=overwrite)
    return ConversionReport(
        layout=layout,
        n_ads=len(ads),
        n_clicks=len(kept),
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
    parser.add_argument("src_dir", type=Path, help="MovieLens folder (movies.csv + ratings.csv, or u.item + u.data)")
    parser.add_argument("out_dir", type=Path, help="click source folder to create, e.g. data/sources/ml-latest-small")
    parser.add_argument(
        "--min-rating",
        type=_finite_float,
        default=None,
        metavar="R",
        help="keep only ratings >= R as clicks (default: every rating is a click)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        report = convert_movielens(args.src_dir, args.out_dir, args.min_rating, args.overwrite)
    except (ValueError, FileExistsError) as exc:  # MovieLensFormatError is a SourceError, a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} in {time.perf_counter() - started:.2f} s")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
