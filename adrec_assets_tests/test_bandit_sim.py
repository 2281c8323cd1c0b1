"""The bandit simulator (``benchmarks/bandit_sim.py``) on a tiny synthetic world: the same
``simulate`` the MovieLens benchmark runs, through the real service (recommend, record_events,
settle, add_ad) over a published snapshot, in seconds and without MovieLens or an encoder.

The world (``synthetic_world``): 150 users, 300 ads in an 8-d user space; the service's model
ranks by ``u . p + b`` while the truth weights half of the user-space dimensions 5x less and
counts the model's popularity term against the ad, so greedy is wrong in a way the Thompson
posterior can learn. 8 new ads, each the clear favourite of at least two users, arrive
during the first half of the run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adrec_assets.online.position_bias import estimate_from_randomized

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3000
WINDOW = 1500  # rounds every new ad has after its arrival
SEED = 0


def _load_simulator():
    spec = importlib.util.spec_from_file_location("bandit_sim", REPO_ROOT / "benchmarks" / "bandit_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bandit_sim"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


sim = _load_simulator()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_torch_thread):
    folder = tmp_path_factory.mktemp("bandit")
    world = sim.synthetic_world(folder / "artifacts", seed=SEED, rounds=ROUNDS, arrival_window=WINDOW)
    results = {
        policy: sim.simulate(world, sim.SimSettings(policy, SEED, ROUNDS, randomized_share=0.3, settle_every=100,
                                                    shared_model="online"), folder / policy)
        for policy in (sim.ORACLE, "greedy", "thompson")
    }  # fmt: skip
    return world, results


def test_the_oracle_has_exactly_zero_regret(runs):
    """The best slate is tracked incrementally as ads arrive; the oracle re-sorts every live
    ad each round. Any slip (an arrived ad missing, a not-yet-arrived ad counted, positions
    in the wrong order) gives the oracle non-zero regret."""
    world, results = runs
    oracle = results[sim.ORACLE]
    assert np.abs(oracle.regret).max() <= 1e-12
    assert oracle.expected_clicks == pytest.approx(oracle.best_expected_clicks, rel=1e-12)
    assert (oracle.first_shown >= 0).all()  # each new ad is some user's favourite, and users come back


def test_every_served_slate_is_logged_and_regret_is_non_negative(runs):
    world, results = runs
    for policy in ("greedy", "thompson"):
        result = results[policy]
        log = result.impressions
        assert len(log) == result.n_impressions == 5 * ROUNDS
        assert int(log["clicked"].sum()) == result.clicks
        assert set(log["policy"]) == {policy}
        assert result.regret.min() >= -1e-12  # no slate beats the best one
        assert 0.15 < log["randomized"].mean() < 0.45  # the service's randomized_share (0.3) at work


def test_thompson_learns_what_greedy_gets_wrong(runs):
    """Greedy keeps the starting model's ranking (only the users' own posteriors move); Thompson
    ranking with the shared model's online posterior (``shared_model="online"``) learns the
    dimension weights and the popularity sign from settled impressions.
    Seeds 0-7 of this world give ratios 0.14-0.28; 0.6 leaves room for noise, not for a
    posterior that stopped learning (with ``settle`` made a no-op the ratio is 0.96)."""
    _, results = runs
    greedy, thompson = results["greedy"].cumulative_regret, results["thompson"].cumulative_regret
    assert thompson < 0.6 * greedy, (thompson, greedy)
    late = slice(ROUNDS // 2, None)
    assert results["thompson"].regret[late].mean() < 0.5 * results["greedy"].regret[late].mean()


def test_every_new_ad_is_shown_under_thompson(runs):
    """New ads enter through ``add_ad`` (projected by the snapshot's projector, added to the
    live index) and must reach users who clearly prefer them within the window (seeds 0-7:
    at most 260 rounds; greedy, whose model has the popularity sign wrong, shows almost none).
    ``test_new_ads_nobody_favours_are_shown_through_their_own_random_effect`` covers the
    others."""
    world, results = runs
    thompson = results["thompson"]
    assert len(thompson.first_shown) == len(world.new_ads) == 8
    assert ((thompson.first_shown >= 0) & (thompson.first_shown <= WINDOW)).all(), thompson.first_shown.tolist()
    assert thompson.new_ad_impressions > 0


def test_the_randomized_slice_recovers_the_planted_theta(runs):
    """Ratio estimator on the pooled randomized slices of both logs (~1,800 slates, ~9,000
    impressions): the planted theta must lie in the estimator's 99.9% interval at every
    position, and the interval must be narrow enough to mean something (half-width under
    35% of theta)."""
    world, results = runs
    pooled = [e for e in sim.estimate_theta([results["greedy"], results["thompson"]]) if e.method == "ratio"][-1]
    assert pooled.n_impressions > 7000
    logs = pd.concat([results[p].impressions for p in ("greedy", "thompson")], ignore_index=True)
    randomized = logs[logs["randomized"].astype(bool)]
    wide = estimate_from_randomized(randomized.assign(clicked=randomized["clicked"].astype(int)), confidence=0.999)
    np.testing.assert_allclose(wide.theta, pooled.estimate.theta)  # the simulator's estimate is this one
    truth = world.theta[: len(wide.theta)]
    assert ((wide.lower <= truth) & (truth <= wide.upper)).all(), (wide.theta, wide.lower, wide.upper)
    assert ((wide.upper[1:] - wide.lower[1:]) / 2 < 0.35 * truth[1:]).all()


def test_the_known_relevance_floor_reads_each_logged_impressions_true_relevance(runs):
    """The simulator's floor for the position-bias estimators: theta's MLE given the truth's
    P(click | examined) of every logged (user, ad) pair. It must land near the planted theta
    on the greedy log (~9,000 impressions here), and a wrong lookup (relevance halved) must
    move it far."""
    world, results = runs
    floors = [
        e for e in sim.estimate_theta([results["greedy"]], sim.true_relevance(world)) if e.method == "known_relevance"
    ]
    assert floors and floors[0].n_impressions == len(results["greedy"].impressions)
    truth = world.theta[: len(floors[0].estimate.theta)]
    assert np.abs(floors[0].estimate.theta[1:] / truth[1:] - 1).max() < 0.25, floors[0].estimate.theta
    halved = sim.estimate_theta([results["greedy"]], lambda frame: 0.5 * sim.true_relevance(world)(frame))
    wrong = [e for e in halved if e.method == "known_relevance"][0].estimate.theta
    assert (wrong[1:] >= np.minimum(1.0, 1.5 * truth[1:]) - 1e-9).all(), wrong


def test_the_model_class_ceiling_ranks_by_the_fitted_models_and_per_ad_intercepts_only_add(runs):
    """The ceiling the closing notes quote: regret per round of today's score, of the best
    shared parameters and of those plus a per-ad intercept, all fitted to the truth. In the
    synthetic world the shared model can represent the truth's error, so fitting it must
    beat today's score, and per-ad intercepts must not undo that."""
    world, _ = runs
    ceiling = sim.model_class_ceiling(world)
    assert 0 < ceiling.best and 0 <= ceiling.per_ad <= ceiling.fitted + 0.02 * ceiling.best
    assert ceiling.fitted < 0.8 * ceiling.greedy, ceiling
    assert 0 <= ceiling.per_user < ceiling.greedy, ceiling  # each user's own best vector beats the snapshot's


