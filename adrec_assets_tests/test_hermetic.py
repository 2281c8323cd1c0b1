"""The suite never reads what `make run`, `make serve` or `make demo` left in the checkout's
data/: a served click file there (pseudonymized with another key) is invisible to tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adrec_assets.artifacts import resolve_root
from adrec_assets.privacy import pseudonymize
from adrec_assets.resources import ClickSourceResource
from adrec_assets.sources.catalog import data_dir, load_builtin_catalog

REPO = Path(__file__).resolve().parents[1]


def test_default_folders_are_outside_the_checkout() -> None:
    for folder in (data_dir(), ClickSourceResource().sources_root(), Path(str(resolve_root()))):
        assert not Path(os.path.abspath(folder)).is_relative_to(REPO), folder


def test_a_served_click_file_in_the_checkout_is_not_read() -> None:
    """The demo's write-back (a served click with another key's pseudonym) sits where
    `make serve` puts it; the synthetic source the tests build reads only its generator."""
    catalog = load_builtin_catalog().catalog
    clicks_dir = REPO / "data" / "sources" / "synthetic" / "clicks"
    made = [p for p in (clicks_dir.parent.parent, clicks_dir.parent, clicks_dir) if not p.exists()]
    clicks_dir.mkdir(parents=True, exist_ok=True)
    served = clicks_dir / f"served-test-{uuid.uuid4().hex}.parquet"
    table = pa.table(
        {
            "user_pseudonym": [pseudonymize("someone", b"another-deployment-key-0123456789")],
            "ad_id": [str(catalog.ad_ids[0])],
            "timestamp": [1],
            "weight": [1.0],
        }
    )
    try:
        pq.write_table(table, served)
        source = ClickSourceResource().source("synthetic")
        clicks, report = source.read_clicks(catalog.ad_ids)
        assert report.n_files == 0
        assert not clicks.pseudonymized.any()
    finally:
        served.unlink(missing_ok=True)
        for folder in reversed(made):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
