"""Served events back into the source folder: the online half of the loop (plain Python).

The service queues every accepted impression and click in the online store; the
:class:`EventFlusher` drains the queue in batches into two parquet files named after the
store's epoch and the batch's sequence range:

* ``<source>/events/served-<epoch>-<first>-<last>.parquet``: every event with what it was
  served with (policy, propensity, position, randomized slice, experiment arms, model
  version) -- the log the position-bias, posterior and experiment assets read;
* ``<source>/clicks/served-<epoch>-<first>-<last>.parquet``: the clicks on catalogue ads in
  the file-source click format (``user_pseudonym``, ``ad_id``, ``timestamp``, ``weight`` =
  the position-bias click weight, plus the ``event_id``), which the click-source sensor
  notices and the pipeline retrains on. Clicks on ads added live through the API stay in the
  event log only until the source's own ads file carries those ads (a click on an ad the
  catalogue lacks would only be dropped, and count against the source's unknown-ad share).

What is guaranteed: every event the store queued appears exactly once over the files of
``events/``, and each of its clicks on a catalogue ad exactly once over ``clicks/``, counted
by event id, whatever fails or dies in between:

* before writing, the flusher records the batch (epoch, first and last seq, count) in the
  store; a flush that fails, or a flusher killed before the batch is marked flushed, leaves
  that record, and the next flush (this replica or another) writes exactly that batch again
  under exactly that name, then marks it: never a longer batch under another name;
* a file is never replaced: each is written to a hidden temp name and linked into place only
  where no file is; a name already taken must hold that very batch (a re-flush after a
  crash: the file stays as it is) or the flush stops with :class:`FlushConflictError`, its
  events still queued;
* a fresh store (a new SQLite file, a Redis emptied or restarted without persistence)
  numbers its events from 1 again, but under a new epoch: its names never meet the earlier
  files.

What a crash costs: nothing queued is lost (events stay in the store until their files are
written); events still queued in a store that is itself lost (Redis without persistence)
are. Replicas sharing one store flush one at a time: the flusher holds the store's
``event-flush`` lease (60 s, renewed by every flush); when its holder dies another replica
takes over once it expires, finishing the batch the dead one recorded.
Only pseudonyms are written, never a raw user id.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # annotations only: pandas loads where a frame is built
    import pandas as pd

from adrec_assets.online.store import OnlineStore
from adrec_assets.sources.files import CLICKS_DIRNAME

log = logging.getLogger(__name__)

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
        ("fresh", pa.bool_()),  # the ad was fresh when served (null: logged before the flag)
        ("explored", pa.bool_()),  # an exploratory slot: not in the posterior mean's top-k (null: before)
    ]
)
#: Columns a row may lack (rows built before they existed): written as null.
OPTIONAL_EVENT_COLUMNS = frozenset({"fresh", "explored"})
CLICK_SCHEMA = pa.schema(
    [
        ("user_pseudonym", pa.string()),
        ("ad_id", pa.string()),
        ("timestamp", pa.int64()),
        ("weight", pa.float64()),
        ("event_id", pa.string()),  # not read by the click source: names the click's event
    ]
)


class FlushConflictError(RuntimeError):
    """A batch's file name is taken by a file holding other events: nothing was replaced and
    the batch stays queued."""


def _write_once(table: pa.Table, path: Path, batch_ids: set[str], resumed: bool = False) -> None:
    """Write ``table`` to ``path`` unless a file is there: one holding only events of this
    batch (``batch_ids``: written before a crash) is kept as it is, any other is a
    :class:`FlushConflictError`. Never replaces a file. ``resumed``: the batch was left by a
    failed or killed flush, whose temp files of this name are removed."""
    if resumed:
        for leftover in path.parent.glob(f".{path.name}.tmp-*"):
            leftover.unlink(missing_ok=True)
    if path.exists():
        _check_same_batch(path, batch_ids)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails where a file is: never replaces one
        except FileExistsError:
            _check_same_batch(path, batch_ids)  # another flusher wrote this batch at the same moment
            return
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _check_same_batch(path: Path, batch_ids: set[str]) -> None:
    try:
        there = pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist()
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise FlushConflictError(
            f"{path} already exists and is not a flushed batch ({type(exc).__name__}); move it away: "
            "the flusher never replaces a file"
        ) from None
    if not set(there) <= batch_ids:
        raise FlushConflictError(
            f"{path} already exists and holds other events than the batch of that name; the flusher never "
            "replaces a file (two stores with one epoch, or a file copied in by hand?): the batch stays queued"
        )


def _fsync_dir(folder: Path) -> None:
    """Make the new directory entry durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def event_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.table(
        {
            f.name: [row.get(f.name) if f.name in OPTIONAL_EVENT_COLUMNS else row[f.name] for row in rows]
            for f in EVENT_SCHEMA
        },
        schema=EVENT_SCHEMA,
    )