def test_new_ads_nobody_favours_are_shown_through_their_own_random_effect(tmp_path, single_torch_thread):
    """New ads drawn from all ads, favourites or not: the shared posterior alone leaves
    some unshown (``fresh_prior_sd`` 0), each fresh ad's own random effect (the default) and
    the rotation of the never-shown ones (sized here to show each within ~500 requests) get
    every one shown within the window."""
    world = sim.synthetic_world(tmp_path / "artifacts", seed=SEED, rounds=ROUNDS, arrival_window=WINDOW,
                                new_ads_anywhere=True)  # fmt: skip
    first_shown = {}
    for prior_sd in (0.0, sim.DEFAULT_FRESH_PRIOR_SD):
        settings = sim.SimSettings(
            "thompson",
            SEED,
            ROUNDS,
            randomized_share=0.3,
            settle_every=100,
            fresh_prior_sd=prior_sd,
            fresh_rotation=WINDOW / 3,
        )
        first_shown[prior_sd] = sim.simulate(world, settings, tmp_path / f"sd-{prior_sd}").first_shown
    within = {sd: (shown >= 0) & (shown <= WINDOW) for sd, shown in first_shown.items()}
    assert not within[0.0].all(), first_shown[0.0].tolist()
    assert within[sim.DEFAULT_FRESH_PRIOR_SD].all(), first_shown[sim.DEFAULT_FRESH_PRIOR_SD].tolist()


