"""Time `make run`'s materialization: all seven assets for the `synthetic` partition.

Runs exactly the CLI path of `make run` (`dagster asset materialize ... --partition
synthetic`) in a fresh temporary DAGSTER_HOME and artifacts folder, so it never touches
your instance, then reads each step's duration from that instance's event log.

    .venv/bin/python benchmarks/materialize_synthetic.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def step_seconds(home: Path) -> dict[str, float]:
    import dagster as dg

    with dg.DagsterInstance.from_ref(dg._core.instance.InstanceRef.from_dir(str(home))) as instance:  # noqa: SLF001
        records = instance.get_records_for_run(
            run_id=instance.get_runs(limit=1)[0].run_id, of_type=dg.DagsterEventType.STEP_SUCCESS
        ).records
        return {
            r.event_log_entry.step_key: r.event_log_entry.dagster_event.event_specific_data.duration_ms / 1000
            for r in records
        }


def run_once() -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").touch()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "ADREC_ARTIFACTS_DIR": str(Path(tmp) / "artifacts"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        subprocess.run(
            [sys.executable, "-m", "adrec_assets.cli", "register", "synthetic"],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        started = time.perf_counter()
        proc = subprocess.run(
            [
                str(BIN / "dagster"),
                "asset",
                "materialize",
                "-m",
                "adrec_assets.definitions",
                "--select",
                "group:adrec",
                "--partition",
                "synthetic",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"materialization failed:\n{proc.stderr[-3000:]}")
        return wall, step_seconds(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    walls, steps = [], []
    for i in range(args.repeat):
        wall, per_step = run_once()
        walls.append(wall)
        steps.append(per_step)
        print(
            f"run {i + 1}: {wall:.1f} s wall for `dagster asset materialize --select 'group:adrec' --partition synthetic`"
        )
    print(f"\ncores: {os.cpu_count()}; runs: {args.repeat}")
    print(f"{'step':40s} {'median s':>9s}")
    for key in sorted(steps[0], key=lambda k: -statistics.median(s.get(k, 0) for s in steps)):
        print(f"{key:40s} {statistics.median(s.get(key, 0.0) for s in steps):9.2f}")
    print(f"{'TOTAL wall (CLI start to exit)':40s} {statistics.median(walls):9.2f}")
    print(f"target: < 60 s -> {'MET' if statistics.median(walls) < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
