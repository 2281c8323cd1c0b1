"""Experiment declarations and hash assignment: a specification in tests."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats

from adrec_assets.online.experiments import (
    Arm,
    Assignment,
    AssignmentLabelError,
    DuplicateNameError,
    Experiment,
    ExperimentConfigError,
    ExperimentSet,
    InvalidPseudonymError,
    InvalidValueError,
    LayerOverflowError,
    MissingFieldError,
    ParameterConflictError,
    UnknownKeyError,
    format_assignment_label,
    hash_uniform,
    load_experiments,
    merge_assignments,
    parse_assignment_label,
)

NOV_15 = datetime(2026, 11, 15, tzinfo=UTC)
SIGNIFICANCE = 0.001  # a seeded check this strict fails only on a real defect, never by luck


def random_pseudonyms(n: int, seed: int) -> np.ndarray:
    """n distinct-looking 32-hex strings, like HMAC pseudonyms, from a seeded generator."""
    hex_text = np.random.default_rng(seed).bytes(16 * n).hex()
    return np.frombuffer(hex_text.encode("ascii"), dtype="S32").astype("U32")


def experiment_set(body: str, origin: str = "experiments.toml") -> ExperimentSet:
    return ExperimentSet.from_toml_text(textwrap.dedent(body), origin=origin)


TWO_LAYERS = """
[[experiment]]
name = "policy-thompson"
salt = "2026-11-policy"
layer = "ranking"
start = 2026-11-01T00:00:00Z
stop = 2026-12-01T00:00:00Z
  [[experiment.arm]]
  name = "control"
  share = 0.5
  policy = "greedy"
  [[experiment.arm]]
  name = "treatment"
  share = 0.5
  policy = "thompson"

[[experiment]]
name = "snapshot-refresh"
salt = "2026-11-snapshot"
layer = "model"
start = 2026-11-01T00:00:00Z
  [[experiment.arm]]
  name = "control"
  share = 0.6
  [[experiment.arm]]
  name = "fresh"
  share = 0.4
  model_version = "s-1234abcd"
