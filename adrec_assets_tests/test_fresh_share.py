"""Fresh ads held to a fair share (issue 29): under Thompson a burst of fresh ads takes at
most ``ceil(share * k)`` slots of a slate unless their clicks earn more, every one of them is
still shown within a bounded number of slates, the exploration a fresh ad gets is sized to
the spread of its competitors' scores, the propensities stay the probabilities the capped
policy serves with, and the service counts fresh and exploratory slots per policy.

References as in ``test_policy``: an exact brute-force index, seeded requests, empirical
frequencies against the policy's own distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from adrec_assets.online.api.metrics import Metrics
from adrec_assets.online.fresh_ads import FreshAdEffects
from adrec_assets.online.policy import make_policy
from adrec_assets.online.posterior import LaplaceLogisticPosterior
from adrec_assets.online.slot_counts import SlotCounts
from adrec_assets_tests.test_policy import (
    ExactIndex,
    learned_posterior,
    random_catalogue,
    served_frequencies,
    unit_rows,
    within_binomial_error,
)
from adrec_assets_tests.test_service import KNOWN_USER, make_service

pytestmark = pytest.mark.usefixtures("single_blas_thread")  # conftest: one BLAS thread for small matrices

K = 10


def burst(n_ads: int = 200, dim: int = 8, share: float = 0.2, prior_sd: float = 3.0, seed: int = 0):
    """A small catalogue whose last ``share`` arrived at once: (index, effects, fresh slots, posterior)."""
    rng = np.random.default_rng(seed)
    index = ExactIndex(random_catalogue(n_ads, dim, rng))
    fresh_slots = np.arange(n_ads - int(share * n_ads), n_ads)
    effects = FreshAdEffects(dim, prior_sd)
    effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, index.vectors(fresh_slots))
    return index, effects, fresh_slots, learned_posterior(index, rng)


def serve(policy, index, dim: int, slates: int, seed: int, k: int = K) -> list:
    rng = np.random.default_rng(seed)
    users = unit_rows(rng.normal(size=(slates, dim)))
    return [policy.recommend(user, index, k, rng) for user in users]


def fresh_per_slate(slates: list, fresh_slots: np.ndarray) -> np.ndarray:
    return np.asarray([np.isin(s.slots, fresh_slots).sum() for s in slates])


# --- the cap -----------------------------------------------------------------------------------


def test_a_burst_of_fresh_ads_is_held_to_its_share_of_slots_where_uncapped_it_takes_most():
    index, effects, fresh_slots, posterior = burst()
    capped = fresh_per_slate(
        serve(make_policy("thompson", posterior=posterior, fresh=effects), index, 8, 400, seed=1), fresh_slots
    )
    uncapped = fresh_per_slate(
        serve(make_policy("thompson", posterior=posterior, fresh=effects, fresh_share=1.0), index, 8, 400, seed=1),
        fresh_slots,
    )
    assert capped.max() <= math.ceil(0.2 * K)  # per slate, never more than the cap
    assert capped.sum() / (400 * K) <= 0.2
    assert capped.sum() > 0  # ... but fresh ads are shown
    assert uncapped.sum() / (400 * K) > 0.4  # what a strong prior did before the cap (the burst's 20% of ads)


@pytest.mark.parametrize("share, k", [(0.1, 10), (0.3, 10), (0.2, 4), (0.0, 10)])
def test_the_cap_is_ceil_share_times_k_per_slate(share, k):
    index, effects, fresh_slots, posterior = burst(share=0.5)  # half the catalogue fresh
    policy = make_policy("thompson", posterior=posterior, fresh=effects, fresh_share=share)
    counts = fresh_per_slate(serve(policy, index, 8, 150, seed=2, k=k), fresh_slots)
    assert counts.max() == math.ceil(share * k - 1e-9)


def test_every_fresh_ad_is_shown_within_a_bounded_number_of_slates_even_the_worst_projected():
    """40 fresh ads, ten of them pointing away from every user: Thompson alone (the effect
    sized to the spread) would hardly ever rank those into the slate; the rotation slot
    shows every fresh ad not yet shown, so with ``fresh_rotation`` 40 (each shown within about
    40 requests) all 40 appear within a few times 40 slates."""
    rng = np.random.default_rng(3)
    rows = random_catalogue(200, 8, rng)
    taste = unit_rows(rng.normal(size=8))
    fresh_slots = np.arange(160, 200)
    rows[190:, :8] = -taste  # the worst ads for every user near `taste`
    rows[190:, 8] = -0.3
    index = ExactIndex(rows)
    effects = FreshAdEffects(8, 1.0)
    effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, index.vectors(fresh_slots))
    posterior = learned_posterior(index, rng)
    users = unit_rows(taste + 0.3 * rng.normal(size=(300, 8)))
    first_shown = {}
    for number, user in enumerate(users):
        policy = make_policy("thompson", posterior=posterior, fresh=effects, fresh_rotation=40)
        for slot in policy.recommend(user, index, K, rng).slots:
            first_shown.setdefault(int(slot), number)
    assert set(fresh_slots.tolist()) <= set(first_shown), sorted(set(fresh_slots.tolist()) - set(first_shown))
    assert max(first_shown[int(s)] for s in fresh_slots) < 300
    # without the rotation (no cap), the ten worst are (almost) never reached by their effect alone
    uncapped = make_policy("thompson", posterior=posterior, fresh=effects, fresh_share=1.0)
    shown = {int(s) for user in users for s in uncapped.recommend(user, index, K, rng).slots}
    assert len(shown & set(range(190, 200))) <= 2


def test_fresh_ads_whose_clicks_earned_their_place_can_exceed_the_cap():
    """Four fresh ads made the user's best: before any feedback they are held to the cap
    (one of five slots); after many clicks each (an effect well above zero, with evidence)
    they are earned and all four are shown."""
    rng = np.random.default_rng(4)
    rows = random_catalogue(100, 8, rng)
    user = unit_rows(rng.normal(size=8))
    fresh_slots = np.arange(96, 100)
    rows[fresh_slots, :8] = unit_rows(user + 0.05 * rng.normal(size=(4, 8)))
    index = ExactIndex(rows)
    effects = FreshAdEffects(8, 1.0)
    effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, index.vectors(fresh_slots))
    posterior = LaplaceLogisticPosterior.prior(8, weight_std=0.3, bias_std=0.3)
    policy = make_policy("thompson", posterior=posterior, fresh=effects, fresh_share=0.2)
    before = fresh_per_slate([policy.recommend(user, index, 5, rng) for _ in range(100)], fresh_slots)
    assert before.max() == 1
    impressions = np.repeat(fresh_slots, 60)
    effects.update(impressions, np.zeros(len(impressions)), np.ones(len(impressions)), np.ones(len(impressions)))
    after = fresh_per_slate([policy.recommend(user, index, 5, rng) for _ in range(100)], fresh_slots)
    assert after.min() == 4


def test_skipped_fresh_ads_lose_their_place_to_those_not_yet_shown():
    """Shown-and-skipped fresh ads gather evidence against them; the rotation then goes to the
    fresh ads without any, so the slots given to those rise."""
    index, effects, fresh_slots, posterior = burst(prior_sd=1.0, seed=5)
    skipped, unseen = fresh_slots[:20], fresh_slots[20:]
    impressions = np.repeat(skipped, 30)
    effects.update(impressions, np.zeros(len(impressions)), np.zeros(len(impressions)), np.ones(len(impressions)))
    slates = serve(make_policy("thompson", posterior=posterior, fresh=effects), index, 8, 300, seed=6)
    assert fresh_per_slate(slates, unseen).sum() > 3 * max(fresh_per_slate(slates, skipped).sum(), 1)


# --- sizing ------------------------------------------------------------------------------------


def test_a_fresh_ads_exploration_is_sized_to_the_spread_of_its_competitors_scores():
    """Scaling every stored vector by 4 scales every score and the trained candidates' spread
    by 4: with the effect sized to that spread the slates are the same, request for request;
    with a fixed prior the fresh ads' share changes."""
    index, effects, fresh_slots, posterior = burst(prior_sd=1.0, seed=7)
    wide = ExactIndex(index.vectors(index.live_slots()) * 4)
    wide_effects = FreshAdEffects(8, 1.0)
    wide_effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, wide.vectors(fresh_slots))
    counts = {}
    for spread_prior in (True, False):
        options = {"posterior": posterior, "fresh_share": 1.0, "fresh_spread_prior": spread_prior}
        plain = serve(make_policy("thompson", fresh=effects, **options), index, 8, 200, seed=8)
        scaled = serve(make_policy("thompson", fresh=wide_effects, **options), wide, 8, 200, seed=8)
        counts[spread_prior] = fresh_per_slate(plain, fresh_slots).sum(), fresh_per_slate(scaled, fresh_slots).sum()
        if spread_prior:
            assert all(np.array_equal(a.slots, b.slots) for a, b in zip(plain, scaled))
    plain, scaled = counts[False]
    assert abs(plain - scaled) > 0.2 * max(plain, scaled)


