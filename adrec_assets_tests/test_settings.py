"""Every ADREC_* variable is declared once in adrec_assets/settings.py, read only through it,
and documented in docs/configuration.md (generated from it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from adrec_assets import settings
from adrec_assets.settings import SETTINGS, Setting, SettingError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "adrec_assets"
NAME = re.compile(r"\bADREC_[A-Z0-9_]*[A-Z0-9]\b(?!_?\*)")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _variable_names_in_code(path: Path) -> list[str]:
    """String constants (not docstrings) that are a variable name or its prefix: the only way
    code can read a variable (``os.environ["ADREC_X"]``, ``f"ADREC_SERVE_{name}"``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and re.fullmatch(r"ADREC_[A-Z0-9_]*", node.value)
    ]


def test_no_module_but_settings_names_a_variable():
    offenders = {
        str(path.relative_to(REPO)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "settings.py" and (names := _variable_names_in_code(path))
    }
    assert not offenders, f"read these through adrec_assets.settings instead: {offenders}"


def test_every_variable_named_anywhere_is_declared():
    places = [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "docs").rglob("*.md"),
              *(REPO / "deploy").rglob("*"), REPO / "README.md", REPO / "Makefile", REPO / "benchmarks" / "README.md"]  # fmt: skip
    undeclared = {}
    for path in places:
        if path.is_file():
            names = set(NAME.findall(path.read_text(errors="replace"))) - set(SETTINGS)
            if names:
                undeclared[str(path.relative_to(REPO))] = sorted(names)
    assert not undeclared, f"declare these in adrec_assets/settings.py: {undeclared}"


def test_configuration_doc_is_generated_from_the_settings():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == settings.markdown(), "run: python -m adrec_assets.settings > docs/configuration.md"
    for name in SETTINGS:
        assert f"`{name}`" in doc


def test_unset_and_empty_mean_the_default_and_a_bad_value_names_the_variable(monkeypatch):
    keep = settings.KEEP_SNAPSHOTS
    monkeypatch.delenv(keep.name, raising=False)
    assert keep.get() == 5
    monkeypatch.setenv(keep.name, "")
    assert keep.get() == 5
    monkeypatch.setenv(keep.name, "7")
    assert keep.get() == 7
    monkeypatch.setenv(keep.name, "seven")
    with pytest.raises(SettingError, match="ADREC_KEEP_SNAPSHOTS='seven': expected an integer"):
        keep.get()


def test_folder_defaults_follow_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.DATA_DIR.name, str(tmp_path))
    monkeypatch.delenv(settings.SOURCES_DIR.name, raising=False)
    monkeypatch.delenv(settings.ENCODER_CACHE_DIR.name, raising=False)
    assert settings.SOURCES_DIR.get() == tmp_path / "sources"
    assert settings.ENCODER_CACHE_DIR.get() == tmp_path / "cache" / "encodings"


def test_every_setting_has_a_meaning_and_a_known_group():
    for setting in SETTINGS.values():
        assert isinstance(setting, Setting) and setting.name.startswith("ADREC_")
        assert setting.meaning and setting.shown_default
        assert setting.group in {settings.PIPELINE, settings.PRIVACY, settings.ENCODER_GROUP, settings.SERVICE}
