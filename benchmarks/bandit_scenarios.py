"""Where exploring pays: the service's policies in five scenarios of the MovieLens world.

Each scenario runs every policy on the same seeds through :mod:`bandit_sim` (the real
service in process; truth = EASE fitted on all clicks; common random numbers: every policy of
a seed meets the same users and the same examination and click draws):

* ``a_null``: stationary; every user and nearly every ad has training clicks, none arrive.
  Parity between Thompson and greedy is the right answer.
* ``b_new_users``: 20% of the users arrive new; activity is heavy-tailed (Pareto 1.2).
* ``c_burst``: 20% of the catalogue (the held-out ads) arrives at once at round
  ``--burst-at``; each ad retires after about ``--lifetime`` rounds (0.5-1.5x).
* ``d_drift``: at mid-run half the users take another user's tastes (their truth rows).
* ``e_delayed``: clicks reach the service ``--click-delay`` rounds after their slate; the
  service settles impressions after 600 s and learns in batches of 2,000 rounds.

Per run it writes one JSON line to ``--out`` (resumable: runs already there are skipped) and
prints, per scenario, each policy's regret ratio to greedy (mean of per-seed ratios with a
t interval over seeds), its share of the oracle's gain over random, new users' regret over
their first 20 impressions, and in ``c_burst`` the new ads' share of slots in the 1,000
rounds after the burst and how many of them were shown within 5,000 rounds of arriving.

    .venv/bin/python benchmarks/bandit_scenarios.py --rounds 10000 --seeds 0 1 2 3 4 5 6 7 8 9 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from bandit_sim import GREEDY_EMA, SimSettings, movielens_world, simulate  # noqa: E402
from scipy import stats  # noqa: E402

POLICIES = (GREEDY_EMA, "greedy", "thompson", "epsilon_greedy", "random", "popularity", "als")
SCENARIOS = ("a_null", "b_new_users", "c_burst", "d_drift", "e_delayed")
BURST_WINDOW = 1000  # rounds after the burst over which the new ads' share of slots is held
SHOWN_WITHIN = 5000  # every new ad must be shown within this many rounds of its arrival


def scenario_world(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """movielens_world's settings of a scenario (each world family caches under its own folder)."""
    if name == "a_null":
        return {"work": args.work / "null", "n_new": 0, "new_user_share": 0.0, "unseen_share": 0.02}
    if name == "c_burst":
        return {"work": args.work / "burst", "n_new": 1810, "burst_at": args.burst_at}
    return {"work": args.work / "work"}