"""


def three_arm_experiment(salt: str = "three-arms", traffic: float = 1.0) -> Experiment:
    return Experiment(
        name=f"exp-{salt}",
        salt=salt,
        arms=(Arm("a", 0.2), Arm("b", 0.3), Arm("c", 0.5)),
        start=datetime(2026, 11, 1, tzinfo=UTC),
        traffic=traffic,
    )


# --- determinism and the statistics of the split ------------------------------------------


def test_a_user_gets_the_same_arms_from_every_fresh_load_of_the_same_file():
    ids = random_pseudonyms(2_000, seed=1)
    first = experiment_set(TWO_LAYERS).assign_many(ids, NOV_15)
    second = experiment_set(TWO_LAYERS).assign_many(ids, NOV_15)
    assert first.keys() == second.keys() == {"policy-thompson", "snapshot-refresh"}
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert len({tuple(a.arm for a in experiment_set(TWO_LAYERS).assign(ids[0], NOV_15)) for _ in range(3)}) == 1


def test_single_user_assignment_agrees_with_the_vectorized_one():
    experiments = experiment_set(TWO_LAYERS)
    ids = random_pseudonyms(300, seed=2)
    many = experiments.assign_many(ids, NOV_15)
    for index, pseudonym in enumerate(ids):
        got = {a.experiment: a.arm for a in experiments.assign(str(pseudonym), NOV_15)}
        expected = {name: experiments[name].arms[arm].name for name, arms in many.items() if (arm := arms[index]) >= 0}
        assert got == expected


def test_the_hash_is_uniform_on_the_unit_interval():
    u = hash_uniform("arm", "any-salt", random_pseudonyms(100_000, seed=3))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > SIGNIFICANCE


def test_a_three_arm_split_matches_its_shares_by_chi_square_over_100k_pseudonyms():
    arms = three_arm_experiment().assign_many(random_pseudonyms(100_000, seed=4))
    observed = np.bincount(arms, minlength=3)
    assert observed.sum() == 100_000
    assert stats.chisquare(observed, 100_000 * np.array([0.2, 0.3, 0.5])).pvalue > SIGNIFICANCE
    # The same counts are far from a split one point off: the check has the power to fail.
    assert stats.chisquare(observed, 100_000 * np.array([0.21, 0.29, 0.5])).pvalue < 1e-6


def test_splits_of_experiments_with_different_salts_are_independent():
    ids = random_pseudonyms(100_000, seed=5)
    first = three_arm_experiment("salt-one").assign_many(ids)
    second = three_arm_experiment("salt-two").assign_many(ids)
    table = np.zeros((3, 3), dtype=np.int64)
    np.add.at(table, (first, second), 1)
    assert stats.chi2_contingency(table).pvalue > SIGNIFICANCE
    # A shared salt gives the same split twice: the test of independence sees it at once.
    same = three_arm_experiment("salt-one").assign_many(ids)
    table_same = np.zeros((3, 3), dtype=np.int64)
    np.add.at(table_same, (first, same), 1)
    assert stats.chi2_contingency(table_same).pvalue < 1e-6


def test_experiments_in_different_layers_take_independent_halves_of_the_users():
    ids = random_pseudonyms(50_000, seed=6)
    body = """
    [[experiment]]
    name = "left"
    salt = "s-left"
    layer = "one"
    traffic = 0.5
    start = 2026-11-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 1.0
    [[experiment]]
    name = "right"
    salt = "s-right"
    layer = "two"
    traffic = 0.5
    start = 2026-11-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 1.0
    """
    assigned = experiment_set(body).assign_many(ids, NOV_15)
    in_left, in_right = assigned["left"] >= 0, assigned["right"] >= 0
    table = np.array(
        [
            [np.sum(in_left & in_right), np.sum(in_left & ~in_right)],
            [np.sum(~in_left & in_right), np.sum(~in_left & ~in_right)],
        ]
    )
    assert stats.chi2_contingency(table).pvalue > SIGNIFICANCE
    assert stats.binomtest(int(in_left.sum()), ids.size, 0.5).pvalue > SIGNIFICANCE


def test_same_layer_experiments_never_share_a_user_and_take_their_traffic():
    body = """
    [[experiment]]
    name = "first"
    salt = "s-first"
    layer = "ranking"
    traffic = 0.3
    start = 2026-11-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 0.5
      policy = "greedy"
      [[experiment.arm]]
      name = "treatment"
      share = 0.5
      policy = "thompson"
    [[experiment]]
    name = "second"
    salt = "s-second"
    layer = "ranking"
    traffic = 0.5
    start = 2026-11-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 0.5
      policy = "greedy"
      [[experiment.arm]]
      name = "treatment"
      share = 0.5
      policy = "epsilon_greedy"
    """
    experiments = experiment_set(body)
    ids = random_pseudonyms(50_000, seed=7)
    assigned = experiments.assign_many(ids, NOV_15)
    in_first, in_second = assigned["first"] >= 0, assigned["second"] >= 0
    assert not np.any(in_first & in_second)
    assert stats.binomtest(int(in_first.sum()), ids.size, 0.3).pvalue > SIGNIFICANCE
    assert stats.binomtest(int(in_second.sum()), ids.size, 0.5).pvalue > SIGNIFICANCE
    assert experiments["second"].offset == pytest.approx(0.3)


def test_a_new_salt_reshuffles_the_arms_but_keeps_the_users_of_the_layer_slice():
    ids = random_pseudonyms(50_000, seed=11)
    partial = TWO_LAYERS.replace('layer = "ranking"', 'layer = "ranking"\ntraffic = 0.4', 1)
    resalted = partial.replace('"2026-11-policy"', '"2026-12-policy"')
    before = experiment_set(partial).assign_many(ids, NOV_15)["policy-thompson"]
    after = experiment_set(resalted).assign_many(ids, NOV_15)["policy-thompson"]
    np.testing.assert_array_equal(before >= 0, after >= 0)
    inside = before >= 0
    table = np.zeros((2, 2), dtype=np.int64)
    np.add.at(table, (before[inside], after[inside]), 1)
    assert stats.chi2_contingency(table).pvalue > SIGNIFICANCE  # old and new arms are unrelated


def test_a_layer_slice_can_be_reused_once_the_earlier_experiment_has_stopped():
    body = """
    [[experiment]]
    name = "november"
    salt = "s-nov"
    layer = "ranking"
    start = 2026-11-01T00:00:00Z
    stop = 2026-12-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 1.0
      policy = "greedy"
    [[experiment]]
    name = "december"
    salt = "s-dec"
    layer = "ranking"
    offset = 0.0
    start = 2026-12-01T00:00:00Z
      [[experiment.arm]]
      name = "control"
      share = 1.0
      policy = "thompson"
    """
    experiments = experiment_set(body)
    assert [e.name for e in experiments.active(NOV_15)] == ["november"]
    assert [e.name for e in experiments.active(datetime(2026, 12, 2, tzinfo=UTC))] == ["december"]


def test_an_experiment_is_active_from_start_inclusive_to_stop_exclusive():
    experiment = experiment_set(TWO_LAYERS)["policy-thompson"]
    start, stop = experiment.start, experiment.stop
    assert not experiment.is_active(start - timedelta(microseconds=1))
    assert experiment.is_active(start)
    assert experiment.is_active(stop - timedelta(microseconds=1))
    assert not experiment.is_active(stop)
    experiments = experiment_set(TWO_LAYERS)
    ids = random_pseudonyms(10, seed=8)
    assert {a.experiment for a in experiments.assign(str(ids[0]), start)} == {"policy-thompson", "snapshot-refresh"}
    assert {a.experiment for a in experiments.assign(str(ids[0]), stop)} == {"snapshot-refresh"}
    assert experiments.assign(str(ids[0]), start - timedelta(days=1)) == []
    assert experiments.assign_many(ids, start - timedelta(days=1)) == {}


def test_assignment_refuses_raw_ids_and_naive_times():
    experiments = experiment_set(TWO_LAYERS)
    with pytest.raises(InvalidPseudonymError, match="raw user id"):
        experiments.assign("user-42", NOV_15)
    with pytest.raises(InvalidPseudonymError):
        experiments.assign_many(np.array(["ABCDEF0123456789ABCDEF0123456789"]), NOV_15)
    with pytest.raises(ValueError, match="timezone-aware"):
        experiments.assign(str(random_pseudonyms(1, seed=9)[0]), datetime(2026, 11, 15))


# --- overrides and log labels -----------------------------------------------------------


def test_assignments_merge_into_one_policy_one_model_version_and_a_parsable_label():
    experiments = experiment_set(TWO_LAYERS)
    ids = random_pseudonyms(2_000, seed=10)
    assigned = experiments.assign_many(ids, NOV_15)
    index = int(np.flatnonzero((assigned["policy-thompson"] == 1) & (assigned["snapshot-refresh"] == 1))[0])
    overrides = merge_assignments(experiments.assign(str(ids[index]), NOV_15))
    assert overrides.policy == "thompson"
    assert overrides.model_version == "s-1234abcd"
    assert overrides.label == "policy-thompson=treatment;snapshot-refresh=fresh"
    assert parse_assignment_label(overrides.label) == {"policy-thompson": "treatment", "snapshot-refresh": "fresh"}


def test_the_label_is_canonical_and_round_trips():
    assignments = [Assignment("zeta", "b"), Assignment("alpha", "control")]
    label = format_assignment_label(assignments)
    assert label == format_assignment_label(list(reversed(assignments))) == "alpha=control;zeta=b"
    assert parse_assignment_label(label) == {"alpha": "control", "zeta": "b"}
    assert parse_assignment_label("") == {}
    assert merge_assignments([]).label == ""


@pytest.mark.parametrize("label", ["alpha", "alpha=", "=b", "a=b;a=c", "a=b;;c=d", "a b=c"])
def test_malformed_labels_are_refused(label):
    with pytest.raises(AssignmentLabelError):
        parse_assignment_label(label)


def test_merging_two_different_policies_is_refused():
    with pytest.raises(ParameterConflictError, match="policy"):
        merge_assignments([Assignment("a", "x", policy="greedy"), Assignment("b", "y", policy="thompson")])


# --- validation: every error names file, experiment and field ------------------------------

VALID_ARMS = """
  [[experiment.arm]]
  name = "control"
  share = 0.5
  [[experiment.arm]]
  name = "treatment"
  share = 0.5