# --- propensities ------------------------------------------------------------------------------


def test_capped_propensities_match_the_serving_frequencies():
    """40 ads, 15 fresh with wide effects, k = 4 (cap 1, a rotating slot in 80% of slates):
    the candidates cover the catalogue, so only Monte Carlo noise separates the policy's
    distribution from the served frequencies, and the logged propensities are unbiased."""
    rng = np.random.default_rng(10)
    index = ExactIndex(random_catalogue(40, 4, rng))
    fresh_slots = np.arange(0, 40, 3)[:15]
    effects = FreshAdEffects(4, 1.5)
    effects.register([f"ad-{s}" for s in fresh_slots], fresh_slots, index.vectors(fresh_slots))
    impressions = np.repeat(fresh_slots[:5], 10)  # five of them shown before: no longer in the rotation
    effects.update(impressions, np.zeros(50), (np.arange(50) % 3 == 0).astype(float), np.ones(50))
    posterior = LaplaceLogisticPosterior.prior(4, weight_std=0.5, bias_std=0.5)
    user = unit_rows(rng.normal(size=4))
    k, runs = 4, 4_000
    options = {"posterior": posterior, "fresh": effects, "propensity_candidates": 40, "propensity_fresh_candidates": 15}
    policy = make_policy("thompson", **options)
    generator = np.random.default_rng(100)
    slates = [policy.recommend(user, index, k, generator) for _ in range(runs)]
    assert fresh_per_slate(slates, fresh_slots).max() == 1
    frequencies = served_frequencies(slates, 40, k)
    reference = make_policy("thompson", **{**options, "propensity_draws": 100_000})
    distribution = reference.position_distribution(user, index, k, np.random.default_rng(101))
    np.testing.assert_allclose(distribution.probabilities.sum(axis=0), 1.0, atol=1e-9)
    truth = np.zeros((40, k))
    truth[distribution.slots] = distribution.probabilities
    within_binomial_error(frequencies, truth, runs)
    logged = np.concatenate([s.propensities for s in slates])
    cell_truth = np.concatenate([truth[s.slots, np.arange(k)] for s in slates])
    assert abs(np.mean(logged - cell_truth)) <= 0.01
    # the uncapped policy's distribution is another one: these frequencies tell them apart
    uncapped = make_policy("thompson", **{**options, "propensity_draws": 100_000, "fresh_share": 1.0})
    other = uncapped.position_distribution(user, index, k, np.random.default_rng(101))
    other_truth = np.zeros((40, k))
    other_truth[other.slots] = other.probabilities
    with pytest.raises(AssertionError):
        within_binomial_error(frequencies, other_truth, runs)