def scenario_settings(name: str, base: SimSettings, args: argparse.Namespace) -> SimSettings:
    if name == "b_new_users":
        return replace(base, activity="pareto")
    if name == "c_burst":
        return replace(base, burst_lifetime=args.lifetime)
    if name == "d_drift":
        return replace(base, drift_at=args.rounds // 2)
    if name == "e_delayed":
        return replace(base, settle_seconds=600.0, settle_every=2000, click_delay=args.click_delay)
    return base


def _run(job: tuple[str, Any, SimSettings, Path, str]) -> dict[str, Any]:
    scenario, world, settings, folder, tag = job
    if folder.exists():
        shutil.rmtree(folder)  # an earlier run's event files
    result = simulate(world, settings, folder)
    n_new = len(world.new_ads)
    row = {
        "scenario": scenario, "policy": settings.policy, "seed": settings.seed, "rounds": settings.rounds,
        "regret": result.cumulative_regret, "clicks": result.clicks, "seconds": round(result.seconds, 1),
        "new_user_early_regret": float(result.regret[result.new_early].sum()),
        "new_user_early_regret_before_click": float(result.regret[result.new_early & ~result.new_early_after_click].sum()),
        "new_users_seen": result.new_users_seen, "new_ads": n_new,
        "first_shown": result.first_shown.tolist(), "settings": asdict(settings), "tag": tag,
    }  # fmt: skip
    if n_new:
        start = int(min(ad.arrival for ad in world.new_ads))
        window = result.new_ad_slots[start : start + BURST_WINDOW]
        row["burst_slot_share"] = float(window.sum() / (settings.k * max(len(window), 1)))
        row["catalogue_share"] = n_new / len(world.ad_ids)  # of the catalogue once they are all live
    print(f"  {scenario} {settings.policy:>14} seed {settings.seed}: regret {row['regret']:,.1f} "
          f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    return row


def _interval(values: np.ndarray) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3f}"
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def summarize(rows: list[dict[str, Any]]) -> str:
    lines = []
    for scenario in SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        if not mine:
            continue
        regret = {(r["policy"], r["seed"]): r for r in mine}
        seeds = sorted({r["seed"] for r in mine if ("greedy", r["seed"]) in regret})
        lines.append(f"\n## {scenario} ({len(seeds)} seeds, {mine[0]['rounds']:,} rounds)\n")
        lines.append(
            "| policy | regret / greedy's (per-seed mean, 95% t) | share of oracle's gain over random "
            "| new users' regret, first 20 impressions / greedy_ema's | fresh slots after burst |"
        )
        lines.append("|---|---|---|---|---|")
        for policy in POLICIES:
            both = [s for s in seeds if (policy, s) in regret]
            if not both:
                continue
            ratio = np.array([regret[policy, s]["regret"] / regret["greedy", s]["regret"] for s in both])
            gain = [1 - regret[policy, s]["regret"] / regret["random", s]["regret"] for s in both
                    if ("random", s) in regret]  # fmt: skip
            early = [regret[policy, s]["new_user_early_regret"] / regret[GREEDY_EMA, s]["new_user_early_regret"]
                     for s in both if (GREEDY_EMA, s) in regret and regret[GREEDY_EMA, s]["new_user_early_regret"] > 0]  # fmt: skip
            burst = ""
            if scenario == "c_burst":  # elsewhere the new ads arrive one by one, until the last round
                share = np.mean([regret[policy, s]["burst_slot_share"] for s in both])
                catalogue = regret[policy, both[0]]["catalogue_share"]
                within = [sum(0 <= f <= SHOWN_WITHIN for f in regret[policy, s]["first_shown"]) for s in both]
                shown = f"{min(within):,}-{max(within):,} of {regret[policy, both[0]]['new_ads']:,} shown within {SHOWN_WITHIN:,} rounds"
                burst = f"{share:.1%} ({share / catalogue:.2f}x catalogue share); {shown}"
            lines.append(
                f"| {policy} | {_interval(ratio)} | {_interval(np.array(gain)) if gain else '-'} "
                f"| {_interval(np.array(early)) if early else '-'} | {burst or '-'} |"
            )
        per_seed = [f"{s}: {regret['thompson', s]['regret'] / regret['greedy', s]['regret']:.3f}"
                    for s in seeds if ("thompson", s) in regret]  # fmt: skip
        lines.append(f"\nthompson / greedy per seed: {', '.join(per_seed)}")
        bound = [r["new_user_early_regret_before_click"] / r["new_user_early_regret"] for r in mine
                 if r["policy"] == GREEDY_EMA and r.get("new_user_early_regret") and "new_user_early_regret_before_click" in r]  # fmt: skip
        if bound:
            lines.append(f"new users' first-20 regret were every round after their first click served perfectly "
                         f"(the ceiling of learning from clicks): {_interval(np.array(bound))} of greedy_ema's")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("data/sources/ml-latest-small"))
    parser.add_argument(
        "--work", type=Path, default=Path("data/bench/scenarios"), help="world caches: null/, burst/, work/"
    )
    parser.add_argument("--out", type=Path, default=Path("data/bench/scenarios/runs.jsonl"))
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--burst-at", type=int, default=2000)
    parser.add_argument("--lifetime", type=int, default=6000, help="c_burst: rounds a new ad lives (x 0.5-1.5)")
    parser.add_argument("--click-delay", type=int, default=300, help="e_delayed: rounds until a slate's clicks arrive")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="SimSettings fields for every run, e.g. user_exploration=0.5 (recorded per run)")  # fmt: skip
    parser.add_argument("--tag", default="", help="names these runs apart from others in --out (with --set)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--summary-only", action="store_true", help="print the table of the runs in --out")
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    if args.summary_only:
        print(summarize([r for r in rows if r.get("tag", "") == args.tag]))
        return
    rows = [r for r in rows if r.get("tag", "") == args.tag]
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(SimSettings("greedy", 0, 1), name))
        overrides[name] = kind(value)
    done = {(r["scenario"], r["policy"], r["seed"], r["rounds"]) for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def jobs() -> Any:  # worlds are built one by one, while earlier runs go on
        for scenario in args.scenarios:
            world_settings = scenario_world(scenario, args)
            work = world_settings.pop("work")
            for seed in args.seeds:
                todo = [p for p in args.policies if (scenario, p, seed, args.rounds) not in done]
                if not todo:
                    continue
                world = movielens_world(args.source, work, seed, args.rounds, **world_settings)
                for policy in todo:
                    settings = scenario_settings(scenario, SimSettings(policy, seed, args.rounds, **overrides), args)
                    folder = work / "runs" / f"{scenario}-{policy}-s{seed}{'-' + args.tag if args.tag else ''}"
                    yield scenario, world, settings, folder, args.tag

    with args.out.open("a") as out:

        def keep(row: dict[str, Any]) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)

        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
                futures = [pool.submit(_run, job) for job in jobs()]
                for future in as_completed(futures):
                    keep(future.result())
        else:
            for job in jobs():
                keep(_run(job))
    print(summarize(rows))


if __name__ == "__main__":
    main()