def test_a_second_run_on_a_work_folder_in_use_is_refused_before_it_touches_the_runs(tmp_path, capsys):
    """Two runs on one ``--work`` would write their event logs into the same run folders and
    estimate theta from the mix."""
    import fcntl

    work = tmp_path / "work"
    work.mkdir()
    with (work / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit):
            sim.main(["--work", str(work), "--source", str(tmp_path / "absent"), "--rounds", "1"])
    assert "another bandit_sim run is using it" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == [".lock"]


def test_static_references_rank_their_own_scores_and_the_report_shares_the_oracles_gain(tmp_path):
    """A static policy serves the top of its fixed scores among live ads: handed the truth itself
    it has exactly the oracle's (zero) regret; handed anti-truth scores it loses more than
    random. The share of the oracle's gain is 1 for the oracle and 0 for random, per user group."""
    rounds = 400
    world = sim.synthetic_world(tmp_path / "artifacts", seed=1, rounds=rounds, arrival_window=200)
    world.static_scores = {"als": world.probability.copy(), "popularity": -world.probability}
    world.known = np.arange(len(world.user_ids)) % 3 != 0  # a third of the users count as new
    results = [sim.simulate(world, sim.SimSettings(policy, 1, rounds, settle_every=100), tmp_path / policy)
               for policy in (sim.ORACLE, "random", "als", "popularity")]  # fmt: skip
    by = {r.policy: r for r in results}
    assert np.abs(by["als"].regret).max() <= 1e-12  # the truth as static scores is the oracle
    assert by["popularity"].cumulative_regret > by["random"].cumulative_regret > 0
    assert (
        by["als"].known == world.known[np.random.default_rng([1, 1]).integers(len(world.user_ids), size=rounds)]
    ).all()
    table = sim.reference_table(results)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["oracle"].split("|")[2].strip() == "1.000" and rows["random"].split("|")[2].strip() == "0.000"
    assert rows["als"].split("|")[3].strip() == "1.000" and rows["als"].split("|")[4].strip() == "1.000"  # known / new
    assert float(rows["popularity"].split("|")[2]) < 0  # worse than random
    assert "regret / popularity's" in table and "regret / als's" in table


NULL_SEEDS, NULL_ROUNDS = range(5), 800


def _paired_interval(differences: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    half = stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1) / np.sqrt(len(differences))
    return float(differences.mean() - half), float(differences.mean() + half)


def test_in_the_null_scenario_thompson_equals_greedy_within_the_interval(tmp_path, single_torch_thread):
    """The null scenario: the snapshot's model is the truth, no ad or user arrives, nothing
    drifts; there is nothing to find, so exploring must cost nothing measurable. Over 5 seeds
    with common random numbers the paired 95% t interval of Thompson's regret minus greedy's
    contains 0 at the service's defaults; with every user's vector drawn at the population's
    full spread (known users as unsure as new ones) it lies above 0: the test can fail."""
    differences: dict[str, list[float]] = {"default": [], "wide": []}
    for seed in NULL_SEEDS:
        world = sim.synthetic_world(tmp_path / f"artifacts-{seed}", seed=seed, n_new=0, rounds=NULL_ROUNDS,
                                    weak_share=0.0, bias_weight=6.0)  # fmt: skip
        regret = {}
        for name, settings in {
            "greedy": sim.SimSettings("greedy", seed, NULL_ROUNDS, settle_every=100),
            "default": sim.SimSettings("thompson", seed, NULL_ROUNDS, settle_every=100),
            "wide": sim.SimSettings("thompson", seed, NULL_ROUNDS, settle_every=100, user_exploration=1.0,
                                    known_user_spread=1.0),
        }.items():  # fmt: skip
            regret[name] = sim.simulate(world, settings, tmp_path / f"{name}-{seed}").cumulative_regret
        for name in differences:
            differences[name].append(regret[name] - regret["greedy"])
    low, high = _paired_interval(np.array(differences["default"]))
    assert low <= 0 <= high, (low, high, differences)
    assert _paired_interval(np.array(differences["wide"]))[0] > 0, differences
