"""The experiment_report asset over a served event log: the table, the plot, the fixed
sequential design, and the sample-ratio check that fails on a lopsided split."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from adrec_assets.online.events import EVENTS_DIRNAME, event_table
from adrec_assets.online.experiments import ExperimentSet, format_assignment_label
from adrec_assets_tests.pipeline_fixtures import materialize_pipeline

EXPERIMENTS = """
[[experiment]]
name = "policy-test"
salt = "salt-1"
start = 2026-11-01T00:00:00Z
  [[experiment.arm]]
  name = "control"
  share = 0.5
  policy = "greedy"
  [[experiment.arm]]
  name = "treatment"
  share = 0.5
  policy = "thompson"
"""
START = 1_793_491_200.0  # 2026-11-01T00:00:00Z


def write_log(folder: Path, n_users: int, lose_treatment_share: float, seed: int = 0) -> None:
    """Impressions and clicks of ``n_users`` over 6 hours; treatment has a higher click rate;
    ``lose_treatment_share`` of the treatment users' events are dropped (a logging bug)."""
    rng = np.random.default_rng(seed)
    experiments = ExperimentSet.from_toml_text(EXPERIMENTS)
    (experiment,) = experiments.experiments
    users = np.array([f"{v:032x}" for v in rng.integers(0, 2**63, size=n_users, dtype=np.int64)])
    arms = experiment.assign_many(users)
    rows = []
    for user, arm in zip(users, arms):
        if arm == 1 and rng.random() < lose_treatment_share:
            continue
        label = format_assignment_label(experiments.assign(user, experiment.start))
        ctr = (0.05 if arm == 0 else 0.065) * rng.uniform(0.5, 1.5)
        for i in range(int(rng.integers(3, 15))):
            at = START + rng.uniform(0, 6 * 3600)
            base = {"event_id": f"{user}:{i}", "request_id": f"{user[:16]}{i:016x}", "user_pseudonym": user,
                    "ad_id": "ad-1", "position": 0, "timestamp": at, "served_at": at, "policy": "greedy",
                    "propensity": 1.0, "score": 0.5, "randomized": False, "experiments": label,
                    "model_version": "s-x", "weight": 1.0}  # fmt: skip
            rows.append({**base, "type": "impression"})
            if rng.random() < ctr:
                rows.append({**base, "type": "click", "timestamp": at + 1})
    (folder / EVENTS_DIRNAME).mkdir(parents=True)
    pq.write_table(event_table(rows), folder / EVENTS_DIRNAME / "served-000000000001-000000999999.parquet")


@pytest.fixture
def report_of(tmp_path, monkeypatch):
    toml = tmp_path / "experiments.toml"
    toml.write_text(EXPERIMENTS)
    monkeypatch.setenv("ADREC_EXPERIMENTS", str(toml))

    def run(source: str, lose_treatment_share: float):
        root, base = tmp_path / "sources", tmp_path / "artifacts"
        write_log(root / source, 4000, lose_treatment_share)
        with dg.instance_for_test() as instance:
            result = materialize_pipeline(instance, base, partition=source, selection=["experiment_report"],
                                          root=str(root), raise_on_error=False)  # fmt: skip
            events = result.get_asset_materialization_events()
            meta = events[0].materialization.metadata if events else {}
            checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            return result, meta, checks, base

    return run


def test_a_balanced_experiment_is_reported_with_intervals_and_passes_the_sample_ratio_check(report_of):
    result, meta, checks, base = report_of("shop", 0.0)
    assert result.success
    report = meta["report"].value
    assert "### Experiment `policy-test`" in report and "| treatment |" in report and "always-valid p" in report
    assert "data:image/png;base64," in report
    assert checks == {"experiment_sample_ratios_match": True}
    assert meta["policy-test_srm_p_value"].value > 0.001
    assert -1 < meta["policy-test_treatment_lift"].value < 2
    from adrec_assets.artifacts import load_file

    artifact = load_file(base / "shop" / "reports" / "experiment_report.npz")
    assert "policy-test" in artifact.designs and artifact.designs["policy-test"].tau2 > 0
    assert {row["arm"] for row in artifact.figures} == {"control", "treatment"}


def test_lost_treatment_users_fail_the_sample_ratio_check(report_of):
    result, meta, checks, _ = report_of("lopsided", 0.2)
    assert checks == {"experiment_sample_ratios_match": False}
    assert meta["policy-test_srm_p_value"].value < 0.001
    assert "MISMATCH" in meta["report"].value


def test_the_first_report_fixes_the_mixture_variance_that_later_looks_reuse(tmp_path, monkeypatch):
    """Re-deriving tau^2 from the data at every look would make the always-valid p-value
    depend on when one looked; the stored design is reused instead."""
    from adrec_assets.artifacts import load_file

    toml = tmp_path / "experiments.toml"
    toml.write_text(EXPERIMENTS)
    monkeypatch.setenv("ADREC_EXPERIMENTS", str(toml))
    root, base = tmp_path / "sources", tmp_path / "artifacts"
    write_log(root / "shop", 1500, 0.0, seed=1)
    with dg.instance_for_test() as instance:

        def materialize():
            assert materialize_pipeline(
                instance, base, partition="shop", selection=["experiment_report"], root=str(root)
            ).success
            return load_file(base / "shop" / "reports" / "experiment_report.npz")

        first = materialize()
        log = root / "shop" / EVENTS_DIRNAME
        for path in log.iterdir():
            path.unlink()
        log.rmdir()
        write_log(root / "shop", 6000, 0.0, seed=2)  # four times the users at the next look
        second = materialize()
    assert second.designs["policy-test"] == first.designs["policy-test"]
    assert sum(r["users"] for r in second.figures) > 3 * sum(r["users"] for r in first.figures)