# --- exploratory slots and the metrics ---------------------------------------------------------


def test_exploratory_slots_are_those_the_posterior_means_top_k_would_not_show():
    index, effects, fresh_slots, posterior = burst(seed=11)
    user = unit_rows(np.random.default_rng(12).normal(size=8))
    greedy = make_policy("greedy", posterior=posterior).recommend(user, index, K, np.random.default_rng(0))
    assert not greedy.explored.any()
    mean_only = make_policy("thompson", posterior=posterior, exploration_scale=0.0)
    assert not mean_only.recommend(user, index, K, np.random.default_rng(0)).explored.any()
    thompson = make_policy("thompson", posterior=posterior, fresh=effects)
    for seed in range(20):
        slate = thompson.recommend(user, index, K, np.random.default_rng(seed))
        np.testing.assert_array_equal(slate.explored, ~np.isin(slate.slots, greedy.slots))  # no fresh ad has evidence
    every = make_policy("epsilon_greedy", posterior=posterior, epsilon=1.0).recommend(
        user, index, K, np.random.default_rng(0)
    )
    assert every.explored.all()
    todays = make_policy("greedy").recommend(user, index, K, np.random.default_rng(0)).slots
    for seed in range(20):  # random (its slate in random order too): against today's greedy slate
        shuffled = make_policy("random", randomized_share=1.0).recommend(user, index, K, np.random.default_rng(seed))
        np.testing.assert_array_equal(shuffled.explored, ~np.isin(shuffled.slots, todays))


