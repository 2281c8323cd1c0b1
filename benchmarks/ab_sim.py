"""A/B statistics validated by simulation: A/A false positives under peeking, A/B power at
the planned size, sample-ratio-mismatch detection and CUPED's variance reduction.

Synthetic users (``ab_population.SyntheticPopulation``): impressions 1 + Poisson(Gamma activity)
(negative binomial, mean 20), per-user CTR ~ Beta (mean 3%, concentration 30), pre-period
clicks at the same per-user CTR. Users arrive in ``--looks`` equal batches per arm, each
with their whole outcome; every look re-computes the delta-method z-test and the mSPRT's
always-valid p-value on everything seen so far.

    .venv/bin/python benchmarks/ab_sim.py                 # defaults: --sims 1000 --seed 0
    .venv/bin/python benchmarks/ab_sim.py --sims 200 --looks 10 --lift 0.2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from ab_population import SyntheticPopulation  # noqa: E402
from scipy import stats  # noqa: E402
from statsmodels.stats.power import GofChisquarePower  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402

from adrec_assets.abtest.stats import (  # noqa: E402
    SRM_P_THRESHOLD,
    PowerPlan,
    RatioMoments,
    always_valid_p_values,
    contrast,
    cuped_theta,
    plan_users_per_arm,
    sample_ratio_mismatch,
)
from adrec_assets.online.experiments import Arm, Experiment  # noqa: E402

PILOT_USERS = 200_000
SRM_USERS = 1_000_000
SRM_IMBALANCE = 0.505


def rate(successes: int, trials: int, digits: int = 1) -> str:
    low, high = proportion_confint(successes, trials, alpha=0.05, method="wilson")
    return f"{successes / trials:6.{digits}%}  [{low:.{digits}%}, {high:.{digits}%}]"


def simulate(
    population: SyntheticPopulation,
    rng: np.random.Generator,
    sims: int,
    users_per_arm: int,
    looks: int,
    lift: float,
    tau2: float,
    alpha: float,
) -> dict[str, np.ndarray]:
    """Decisions of every test in each simulated experiment (booleans of length sims)."""
    control = population.look_moments(rng, sims, users_per_arm, looks)
    treatment = population.look_moments(rng, sims, users_per_arm, looks, relative_lift=lift)
    plain = contrast(control, treatment)
    final_control, final_treatment = last_look(control), last_look(treatment)
    final_plain = contrast(final_control, final_treatment)
    final_cuped = contrast(final_control, final_treatment, cuped_theta([final_control, final_treatment]))
    always_valid = always_valid_p_values(plain.diff, plain.diff_variance, tau2, axis=1)
    return {
        "msprt": always_valid[:, -1] <= alpha,
        "peeking_z": np.any(plain.p_value <= alpha, axis=1),
        "final_z": final_plain.p_value <= alpha,
        "final_cuped_z": final_cuped.p_value <= alpha,
        "diff": final_plain.diff,
        "cuped_diff": final_cuped.diff,
        "reported_reduction": 1.0 - final_cuped.diff_variance / final_plain.diff_variance,
    }


def last_look(moments: RatioMoments) -> RatioMoments:
    return RatioMoments(**{name: getattr(moments, name)[:, -1] for name in RatioMoments.__dataclass_fields__})


def random_pseudonyms(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.frombuffer(rng.bytes(16 * n).hex().encode("ascii"), dtype="S32").astype("U32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=1000, help="simulated experiments per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", type=int, default=20)
    parser.add_argument("--lift", type=float, default=0.10, help="true relative CTR lift of the A/B scenario")
    parser.add_argument("--power", type=float, default=0.80)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    population = SyntheticPopulation()
    seeds = rng.integers(0, 2**63, size=9)

    # Planning inputs, as from historical logs: the control population only. A treatment
    # pilot is what a planner cannot have; it sizes the calibration row alone.
    pilot = RatioMoments.of_users(*population.sample(np.random.default_rng(seeds[0]), PILOT_USERS))
    ctr, variance = float(pilot.ctr), float(pilot.linearized_variance)
    treatment_sample = population.sample(np.random.default_rng(seeds[1]), PILOT_USERS, args.lift)
    treatment_variance = float(RatioMoments.of_users(*treatment_sample).linearized_variance)
    common = dict(alpha=args.alpha, power=args.power, looks=args.looks, seed=args.seed)
    fixed = plan_users_per_arm(ctr, variance, args.lift, test="fixed", **common)
    sequential = plan_users_per_arm(ctr, variance, args.lift, test="sequential", **common)
    calibration = plan_users_per_arm(
        ctr, variance, args.lift, test="sequential", treatment_per_user_variance=treatment_variance, **common
    )
    print(
        f"pilot: {PILOT_USERS:,} users, CTR {ctr:.4%}, per-user variance of the linearized CTR {variance:.3e} "
        f"(treatment at +{args.lift:.0%}: {treatment_variance:.3e}, ratio {treatment_variance / variance:.3f})"
    )
    print(f"plans for +{args.lift:.0%} relative lift, alpha {args.alpha}, power {args.power}, {args.looks} looks:")
    plans = (
        ("fixed-horizon delta-method z", fixed),
        ("mSPRT, treatment variance (1+lift)^2 s^2", sequential),
        ("mSPRT, treatment variance from a pilot", calibration),
    )
    for label, plan in plans:
        tau = f", tau = {math.sqrt(plan.sequential.tau2):.3e}" if plan.sequential else ""
        print(f"  {label:44s} {plan.users_per_arm:7,} users/arm  (z at horizon {plan.standardized_effect:.2f}{tau})")

    n = args.sims

    def run(plan: PowerPlan, lift: float, seed: int) -> dict[str, np.ndarray]:
        tau2 = (plan.sequential or sequential.sequential).tau2
        rng_of_run = np.random.default_rng(seed)
        return simulate(population, rng_of_run, n, plan.users_per_arm, args.looks, lift, tau2, args.alpha)

    def row(label: str, plan: PowerPlan, decisions: np.ndarray) -> None:
        print(f"{label:54s} {plan.users_per_arm:9,}  {rate(int(decisions.sum()), n)}")

    print(f"\n{'scenario':54s} {'users/arm':>9s}  rate   [95% Wilson]")
    aa = run(sequential, 0.0, seeds[2])
    row("A/A  mSPRT always-valid p <= alpha at any of the looks", sequential, aa["msprt"])
    row("A/A  naive z-test peeked at every look", sequential, aa["peeking_z"])
    row("A/A  z-test at the final look only", sequential, aa["final_z"])
    row("A/A  CUPED z-test at the final look only", sequential, aa["final_cuped_z"])
    ab = run(sequential, args.lift, seeds[3])
    ab_calibration = run(calibration, args.lift, seeds[4])
    ab_fixed = run(fixed, args.lift, seeds[5])
    row("A/B  mSPRT detects, at the planned size (headline)", sequential, ab["msprt"])
    row("A/B  mSPRT detects, size from a treatment pilot too", calibration, ab_calibration["msprt"])
    row("A/B  fixed-horizon z detects at its planned size", fixed, ab_fixed["final_z"])
    row("A/B  fixed-horizon CUPED z at the same size", fixed, ab_fixed["final_cuped_z"])

    print("\nCUPED (pre-period clicks as covariate), final look:")
    resample = np.random.default_rng(seeds[6]).integers(0, n, size=(2_000, n))
    for label, result in (("A/A", aa), ("A/B", ab)):
        reported = result["reported_reduction"]
        measured = 1.0 - np.var(result["cuped_diff"]) / np.var(result["diff"])
        boot = 1.0 - np.var(result["cuped_diff"][resample], axis=1) / np.var(result["diff"][resample], axis=1)
        low, high = np.percentile(boot, [2.5, 97.5])
        print(
            f"  {label}: variance reduction reported {np.mean(reported):.1%} (per experiment "
            f"{np.min(reported):.1%} to {np.max(reported):.1%}); measured across the {n:,} experiments "
            f"{measured:.1%} [bootstrap 95%: {low:.1%}, {high:.1%}]"
        )

    print(f"\nsample-ratio mismatch (chi-square, flagged at p < {SRM_P_THRESHOLD}):")
    split = f"{SRM_IMBALANCE:.1%}/{1 - SRM_IMBALANCE:.1%}"
    effect = math.sqrt(2 * (SRM_IMBALANCE - 0.5) ** 2 / 0.5)  # Cohen's w of the split against 50/50
    for target in (0.8, 0.99):
        needed = GofChisquarePower().solve_power(
            effect_size=effect, nobs=None, alpha=SRM_P_THRESHOLD, power=target, n_bins=2
        )
        print(f"  users needed to flag a {split} split with power {target}: {math.ceil(needed):,}")
    srm_rng = np.random.default_rng(seeds[7])

    def flagged(counts: np.ndarray) -> int:
        chi2 = (counts - SRM_USERS / 2) ** 2 / (SRM_USERS / 4)  # the 2-arm chi-square, vectorized
        return int(np.sum(stats.chi2.sf(chi2, df=1) < SRM_P_THRESHOLD))

    imbalanced = srm_rng.binomial(SRM_USERS, SRM_IMBALANCE, size=n)
    balanced = srm_rng.binomial(SRM_USERS, 0.5, size=100 * n)
    print(
        f"  {SRM_USERS:,} users at {split} (mean chi2 ~ {SRM_USERS * effect**2:.0f}): "
        f"flagged {rate(flagged(imbalanced), n)}"
    )
    print(f"  {SRM_USERS:,} users at 50/50: flagged {rate(flagged(balanced), 100 * n, digits=2)} of {100 * n:,} splits")
    experiment = Experiment(
        "srm-check",
        f"srm-{args.seed}",
        (Arm("control", 0.5), Arm("treatment", 0.5)),
        start=datetime(2026, 11, 1, tzinfo=UTC),
    )
    pseudonyms = random_pseudonyms(SRM_USERS, np.random.default_rng(seeds[8]))
    hashed_started = time.perf_counter()
    counts = np.bincount(experiment.assign_many(pseudonyms), minlength=2)
    hashed_seconds = time.perf_counter() - hashed_started
    check = sample_ratio_mismatch(dict(zip(experiment.arm_names, counts.tolist())), experiment.shares)
    print(
        f"  hash assignment of {SRM_USERS:,} random pseudonyms to 50/50: {counts[0]:,} / {counts[1]:,}, "
        f"chi2 {check.chi2:.2f}, p = {check.p_value:.3f}, flagged: {check.mismatch} ({hashed_seconds:.1f} s)"
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
