"""Declared experiments and deterministic assignment of user pseudonyms to arms.

Experiments live in a TOML file the service reads at start-up::

    [[experiment]]
    name = "policy-thompson"
    salt = "2026-11-policy"          # required: a new salt re-randomizes the arms
    layer = "ranking"                # optional: same layer = disjoint users
    traffic = 1.0                    # optional: share of the layer's users (default 1.0)
    offset = 0.0                     # optional: where the slice starts in the layer
    start = 2026-11-01T00:00:00Z     # required, UTC
    stop  = 2026-12-01T00:00:00Z     # optional; active while start <= now < stop
    description = "free text"        # optional

      [[experiment.arm]]
      name = "control"
      share = 0.5
      policy = "greedy"              # optional: greedy, thompson, epsilon_greedy, random

      [[experiment.arm]]
      name = "treatment"
      share = 0.5
      policy = "thompson"
      model_version = "s-1234abcd"   # optional: the snapshot the arm is served from

Assignment follows Tang et al., "Overlapping Experiment Infrastructure" (KDD 2010):

* A user's position in a layer is ``U("layer", layer, pseudonym)``; an experiment of that
  layer takes the slice ``[offset, offset + traffic)`` of it. Slices of same-layer
  experiments whose windows overlap must be disjoint, so those experiments never share a
  user. An experiment without ``layer`` is alone in a layer of its own, keyed by its salt.
* Within the experiment, the arm is picked by ``U("arm", salt, pseudonym)`` against the
  cumulative arm shares. A different key per layer and per salt makes the splits of
  different layers and experiments independent, so experiments in different layers run on
  the same users at once.

``U(domain, key, pseudonym)`` is the first 53 bits of
``sha256(domain + "\\x1f" + key + "\\x1f" + pseudonym)`` divided by 2**53: uniform on
[0, 1), stable across processes, machines and languages. Only the 32-hex HMAC pseudonym
(see ``adrec_assets.privacy``) is ever hashed, never a raw user id.

Two experiments in different layers that are active at the same time may not both set the
same request parameter (``policy`` or ``model_version``): a request must never carry two
policies. That is refused when the file is loaded, not discovered at serving time.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adrec_assets.online.policy import POLICIES
from adrec_assets.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PATTERN

if TYPE_CHECKING:  # annotations only: pandas loads where a frame is built
    import pandas as pd

OVERRIDABLE_PARAMETERS = ("policy", "model_version")
SHARE_TOLERANCE = 1e-9

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEX_DIGITS = frozenset("0123456789abcdef")
_SEPARATOR = "\x1f"
_TWO_TO_53 = float(2**53)

_TOP_LEVEL_KEYS = frozenset({"experiment"})
_EXPERIMENT_KEYS = frozenset({"name", "salt", "layer", "traffic", "offset", "start", "stop", "description", "arm"})
_ARM_KEYS = frozenset({"name", "share", "policy", "model_version"})


class ExperimentConfigError(ValueError):
    """The experiments file is wrong; the message names file, experiment and field."""

    def __init__(self, origin: str, experiment: str | None, field: str, problem: str, fix: str):
        self.origin = origin
        self.experiment = experiment
        self.field = field
        where = f"experiment '{experiment}'" if experiment else "top level"
        super().__init__(f"{origin}: {where}, field '{field}': {problem}. {fix}")


class UnknownKeyError(ExperimentConfigError):
    """A key the format does not know (a typo would otherwise be silently ignored)."""


class MissingFieldError(ExperimentConfigError):
    """A required field is absent or empty."""


class DuplicateNameError(ExperimentConfigError):
    """Two experiments, or two arms of one experiment, share a name."""


class InvalidValueError(ExperimentConfigError):
    """A field has the wrong type or a value outside its range."""


class LayerOverflowError(ExperimentConfigError):
    """Same-layer experiments active at the same time take more than the whole layer."""


class ParameterConflictError(ExperimentConfigError):
    """Two experiments that can hold the same user at once set the same request parameter."""


class InvalidPseudonymError(ValueError):
    """Assignment was handed something that is not a 32-hex pseudonym (maybe a raw id)."""


class AssignmentLabelError(ValueError):
    """A logged assignment label does not parse as ``experiment=arm;...``."""


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    policy: str | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]
    start: datetime
    stop: datetime | None = None
    layer: str | None = None
    traffic: float = 1.0
    offset: float = 0.0
    description: str = ""

    @property
    def shares(self) -> dict[str, float]:
        """Arm name -> configured share, in declaration order (the analysis's input)."""
        return {arm.name: arm.share for arm in self.arms}

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(arm.name for arm in self.arms)

    @property
    def layer_key(self) -> str:
        """The hash key of this experiment's layer; a layer-less experiment is its own."""
        return f"layer={self.layer}" if self.layer is not None else f"solo={self.salt}"

    @property
    def parameters_set(self) -> frozenset[str]:
        """Request parameters (policy, model_version) that some arm of this experiment sets."""
        return frozenset(p for p in OVERRIDABLE_PARAMETERS for arm in self.arms if getattr(arm, p))

    def is_active(self, now: datetime) -> bool:
        now = _require_aware(now)
        return self.start <= now and (self.stop is None or now < self.stop)

    def overlaps_in_time(self, other: Experiment) -> bool:
        ends_after_other_starts = self.stop is None or other.start < self.stop
        other_ends_after_start = other.stop is None or self.start < other.stop
        return ends_after_other_starts and other_ends_after_start

    def assign_many(self, pseudonyms: Sequence[str] | np.ndarray) -> np.ndarray:
        """Arm index per pseudonym (int16; -1 where the user falls outside this experiment's
        slice of its layer). Ignores the time window: callers decide when it applies."""
        ids = _validated_pseudonyms(pseudonyms)
        layer_position = hash_uniform("layer", self.layer_key, ids)
        in_slice = (layer_position >= self.offset) & (layer_position < self.offset + self.traffic)
        arm_draw = hash_uniform("arm", self.salt, ids)
        arm_index = np.searchsorted(self._arm_edges(), arm_draw, side="right").astype(np.int16)
        return np.where(in_slice, arm_index, np.int16(-1))

    def assign_one(self, pseudonym: str) -> Arm | None:
        index = int(self.assign_many([pseudonym])[0])
        return self.arms[index] if index >= 0 else None

    def _arm_edges(self) -> np.ndarray:
        # Upper edges of all arms but the last; the last arm takes everything above, so
        # shares that sum to 1 within the tolerance can never leave a gap at the top.
        return np.cumsum([arm.share for arm in self.arms])[:-1]


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    policy: str | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class RequestOverrides:
    """What a request's assignments change: the serving policy, the model snapshot, and
    the label to log with every event of the request."""

    policy: str | None
    model_version: str | None
    label: str


@dataclass(frozen=True)
class ExperimentSet:
    experiments: tuple[Experiment, ...]
    origin: str = "<text>"

    @classmethod
    def from_toml_text(cls, text: str, origin: str = "<text>") -> ExperimentSet:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise InvalidValueError(
                origin, None, "<syntax>", f"not valid TOML ({error})", "Fix the TOML syntax."
            ) from error
        return cls(experiments=_parse_document(document, origin), origin=origin)

    def __iter__(self):
        return iter(self.experiments)

    def __len__(self) -> int:
        return len(self.experiments)

    def __getitem__(self, name: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise KeyError(f"{self.origin}: no experiment named '{name}'")

    def active(self, now: datetime) -> tuple[Experiment, ...]:
        return tuple(e for e in self.experiments if e.is_active(now))

    def assign(self, pseudonym: str, now: datetime) -> list[Assignment]:
        """One assignment per experiment that is active at ``now`` and holds this user."""
        assignments = []
        for experiment in self.active(now):
            arm = experiment.assign_one(pseudonym)
            if arm is not None:
                assignments.append(Assignment(experiment.name, arm.name, arm.policy, arm.model_version))
        return assignments

    def assign_many(self, pseudonyms: Sequence[str] | np.ndarray, now: datetime | None = None) -> dict[str, np.ndarray]:
        """Experiment name -> arm index per pseudonym (-1: not in it). With ``now``, only
        the experiments active then; without, all declared ones (for simulations)."""
        ids = _validated_pseudonyms(pseudonyms)
        chosen = self.experiments if now is None else self.active(now)
        return {experiment.name: experiment.assign_many(ids) for experiment in chosen}


def load_experiments(path: str | Path) -> ExperimentSet:
    path = Path(path)
    return ExperimentSet.from_toml_text(path.read_text(encoding="utf-8"), origin=str(path))


def hash_uniform(domain: str, key: str, pseudonyms: Sequence[str] | np.ndarray) -> np.ndarray:
    """``U(domain, key, pseudonym)`` for each pseudonym: float64 uniform on [0, 1)."""
    prefix = f"{domain}{_SEPARATOR}{key}{_SEPARATOR}".encode()
    digests = b"".join(
        [hashlib.sha256(prefix + p.encode("ascii")).digest()[:8] for p in np.asarray(pseudonyms).tolist()]
    )
    top_53_bits = np.frombuffer(digests, dtype=">u8") >> np.uint64(11)
    return top_53_bits.astype(np.float64) / _TWO_TO_53


def merge_assignments(assignments: Iterable[Assignment]) -> RequestOverrides:
    """Fold a request's assignments into the parameters it overrides and its log label.

    The loader already refuses experiments that could both set a parameter for one user;
    a clash here means the set was built around the loader, so it fails loudly."""
    assignments = list(assignments)
    chosen: dict[str, tuple[str, str]] = {}
    for assignment in assignments:
        for parameter in OVERRIDABLE_PARAMETERS:
            value = getattr(assignment, parameter)
            if value is None:
                continue
            if parameter in chosen and chosen[parameter][1] != value:
                raise ParameterConflictError(
                    "<assignments>",
                    assignment.experiment,
                    parameter,
                    f"also set to '{chosen[parameter][1]}' by experiment '{chosen[parameter][0]}'",
                    "Build assignments from an ExperimentSet loaded through load_experiments().",
                )
            chosen[parameter] = (assignment.experiment, value)
    return RequestOverrides(
        policy=chosen.get("policy", (None, None))[1],
        model_version=chosen.get("model_version", (None, None))[1],
        label=format_assignment_label(assignments),
    )


def format_assignment_label(assignments: Iterable[Assignment]) -> str:
    """``"exp-a=control;exp-b=treatment"``, sorted by experiment: one canonical spelling
    per set of assignments, so labels can be grouped on directly."""
    return ";".join(f"{a.experiment}={a.arm}" for a in sorted(assignments, key=lambda a: a.experiment))


def parse_assignment_label(label: str) -> dict[str, str]:
    """Inverse of :func:`format_assignment_label`: experiment -> arm."""
    parsed: dict[str, str] = {}
    if not label:
        return parsed
    for part in label.split(";"):
        experiment, sep, arm = part.partition("=")
        if not sep or not _NAME_PATTERN.fullmatch(experiment) or not _NAME_PATTERN.fullmatch(arm):
            raise AssignmentLabelError(
                f"assignment label {label!r}: part {part!r} is not 'experiment=arm'; "
                "labels come from format_assignment_label()"
            )
        if experiment in parsed:
            raise AssignmentLabelError(f"assignment label {label!r}: experiment '{experiment}' appears twice")
        parsed[experiment] = arm
    return parsed


# --- parsing and validation -------------------------------------------------------------


def _parse_document(document: Mapping[str, Any], origin: str) -> tuple[Experiment, ...]:
    _reject_unknown_keys(document, _TOP_LEVEL_KEYS, origin, None, "")
    tables = document.get("experiment", [])
    if not isinstance(tables, list):
        raise InvalidValueError(
            origin, None, "experiment", "is not an array of tables", "Declare each one as [[experiment]]."
        )
    experiments: list[Experiment] = []
    seen: set[str] = set()
    layer_ends: dict[str, float] = {}
    for position, table in enumerate(tables, start=1):
        experiment = _parse_experiment(table, origin, position, layer_ends)
        if experiment.name in seen:
            raise DuplicateNameError(
                origin, experiment.name, "name", "is declared twice", "Give every experiment its own name."
            )
        seen.add(experiment.name)
        reused = next((e.name for e in experiments if e.salt == experiment.salt), None)
        if reused is not None:
            raise DuplicateNameError(
                origin,
                experiment.name,
                "salt",
                f"'{experiment.salt}' is also the salt of experiment '{reused}'",
                "Give every experiment its own salt: a shared salt makes their splits identical.",
            )
        if experiment.layer is not None:
            layer_ends[experiment.layer] = experiment.offset + experiment.traffic
        experiments.append(experiment)
    _check_layers(experiments, origin)
    _check_parameter_conflicts(experiments, origin)
    return tuple(experiments)


def _parse_experiment(
    table: Mapping[str, Any], origin: str, position: int, layer_ends: Mapping[str, float]
) -> Experiment:
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise MissingFieldError(origin, f"#{position}", "name", "is missing or empty", "Name every [[experiment]].")
    _check_name(name, origin, name, "name")
    _reject_unknown_keys(table, _EXPERIMENT_KEYS, origin, name, "")
    salt = table.get("salt")
    if not isinstance(salt, str) or not salt.strip():
        raise MissingFieldError(
            origin,
            name,
            "salt",
            "is missing or empty",
            'Set a salt unique to this experiment, e.g. salt = "2026-11-policy".',
        )
    layer = table.get("layer")
    if layer is not None:
        if not isinstance(layer, str) or not layer:
            raise InvalidValueError(
                origin, name, "layer", "must be a non-empty string", "Name the layer or drop the key."
            )
        _check_name(layer, origin, name, "layer")
    traffic = _number(table, "traffic", 1.0, origin, name)
    if not 0.0 < traffic <= 1.0:
        raise InvalidValueError(
            origin, name, "traffic", f"is {traffic}, outside (0, 1]", "Use the share of the layer's users to take."
        )
    default_offset = layer_ends.get(layer, 0.0) if layer is not None else 0.0
    offset = _number(table, "offset", default_offset, origin, name)
    if not 0.0 <= offset < 1.0:
        raise InvalidValueError(
            origin, name, "offset", f"is {offset}, outside [0, 1)", "Start the slice inside the layer."
        )
    if offset + traffic > 1.0 + SHARE_TOLERANCE:
        raise LayerOverflowError(
            origin,
            name,
            "traffic",
            f"layer '{layer or name}' is over 1: this slice is [{offset:g}, {offset + traffic:g})",
            "Lower 'traffic' here or in the layer's earlier experiments, or set 'offset' "
            "to reuse the slice of one whose window does not overlap.",
        )
    start = _utc_datetime(table, "start", origin, name, required=True)
    stop = _utc_datetime(table, "stop", origin, name, required=False)
    if stop is not None and start >= stop:
        raise InvalidValueError(
            origin,
            name,
            "stop",
            f"{stop.isoformat()} is not after start {start.isoformat()}",
            "Set stop after start, or drop it for an open-ended experiment.",
        )
    description = table.get("description", "")
    if not isinstance(description, str):
        raise InvalidValueError(origin, name, "description", "must be a string", "Quote the text.")
    arms = _parse_arms(table.get("arm"), origin, name)
    return Experiment(
        name=name,
        salt=salt,
        arms=arms,
        start=start,
        stop=stop,
        layer=layer,
        traffic=traffic,
        offset=offset,
        description=description,
    )


def _parse_arms(tables: Any, origin: str, experiment: str) -> tuple[Arm, ...]:
    if not tables:
        raise MissingFieldError(
            origin, experiment, "arm", "has no arms", "Declare at least two [[experiment.arm]] tables."
        )
    if not isinstance(tables, list):
        raise InvalidValueError(origin, experiment, "arm", "is not an array of tables", "Use [[experiment.arm]].")
    arms: list[Arm] = []
    for position, table in enumerate(tables, start=1):
        arm_name = table.get("name")
        if not isinstance(arm_name, str) or not arm_name:
            raise MissingFieldError(
                origin, experiment, f"arm[{position}].name", "is missing or empty", "Name every arm."
            )
        _check_name(arm_name, origin, experiment, f"arm[{position}].name")
        _reject_unknown_keys(table, _ARM_KEYS, origin, experiment, f"arm '{arm_name}'.")
        if any(arm.name == arm_name for arm in arms):
            raise DuplicateNameError(
                origin, experiment, f"arm '{arm_name}'.name", "is declared twice", "Give every arm its own name."
            )
        if "share" not in table:
            raise MissingFieldError(
                origin, experiment, f"arm '{arm_name}'.share", "is missing", "Give every arm a share."
            )
        share = _number(table, "share", None, origin, experiment, field=f"arm '{arm_name}'.share")
        if not share > 0.0:
            raise InvalidValueError(
                origin,
                experiment,
                f"arm '{arm_name}'.share",
                f"is {share}, not positive",
                "Give the arm a share > 0 or remove it.",
            )
        policy = table.get("policy")
        if policy is not None and policy not in POLICIES:
            raise InvalidValueError(
                origin,
                experiment,
                f"arm '{arm_name}'.policy",
                f"'{policy}' is not a known policy",
                f"Use one of {', '.join(sorted(POLICIES))}.",
            )
        model_version = table.get("model_version")
        if model_version is not None and (not isinstance(model_version, str) or not model_version):
            raise InvalidValueError(
                origin,
                experiment,
                f"arm '{arm_name}'.model_version",
                "must be a non-empty string",
                'Use the snapshot id, e.g. "s-1234abcd", or drop the key.',
            )
        arms.append(Arm(arm_name, share, policy, model_version))
    total = math.fsum(arm.share for arm in arms)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise InvalidValueError(
            origin, experiment, "arm.share", f"shares sum to {total!r}, not 1", "Make the arm shares add up to 1."
        )
    return tuple(arms)


def _check_layers(experiments: Sequence[Experiment], origin: str) -> None:
    for i, first in enumerate(experiments):
        for second in experiments[i + 1 :]:
            if first.layer is None or first.layer != second.layer or not first.overlaps_in_time(second):
                continue
            if first.offset < second.offset + second.traffic and second.offset < first.offset + first.traffic:
                raise LayerOverflowError(
                    origin,
                    second.name,
                    "offset",
                    f"its slice [{second.offset:g}, {second.offset + second.traffic:g}) of layer "
                    f"'{second.layer}' overlaps experiment '{first.name}' "
                    f"[{first.offset:g}, {first.offset + first.traffic:g}) while both are active",
                    "Give same-layer experiments disjoint slices (lower 'traffic' or move 'offset').",
                )


def _check_parameter_conflicts(experiments: Sequence[Experiment], origin: str) -> None:
    for i, first in enumerate(experiments):
        for second in experiments[i + 1 :]:
            same_layer = first.layer is not None and first.layer == second.layer
            if same_layer or not first.overlaps_in_time(second):
                continue
            shared = sorted(first.parameters_set & second.parameters_set)
            if shared:
                raise ParameterConflictError(
                    origin,
                    second.name,
                    shared[0],
                    f"experiment '{first.name}' (layer {first.layer or 'of its own'}) also sets "
                    f"'{shared[0]}' and their windows overlap, so one request could get two values",
                    "Put both in the same layer (disjoint users) or make their windows not overlap.",
                )


def _reject_unknown_keys(
    table: Mapping[str, Any], allowed: frozenset[str], origin: str, experiment: str | None, prefix: str
) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UnknownKeyError(
            origin,
            experiment,
            f"{prefix}{unknown[0]}",
            "is not a known key",
            f"Allowed here: {', '.join(sorted(allowed))}.",
        )


def _check_name(value: str, origin: str, experiment: str, field: str) -> None:
    if not _NAME_PATTERN.fullmatch(value):
        raise InvalidValueError(
            origin,
            experiment,
            field,
            f"'{value}' has characters outside letters, digits, '_', '.', '-'",
            "Rename it: names go into 'experiment=arm;...' log labels.",
        )


def _number(
    table: Mapping[str, Any], key: str, default: float | None, origin: str, experiment: str, field: str | None = None
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValueError(
            origin, experiment, field or key, f"{value!r} is not a finite number", "Write a number."
        )
    return float(value)


def _utc_datetime(
    table: Mapping[str, Any], key: str, origin: str, experiment: str, *, required: bool
) -> datetime | None:
    value = table.get(key)
    if value is None:
        if required:
            raise MissingFieldError(
                origin, experiment, key, "is missing", f"Set {key} = 2026-11-01T00:00:00Z (a UTC datetime)."
            )
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        kind = "a date without time" if isinstance(value, date) and not isinstance(value, datetime) else repr(value)
        raise InvalidValueError(
            origin,
            experiment,
            key,
            f"{kind} is not a datetime with a UTC offset",
            f"Write an offset datetime such as {key} = 2026-11-01T00:00:00Z.",
        )
    return value.astimezone(UTC)


def _require_aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("assignment time must be timezone-aware (UTC); got a naive datetime")
    return now


def _validated_pseudonyms(pseudonyms: Sequence[str] | np.ndarray) -> np.ndarray:
    ids = np.asarray(pseudonyms)
    if ids.ndim != 1:
        ids = ids.reshape(-1)
    if ids.size == 0:
        return ids.astype(f"<U{PSEUDONYM_HEX_CHARS}")
    if ids.dtype.kind not in "UO":
        raise InvalidPseudonymError(
            f"pseudonyms must be strings, got dtype {ids.dtype}: assign the 32-hex HMAC pseudonym, never a raw id"
        )
    as_list = ids.tolist()
    bad = next((p for p in as_list if not isinstance(p, str) or len(p) != PSEUDONYM_HEX_CHARS), None)
    if bad is None and not set("".join(as_list)) <= _HEX_DIGITS:
        bad = next(p for p in as_list if not PSEUDONYM_PATTERN.fullmatch(p))
    if bad is not None:
        raise InvalidPseudonymError(
            f"{bad!r} is not a pseudonym (32 lowercase hex characters): assign the HMAC "
            "pseudonym from adrec_assets.privacy, never a raw user id"
        )
    return ids


def explode_event_log(events: pd.DataFrame) -> pd.DataFrame:
    """The served log (one row per event, ``experiments`` = the request's assignment label)
    as one row per (event, experiment): columns user, experiment, arm, type, timestamp —
    what :func:`adrec_assets.abtest.report.per_user_table` reads — and policy, fresh,
    explored (the slot flags :func:`adrec_assets.abtest.report.slot_shares` reads; None
    where the log predates them)."""
    import pandas as pd

    missing = [None] * len(events)
    rows = []
    for user, label, kind, timestamp, policy, fresh, explored in zip(
        events["user_pseudonym"], events["experiments"], events["type"], events["timestamp"],
        events["policy"] if "policy" in events else missing, events["fresh"] if "fresh" in events else missing,
        events["explored"] if "explored" in events else missing,
    ):  # fmt: skip
        for experiment, arm in parse_assignment_label(label).items():
            rows.append((user, experiment, arm, kind, float(timestamp), policy, fresh, explored))
    return pd.DataFrame(rows, columns=[*EXPLODED_COLUMNS])


#: The columns of :func:`explode_event_log`.
EXPLODED_COLUMNS = ("user", "experiment", "arm", "type", "timestamp", "policy", "fresh", "explored")