def test_slot_counts_and_the_metrics_count_fresh_and_exploratory_slots_per_policy():
    index, effects, fresh_slots, posterior = burst(seed=13)
    counts = SlotCounts()
    expected = {}
    rng = np.random.default_rng(14)
    for name, options in (("thompson", {"posterior": posterior, "fresh": effects}), ("greedy", {})):
        policy = make_policy(name, **options)
        slates = [policy.recommend(unit_rows(rng.normal(size=8)), index, K, rng) for _ in range(30)]
        for slate in slates:
            counts.add(slate, effects)
        expected[name] = (
            30, 30 * K, int(fresh_per_slate(slates, fresh_slots).sum()), int(sum(s.explored.sum() for s in slates))
        )  # fmt: skip
    assert {name: tuple(totals) for name, totals in counts.totals().items()} == expected
    assert expected["thompson"][2] > 0 and expected["thompson"][3] > 0 and expected["greedy"][3] == 0
    metrics = Metrics(slots=counts.totals)
    metrics.refresh()
    metrics.refresh()  # a second scrape adds nothing new
    text = metrics.exposition().decode()
    for name, (slates, slots, fresh, explored) in expected.items():
        assert f'adrec_slates_total{{policy="{name}"}} {float(slates)}' in text
        assert f'adrec_slots_total{{policy="{name}"}} {float(slots)}' in text
        assert f'adrec_fresh_slots_total{{policy="{name}"}} {float(fresh)}' in text
        assert f'adrec_explored_slots_total{{policy="{name}"}} {float(explored)}' in text
    counts.add(make_policy("greedy").recommend(unit_rows(rng.normal(size=8)), index, K, rng), effects)
    metrics.refresh()
    assert f'adrec_slates_total{{policy="greedy"}} {float(expected["greedy"][0] + 1)}' in metrics.exposition().decode()


def test_the_share_must_be_a_share():
    posterior = LaplaceLogisticPosterior.prior(4)
    with pytest.raises(ValueError, match="fresh_share"):
        make_policy("thompson", posterior=posterior, fresh_share=1.5)


# --- the experiment report ---------------------------------------------------------------------


def test_the_experiment_report_shows_each_arms_fresh_and_exploratory_shares_from_the_served_log(tmp_path):
    """Served-log rows as the service writes them (the slot flags with each impression; old
    rows without them) through the event file, the explode and the report."""
    import pandas as pd
    import pyarrow.parquet as pq

    from adrec_assets.abtest.report import analyze_experiment, per_user_table, report_figures, slot_shares
    from adrec_assets.online.events import EVENTS_DIRNAME, event_table, read_event_log
    from adrec_assets.online.experiments import explode_event_log

    rng = np.random.default_rng(20)
    rows = []
    flags = {"control": (0.0, 0.0), "treatment": (0.25, 0.5)}  # P(fresh), P(explored) per impression
    for number in range(400):
        arm = "control" if number % 2 else "treatment"
        user = f"{number:032x}"
        for position in range(5):
            fresh, explored = (bool(rng.random() < p) for p in flags[arm])
            row = {
                "event_id": f"{number}-{position}", "request_id": f"{number:032x}", "user_pseudonym": user,
                "ad_id": f"ad-{position}", "position": position, "type": "impression", "timestamp": 1e9 + number,
                "served_at": 1e9 + number, "policy": "greedy" if arm == "control" else "thompson",
                "propensity": 1.0, "score": 0.0, "randomized": False, "experiments": f"exp={arm}",
                "model_version": "v1", "weight": 1.0, "fresh": fresh, "explored": explored,
            }  # fmt: skip
            if number < 20:  # logged before the flags existed
                del row["fresh"], row["explored"]
            rows.append(row)
            if position == 0 and rng.random() < 0.3:
                rows.append({**row, "event_id": f"{number}-click", "type": "click"})
    (tmp_path / EVENTS_DIRNAME).mkdir()
    pq.write_table(event_table(rows), tmp_path / EVENTS_DIRNAME / "served-000000000001-000000999999.parquet")
    exploded = explode_event_log(read_event_log(tmp_path).to_pandas())
    shares = slot_shares(exploded, "exp", ["control", "treatment"])
    logged = pd.DataFrame([r for r in rows if r["type"] == "impression" and "fresh" in r])
    by_arm = {a.arm: a for a in shares}
    for arm, policy in (("control", "greedy"), ("treatment", "thompson")):
        expected = logged[logged["experiments"] == f"exp={arm}"]
        assert by_arm[arm].impressions == len(expected) == 5 * 190
        assert by_arm[arm].fresh_share == pytest.approx(expected["fresh"].mean())
        assert by_arm[arm].explored_share == pytest.approx(expected["explored"].mean())
        assert by_arm[arm].policies == (policy,)
    assert by_arm["control"].fresh_share == 0 and 0.15 < by_arm["treatment"].fresh_share < 0.35
    report = analyze_experiment(
        per_user_table(exploded, "exp"), {"control": 0.5, "treatment": 0.5}, experiment="exp", slots=shares
    )
    markdown = report.markdown()
    treatment = by_arm["treatment"]
    assert f"| treatment | thompson | {treatment.impressions:,} | {treatment.fresh_share:.1%} |" in markdown
    figures = {row["arm"]: row for row in report_figures(report)}
    assert figures["treatment"]["explored_share"] == pytest.approx(treatment.explored_share)
    assert slot_shares(exploded.drop(columns=["fresh"]), "exp", ["control"]) == ()  # a log without the flags


