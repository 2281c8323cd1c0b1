"""The synthetic users of ``benchmarks/ab_population.py`` for the abtest tests. benchmarks/ is
not a package, so the module is loaded from its file (as test_bandit_sim loads its simulator)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_population():
    spec = importlib.util.spec_from_file_location("ab_population", REPO_ROOT / "benchmarks" / "ab_population.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ab_population"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


SyntheticPopulation = _load_population().SyntheticPopulation