def read_event_log(source_folder: Path) -> pa.Table:
    """Every flushed event of a source (empty, with the schema, when none was flushed)."""
    files = sorted(p for p in (Path(source_folder) / EVENTS_DIRNAME).glob("served-*.parquet"))
    if not files:
        return EVENT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=EVENT_SCHEMA) for p in files])


@dataclass(frozen=True)
class FlushBatch:
    """A batch the flusher is writing, recorded in the store before its files are."""

    epoch: str
    first: int
    last: int
    count: int

    @property
    def name(self) -> str:
        return f"served-{self.epoch}-{self.first:012d}-{self.last:012d}.parquet"

    def arrays(self) -> dict[str, np.ndarray]:
        return {"epoch": np.asarray(self.epoch), "first": np.asarray(self.first, dtype=np.int64),
                "last": np.asarray(self.last, dtype=np.int64), "count": np.asarray(self.count, dtype=np.int64)}  # fmt: skip

    @staticmethod
    def of(arrays: Mapping[str, np.ndarray] | None) -> FlushBatch | None:
        """The recorded batch, or None when none is open (count 0, or never recorded)."""
        if arrays is None or int(arrays["count"]) == 0:
            return None
        return FlushBatch(str(arrays["epoch"]), int(arrays["first"]), int(arrays["last"]), int(arrays["count"]))


_NO_BATCH = FlushBatch("", 0, 0, 0)


class EventFlusher:
    """Drains the store's event queue into the source folder (see the module docstring)."""

    #: The store lease that lets one replica at a time flush (see :meth:`flush`).
    LEASE = "event-flush"
    #: The store's named blob recording the batch being written (see :class:`FlushBatch`).
    BATCH_BLOB = "event-flush-batch"

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
        would write overlapping batches under different names, i.e. duplicate events).
        A batch recorded by a flush that failed or died is finished first, whatever its size."""
        if not self.store.hold_lease(self.LEASE, self.owner, self.lease_seconds):
            return 0
        recorded = FlushBatch.of(self.store.get_arrays(self.BATCH_BLOB))
        pending = None if recorded is None else self._rows_of(recorded)
        resumed = pending is not None  # a batch a failed or dead flush left: its temp files may lie about
        if pending is None:
            pending = self.store.pending_events(batch)
            if not pending:
                return 0
            proposed = FlushBatch(self.store.epoch(), pending[0][0], pending[-1][0], len(pending))
            recorded = self._open(proposed)
            if recorded != proposed:  # another flusher recorded its batch in between: finish that one
                pending, resumed = self._rows_of(recorded), True
                if pending is None:
                    return 0
        rows = [row for _, row in pending]
        ids = {str(row["event_id"]) for row in rows}
        _write_once(event_table(rows), self.folder / EVENTS_DIRNAME / recorded.name, ids, resumed)
        clicks = [r for r in rows if r["type"] == "click" and r["ad_id"] in known_ads]
        if clicks:
            table = pa.table(
                {
                    "user_pseudonym": [r["user_pseudonym"] for r in clicks],
                    "ad_id": [r["ad_id"] for r in clicks],
                    "timestamp": [int(r["timestamp"]) for r in clicks],
                    "weight": [float(r["weight"]) for r in clicks],
                    "event_id": [r["event_id"] for r in clicks],
                },
                schema=CLICK_SCHEMA,
            )
            _write_once(table, self.folder / CLICKS_DIRNAME / recorded.name, ids, resumed)
        self.store.mark_flushed(recorded.last)
        self._close(recorded)
        return len(rows)

    def _rows_of(self, recorded: FlushBatch) -> list[tuple[int, dict[str, Any]]] | None:
        """The queued events of a recorded batch; None (and the record cleared) when it was
        written and marked already (a crash before clearing) or the queue no longer holds it."""
        pending = [(seq, row) for seq, row in self.store.pending_events(recorded.count) if seq <= recorded.last]
        if pending and (pending[0][0], pending[-1][0], len(pending)) != (recorded.first, recorded.last, recorded.count):
            log.warning(
                "the recorded flush batch %s no longer matches the queue (%d events from seq %d); the record is "
                "dropped and the queue flushed as it is", recorded.name, len(pending), pending[0][0],
            )  # fmt: skip
            pending = []
        if not pending:
            self._close(recorded)
            return None
        return pending

    def _open(self, proposed: FlushBatch) -> FlushBatch:
        """Record ``proposed`` unless a batch is open already (atomically); returns the open one."""
        stored = self.store.update_arrays(
            self.BATCH_BLOB, lambda current: current if FlushBatch.of(current) is not None else proposed.arrays()
        )
        return FlushBatch.of(stored) or proposed

    def _close(self, done: FlushBatch) -> None:
        """Clear the record if it still is ``done``, never a batch another flusher opened since."""
        self.store.update_arrays(
            self.BATCH_BLOB,
            lambda current: _NO_BATCH.arrays() if current is None or FlushBatch.of(current) == done else current,
        )


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