# --- through the service -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(default_pipeline):
    base, result, _ = default_pipeline
    assert result.success
    return base


def test_the_service_exports_slot_counts_per_policy_and_logs_each_slots_flags(published, tmp_path):
    """Over HTTP on the session's published snapshot: slates of two policies, ``/metrics``
    counts their slots and exploratory ones, and every served slot's flags reach its
    impression's row of the served log."""
    from fastapi.testclient import TestClient

    from adrec_assets.online.api import create_app
    from adrec_assets.online.events import read_event_log
    from adrec_assets_tests.pipeline_fixtures import id_key

    # the user's own draw on (by default Thompson explores fresh ads only, and there are none here)
    service = make_service(published, tmp_path, fresh_share=0.2, user_exploration=1.0)
    with id_key(), TestClient(create_app(service)) as client:
        served = {}
        for policy in ("thompson", "greedy"):
            served[policy] = [
                client.get("/v1/recommendations", params={"user_id": KNOWN_USER, "k": 10, "policy": policy}).json()
                for _ in range(5)
            ]
        text = client.get("/metrics").text
        totals = service.slot_counts.totals()
        for policy, answers in served.items():
            slots = sum(len(a["items"]) for a in answers)
            assert totals[policy].slates == 5 and totals[policy].slots == slots
            assert f'adrec_slots_total{{policy="{policy}"}} {float(slots)}' in text
            assert f'adrec_explored_slots_total{{policy="{policy}"}} {float(totals[policy].explored)}' in text
        assert totals["greedy"].explored == 0 and totals["thompson"].explored > 0
        answer = served["thompson"][0]
        record = service.online.get_request(answer["request_id"])
        assert len(record["fresh"]) == len(record["explored"]) == len(answer["items"])
        events = [{"request_id": answer["request_id"], "user_id": KNOWN_USER, "ad_id": item["ad_id"],
                   "position": item["position"], "type": "impression", "timestamp": 1.7e9} for item in answer["items"]]  # fmt: skip
        assert client.post("/v1/events", json={"events": events}).status_code == 200
        service.flush()
        log = read_event_log(tmp_path / "sources" / "synthetic").to_pandas()
        rows = log[log["request_id"] == answer["request_id"]].sort_values("position")
        assert rows["explored"].tolist() == record["explored"] and rows["fresh"].tolist() == record["fresh"]


# --- exploration per entity: the shared model's draw can be switched off ------------------------