"""


def one_experiment(header: str, arms: str = VALID_ARMS) -> str:
    return f"[[experiment]]\n{textwrap.dedent(header)}\n{arms}\n"


BASE = 'name = "exp"\nsalt = "s"\nstart = 2026-11-01T00:00:00Z\n'

INVALID_FILES = {
    "unknown experiment key": (BASE + "trafic = 0.5", UnknownKeyError, "exp", "trafic"),
    "unknown arm key": (
        BASE,
        UnknownKeyError,
        "exp",
        "arm 'control'.shares",
        '[[experiment.arm]]\nname = "control"\nshares = 1.0\n',
    ),
    "unknown top-level key": ("", UnknownKeyError, None, "experiments", None),
    "missing name": ('salt = "s"\nstart = 2026-11-01T00:00:00Z', MissingFieldError, "#1", "name"),
    "missing salt": ('name = "exp"\nstart = 2026-11-01T00:00:00Z', MissingFieldError, "exp", "salt"),
    "empty salt": ('name = "exp"\nsalt = ""\nstart = 2026-11-01T00:00:00Z', MissingFieldError, "exp", "salt"),
    "missing start": ('name = "exp"\nsalt = "s"', MissingFieldError, "exp", "start"),
    "start without offset": (
        'name = "exp"\nsalt = "s"\nstart = 2026-11-01T00:00:00',
        InvalidValueError,
        "exp",
        "start",
    ),
    "start not before stop": (BASE + "stop = 2026-11-01T00:00:00Z", InvalidValueError, "exp", "stop"),
    "traffic zero": (BASE + "traffic = 0.0", InvalidValueError, "exp", "traffic"),
    "traffic above one": (BASE + "traffic = 1.5", InvalidValueError, "exp", "traffic"),
    "traffic not a number": (BASE + 'traffic = "half"', InvalidValueError, "exp", "traffic"),
    "no arms": (BASE, MissingFieldError, "exp", "arm", ""),
    "shares not summing to one": (
        BASE,
        InvalidValueError,
        "exp",
        "arm.share",
        '[[experiment.arm]]\nname = "a"\nshare = 0.5\n[[experiment.arm]]\nname = "b"\nshare = 0.4\n',
    ),
    "share not positive": (
        BASE,
        InvalidValueError,
        "exp",
        "arm 'b'.share",
        '[[experiment.arm]]\nname = "a"\nshare = 1.0\n[[experiment.arm]]\nname = "b"\nshare = 0.0\n',
    ),
    "share missing": (BASE, MissingFieldError, "exp", "arm 'a'.share", '[[experiment.arm]]\nname = "a"\n'),
    "duplicate arm": (
        BASE,
        DuplicateNameError,
        "exp",
        "arm 'a'.name",
        '[[experiment.arm]]\nname = "a"\nshare = 0.5\n[[experiment.arm]]\nname = "a"\nshare = 0.5\n',
    ),
    "unknown policy": (
        BASE,
        InvalidValueError,
        "exp",
        "arm 'a'.policy",
        '[[experiment.arm]]\nname = "a"\nshare = 1.0\npolicy = "softmax"\n',
    ),
    "name unusable in labels": (
        'name = "exp;x"\nsalt = "s"\nstart = 2026-11-01T00:00:00Z',
        InvalidValueError,
        "exp;x",
        "name",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_FILES))
def test_each_invalid_file_is_refused_with_an_error_naming_file_experiment_and_field(case):
    header, error_type, experiment, field, *arms = INVALID_FILES[case]
    if case == "unknown top-level key":
        text = '[[experiments]]\nname = "exp"\n'
    else:
        text = one_experiment(header, arms[0] if arms and arms[0] is not None else VALID_ARMS)
    with pytest.raises(error_type) as raised:
        ExperimentSet.from_toml_text(text, origin="conf/experiments.toml")
    error = raised.value
    assert isinstance(error, ExperimentConfigError) and isinstance(error, ValueError)
    assert error.field == field
    assert error.experiment == experiment
    message = str(error)
    assert "conf/experiments.toml" in message and f"'{field}'" in message
    if experiment:
        assert f"experiment '{experiment}'" in message


def test_duplicate_experiment_names_are_refused():
    text = one_experiment(BASE) + "\n" + one_experiment(BASE.replace('salt = "s"', 'salt = "t"'))
    with pytest.raises(DuplicateNameError, match=r"experiments.toml: experiment 'exp', field 'name'"):
        ExperimentSet.from_toml_text(text, origin="experiments.toml")


def test_a_salt_shared_by_two_experiments_is_refused():
    text = one_experiment(BASE) + "\n" + one_experiment(BASE.replace('name = "exp"', 'name = "other"'))
    with pytest.raises(DuplicateNameError, match=r"experiment 'other', field 'salt'"):
        ExperimentSet.from_toml_text(text)


def layered(name: str, layer: str, traffic: float, extra: str = "", arm_extra: str = "") -> str:
    return one_experiment(
        f'name = "{name}"\nsalt = "salt-{name}"\nlayer = "{layer}"\ntraffic = {traffic}\n'
        f"start = 2026-11-01T00:00:00Z\n{extra}",
        f'[[experiment.arm]]\nname = "control"\nshare = 1.0\n{arm_extra}',
    )


def test_a_layer_over_one_is_refused():
    text = layered("a", "ranking", 0.6) + layered("b", "ranking", 0.6)
    with pytest.raises(LayerOverflowError, match=r"experiment 'b', field 'traffic'.*over 1"):
        ExperimentSet.from_toml_text(text)


def test_overlapping_explicit_slices_in_one_layer_are_refused():
    text = layered("a", "ranking", 0.5) + layered("b", "ranking", 0.5, extra="offset = 0.25")
    with pytest.raises(LayerOverflowError, match=r"experiment 'b', field 'offset'.*overlaps experiment 'a'"):
        ExperimentSet.from_toml_text(text)


@pytest.mark.parametrize("parameter, value", [("policy", '"thompson"'), ("model_version", '"s-1"')])
def test_two_layers_setting_the_same_parameter_at_the_same_time_are_refused(parameter, value):
    text = layered("a", "ranking", 1.0, arm_extra=f"{parameter} = {value}") + layered(
        "b", "other", 1.0, arm_extra=f"{parameter} = {value}"
    )
    with pytest.raises(ParameterConflictError) as raised:
        ExperimentSet.from_toml_text(text, origin="exp.toml")
    assert raised.value.field == parameter and raised.value.experiment == "b"
    assert "experiment 'a'" in str(raised.value) and "exp.toml" in str(raised.value)


def test_the_same_parameter_is_allowed_in_one_layer_or_in_windows_that_do_not_overlap():
    same_layer = layered("a", "ranking", 0.5, arm_extra='policy = "greedy"') + layered(
        "b", "ranking", 0.5, arm_extra='policy = "thompson"'
    )
    assert len(ExperimentSet.from_toml_text(same_layer)) == 2
    one_after_other = layered(
        "a", "ranking", 1.0, extra="stop = 2026-11-10T00:00:00Z", arm_extra='policy = "greedy"'
    ) + layered("b", "other", 1.0, arm_extra='policy = "thompson"').replace(
        "start = 2026-11-01T00:00:00Z", "start = 2026-11-10T00:00:00Z"
    )
    assert len(ExperimentSet.from_toml_text(one_after_other)) == 2
    # Different parameters in different layers run on the same users at once.
    assert len(experiment_set(TWO_LAYERS).active(NOV_15)) == 2


def test_load_experiments_reads_a_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text(TWO_LAYERS, encoding="utf-8")
    experiments = load_experiments(path)
    assert experiments.origin == str(path)
    assert experiments["snapshot-refresh"].shares == {"control": 0.6, "fresh": 0.4}
    assert experiments["policy-thompson"].parameters_set == {"policy"}
    path.write_text(TWO_LAYERS.replace('policy = "thompson"', 'policy = "thomson"'), encoding="utf-8")
    expected = rf"{path}: experiment 'policy-thompson', field 'arm 'treatment'.policy'"
    with pytest.raises(InvalidValueError, match=expected):
        load_experiments(path)
