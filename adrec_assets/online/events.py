"""Served events back into the source folder: the online half of the loop (plain Python).

The service queues every accepted impression and click in the online store; the
:class:`EventFlusher` drains the queue in batches into two parquet files named after the
batch's sequence range, each written to a hidden temp name and renamed into place:

* ``<source>/events/served-<first>-<last>.parquet``: every event with what it was served
  with (policy, propensity, position, randomized slice, experiment arms, model version) --
  the log the position-bias, posterior and experiment assets read;
* ``<source>/clicks/served-<first>-<last>.parquet``: the clicks on catalogue ads in the
  file-source click format (``user_pseudonym``, ``ad_id``, ``timestamp``, ``weight`` = the
  position-bias click weight), which the click-source sensor notices and the pipeline
  retrains on. Clicks on ads added live through the API stay in the event log only until
  the source's own ads file carries those ads (a click on an ad the catalogue lacks would
  only be dropped, and count against the source's unknown-ad share).

A crash between writing and marking the batch flushed hands the same events out again;
the file names repeat, so a re-flush replaces the files instead of duplicating clicks.
Replicas sharing one store flush one at a time: the flusher holds the store's
``event-flush`` lease (60 s, renewed by every flush); when its holder dies another replica
takes over once it expires.
Only pseudonyms are written, never a raw user id.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # annotations only: pandas loads where a frame is built
    import pandas as pd

from adrec_assets.online.store import OnlineStore
from adrec_assets.sources.files import CLICKS_DIRNAME

EVENTS_DIRNAME = "events"
EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("user_pseudonym", pa.string()),
        ("ad_id", pa.string()),
        ("position", pa.int32()),
        ("type", pa.string()),
        ("timestamp", pa.float64()),
        ("served_at", pa.float64()),
        ("policy", pa.string()),
        ("propensity", pa.float64()),
        ("score", pa.float64()),
        ("randomized", pa.bool_()),
        ("experiments", pa.string()),
        ("model_version", pa.string()),
        ("weight", pa.float64()),
    ]
)
CLICK_SCHEMA = pa.schema(
    [("user_pseudonym", pa.string()), ("ad_id", pa.string()), ("timestamp", pa.int64()), ("weight", pa.float64())]
)


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def event_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.table({f.name: [row[f.name] for row in rows] for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)


def read_event_log(source_folder: Path) -> pa.Table:
    """Every flushed event of a source (empty, with the schema, when none was flushed)."""
    files = sorted(p for p in (Path(source_folder) / EVENTS_DIRNAME).glob("served-*.parquet"))
    if not files:
        return EVENT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=EVENT_SCHEMA) for p in files])


class EventFlusher:
    """Drains the store's event queue into the source folder (see the module docstring)."""

    #: The store lease that lets one replica at a time flush (see :meth:`flush`).
    LEASE = "event-flush"

    def __init__(self, store: OnlineStore, source_folder: Path, *, lease_seconds: float = 60.0) -> None:
        self.store, self.folder = store, Path(source_folder)
        self.owner = f"flusher-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lease_seconds = float(lease_seconds)

    def release(self) -> None:
        """Hand the flush lease back (clean shutdown, after the last flush)."""
        self.store.release_lease(self.LEASE, self.owner)

    def flush(self, batch: int, known_ads: Container[str]) -> int:
        """Write up to ``batch`` queued events; returns how many were flushed (0 while another
        replica holds the flush lease: two flushers reading the queue at different moments
        would write overlapping batches under different names, i.e. duplicate events)."""
        if not self.store.hold_lease(self.LEASE, self.owner, self.lease_seconds):
            return 0
        pending = self.store.pending_events(batch)
        if not pending:
            return 0
        first, last = pending[0][0], pending[-1][0]
        name = f"served-{first:012d}-{last:012d}.parquet"
        rows = [row for _, row in pending]
        _write_parquet_atomically(event_table(rows), self.folder / EVENTS_DIRNAME / name)
        clicks = [r for r in rows if r["type"] == "click" and r["ad_id"] in known_ads]
        if clicks:
            table = pa.table(
                {
                    "user_pseudonym": [r["user_pseudonym"] for r in clicks],
                    "ad_id": [r["ad_id"] for r in clicks],
                    "timestamp": [int(r["timestamp"]) for r in clicks],
                    "weight": [float(r["weight"]) for r in clicks],
                },
                schema=CLICK_SCHEMA,
            )
            _write_parquet_atomically(table, self.folder / CLICKS_DIRNAME / name)
        self.store.mark_flushed(last)
        return len(rows)


def impressions_with_outcomes(log: pa.Table) -> pd.DataFrame:
    """One row per served (request, position) with ``clicked``: impressions joined with their
    clicks (a click without a logged impression implies one). What the position-bias,
    posterior and experiment analyses learn from; columns are the event log's plus
    ``clicked`` (0/1), ordered by time."""
    import pandas as pd

    frame = log.to_pandas()
    if frame.empty:
        return frame.assign(clicked=pd.Series(dtype=int))
    clicked = frame.loc[frame["type"] == "click", ["request_id", "position"]].drop_duplicates().assign(clicked=1)
    shown = frame.sort_values("timestamp", kind="stable").drop_duplicates(["request_id", "position"], keep="first")
    shown = shown.merge(clicked, on=["request_id", "position"], how="left")
    shown["clicked"] = shown["clicked"].fillna(0).astype(int)
    return (
        shown.drop(columns=["type"])
        .sort_values(["served_at", "request_id", "position"], kind="stable")
        .reset_index(drop=True)
    )