def test_thompson_without_the_shared_draw_explores_only_fresh_ads():
    """shared_scale 0 (ADREC_SERVE_SHARED_EXPLORATION=0): every trained ad is ranked by the shared
    posterior's mean, as greedy on that mean ranks it, and only fresh ads' own effects vary."""
    index, effects, fresh_slots, posterior = burst(seed=3)
    greedy = make_policy("greedy", posterior=posterior)
    per_entity = make_policy("thompson", posterior=posterior, fresh=effects, shared_scale=0.0)
    both = make_policy("thompson", posterior=posterior, fresh=effects)
    trained_differs = {"per_entity": 0, "both": 0}
    rng = np.random.default_rng(5)
    for user in unit_rows(rng.normal(size=(150, 8))):
        mean_trained = greedy.recommend(user, index, K, rng, exclude=set(fresh_slots.tolist())).slots
        for name, policy in (("per_entity", per_entity), ("both", both)):
            slate = policy.recommend(user, index, K, rng)
            trained = slate.slots[~np.isin(slate.slots, fresh_slots)]
            expected = mean_trained[: len(trained)]  # the mean's order of the trained ads
            trained_differs[name] += int(not np.array_equal(trained, expected))
    assert trained_differs["per_entity"] == 0  # trained ads keep the mean's order
    assert trained_differs["both"] > 0  # the shared draw reorders them
    fresh_shown = fresh_per_slate(serve(per_entity, index, 8, 200, seed=6), fresh_slots)
    assert fresh_shown.sum() > 0  # fresh ads still explored
    for bad in (-1.0, float("inf"), 1e39):
        with pytest.raises(ValueError, match="shared_scale"):
            make_policy("thompson", posterior=posterior, shared_scale=bad)


def test_thompson_without_the_shared_draw_and_without_fresh_ads_is_greedy_on_the_mean():
    rng = np.random.default_rng(7)
    index = ExactIndex(random_catalogue(1_000, 8, rng))
    posterior = learned_posterior(index, rng)
    thompson = make_policy("thompson", posterior=posterior, shared_scale=0.0)
    greedy = make_policy("greedy", posterior=posterior)
    for user in unit_rows(rng.normal(size=(30, 8))):
        slate = thompson.recommend(user, index, K, rng)
        np.testing.assert_array_equal(slate.slots, greedy.recommend(user, index, K, rng).slots)
        np.testing.assert_array_equal(slate.propensities, np.ones(K))
        assert not slate.explored.any()


def test_the_service_passes_shared_exploration_to_thompson(published, tmp_path):
    from adrec_assets.online.config import ServingConfig
    from adrec_assets_tests.pipeline_fixtures import id_key

    service = make_service(published, tmp_path, shared_exploration=0.0)
    with id_key():
        service.start(background=False)
    policy = service._policy(service.state, "thompson")
    inner = getattr(policy, "base", policy)  # the randomized-order wrapper keeps the policy
    assert inner.shared_scale == 0.0
    for bad in (-0.5, 1e39):
        config = ServingConfig("synthetic", published, tmp_path, shared_exploration=bad)
        with pytest.raises(ValueError, match="ADREC_SERVE_SHARED_EXPLORATION"):
            config.validate()


def test_the_rotation_is_sized_to_how_many_fresh_ads_wait_not_to_the_cap():
    """Two fresh ads pointing away from every user, never shown: the rotation gives them about
    2 / fresh_rotation of the slates, not the cap's share of every slate; once there are more
    waiting than ``fresh_rotation`` requests can show, it is the cap's share."""
    rng = np.random.default_rng(4)
    rows = random_catalogue(200, 8, rng)
    taste = unit_rows(rng.normal(size=8))
    rows[198:, :8], rows[198:, 8] = -taste, -0.3
    index = ExactIndex(rows)
    effects = FreshAdEffects(8, 1.0)
    effects.register(["ad-198", "ad-199"], np.array([198, 199]), index.vectors(np.array([198, 199])))
    posterior = learned_posterior(index, rng)
    users = unit_rows(taste + 0.3 * rng.normal(size=(400, 8)))

    def fresh_slots_shown(rotation: float) -> int:
        policy = make_policy("thompson", posterior=posterior, fresh=effects, fresh_rotation=rotation)
        return sum(int(np.isin(policy.recommend(user, index, K, rng).slots, [198, 199]).sum()) for user in users)

    assert fresh_slots_shown(1000.0) <= 6  # about 400 x 2 / 1000 = 0.8 expected
    assert fresh_slots_shown(1.0) >= 300  # 2 waiting / 1 request: one rotated in nearly every slate
