"""Structured ad fields: declaration, fitted encoding, and the projector that reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adrec_assets.ml.fields import (
    CATEGORICAL,
    NUMERIC,
    AdFields,
    FieldEncoder,
    FieldError,
    FieldSpec,
    fit_field_encoder,
)
from adrec_assets.ml.models import Projector, TrainedProjector
from adrec_assets.ml.params import ProjectorParams
from adrec_assets.ml.training import project, score_bias, train_projector
from adrec_assets.ml.types import FULL_RETRAIN, AdCatalog, ArtifactError, ClickGraph
from adrec_assets.sources import SourceError
from adrec_assets.sources.files import read_ads, source_fingerprint, write_field_specs

GENRES = FieldSpec("genres", CATEGORICAL, separator="|")
YEAR = FieldSpec("year", NUMERIC)


def cells(**columns: list[str]) -> dict[str, np.ndarray]:
    return {name: np.asarray(values, dtype=object) for name, values in columns.items()}


# ----------------------------------------------------------------------------- the encoding


def test_categorical_values_become_a_unit_multi_hot_over_values_seen_on_two_ads():
    data = cells(genres=["Comedy|Drama", "Comedy", "Drama|War", "Horror", ""])
    encoder = fit_field_encoder([GENRES], data)
    (fitted,) = encoder.fields
    assert fitted.vocabulary == ("Comedy", "Drama")  # Horror and War are on one ad only
    out = encoder.transform(data, 5)
    assert out.shape == (5, 2)
    np.testing.assert_allclose(out[0], [2**-0.5, 2**-0.5], rtol=1e-6)  # two known values share unit length
    np.testing.assert_allclose(out[1], [1.0, 0.0])
    np.testing.assert_allclose(out[2], [0.0, 1.0])  # War is unknown: only Drama counts
    np.testing.assert_allclose(out[3:], 0.0)  # unknown value, empty cell


def test_numeric_values_become_their_quantile_bin_and_clipped_z_score():
    years = [str(y) for y in range(1950, 2020)]
    encoder = fit_field_encoder([YEAR], cells(year=years))
    (fitted,) = encoder.fields
    assert len(fitted.edges) == 9 and fitted.width == 11  # 10 bins + the z-score
    out = encoder.transform(cells(year=["1950", "2019", "3000", "", "n/a"]), 5)
    assert out[0, 0] == 1.0 and out[1, 9] == 1.0 and out[2, 9] == 1.0  # lowest, highest, beyond the top
    assert out[0, -1] == pytest.approx((1950 - np.mean(range(1950, 2020))) / np.std(range(1950, 2020)), rel=1e-5)
    assert out[2, -1] == 3.0  # clipped
    np.testing.assert_allclose(out[3:], 0.0)  # missing and unparseable cells stay zero


def test_scale_multiplies_every_column_and_an_absent_field_encodes_as_zeros():
    data = cells(genres=["A|B", "A", "B"], year=["1990", "2000", "2010"])
    base = fit_field_encoder([GENRES, YEAR], data, scale=1.0)
    doubled = fit_field_encoder([GENRES, YEAR], data, scale=2.0)
    np.testing.assert_allclose(doubled.transform(data, 3), 2 * base.transform(data, 3))
    only_genres = base.transform(cells(genres=["A|B", "A", "B"]), 3)
    np.testing.assert_allclose(only_genres[:, 2:], 0.0)


def test_encoder_round_trips_through_json():
    data = cells(genres=["A|B", "A", "B"], year=["1990", "2000", "2010"])
    encoder = fit_field_encoder([GENRES, YEAR], data, scale=0.5)
    again = FieldEncoder.from_json(encoder.to_json())
    assert again == encoder
    np.testing.assert_array_equal(again.transform(data, 3), encoder.transform(data, 3))
    other = fit_field_encoder([GENRES, YEAR], cells(genres=["A|C", "C", "A"], year=["1990", "2000", "2010"]), 0.5)
    assert FieldEncoder.from_json(other.to_json()) != encoder  # another catalogue, another fit
    assert FieldEncoder().width == 0 and FieldEncoder.from_json("") == FieldEncoder()


def test_bad_declarations_and_cells_are_refused_by_name():
    with pytest.raises(FieldError, match="'price': kind must be one of"):
        FieldSpec("price", "money")
    with pytest.raises(FieldError, match="only a categorical field takes a separator"):
        FieldSpec("year", NUMERIC, separator="|")
    with pytest.raises(FieldError, match="'year' is declared but the ads have no such column"):
        fit_field_encoder([YEAR], cells(genres=["A"]))
    with pytest.raises(FieldError, match="numeric field 'year' has no number in any ad"):
        fit_field_encoder([YEAR], cells(year=["soon", ""]))
    with pytest.raises(FieldError, match="declared \\['year'\\] but cells given for \\['genres'\\]"):
        AdFields((YEAR,), cells(genres=["A"]))


# ----------------------------------------------------------------------------- the source folder


def write_ads(folder: Path, rows: list[dict], declared: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "ads.csv", index=False)
    if declared is not None:
        (folder / "ad_fields.json").write_text(json.dumps(declared))
    return folder


ROWS = [
    {"ad_id": "a", "text": "red car", "year": 1995, "genres": "Cars|Sport"},
    {"ad_id": "b", "text": "blue car", "year": "", "genres": "Cars"},
]


def test_declared_fields_are_read_with_the_ads_and_undeclared_columns_are_not(tmp_path: Path):
    folder = write_ads(tmp_path / "shop", ROWS, {"year": {"kind": "numeric"}})
    catalog = read_ads(folder)
    assert catalog.fields.specs == (YEAR,)
    assert catalog.fields.cells["year"].tolist() == ["1995", ""]
    assert "genres" not in catalog.fields.cells
    assert read_ads(write_ads(tmp_path / "plain", ROWS, None)).fields == AdFields()


def test_numeric_cells_of_a_parquet_ads_file_are_kept_as_text(tmp_path: Path):
    folder = tmp_path / "shop"
    folder.mkdir()
    pd.DataFrame({"ad_id": ["a", "b"], "text": ["x", "y"], "year": [1995.0, None]}).to_parquet(folder / "ads.parquet")
    (folder / "ad_fields.json").write_text('{"year": {"kind": "numeric"}}')
    assert read_ads(folder).fields.cells["year"].tolist() == ["1995.0", ""]


@pytest.mark.parametrize(
    "declared, message",
    [
        ("{not json", "ad_fields.json: not valid UTF-8 JSON"),
        ('["year"]', "expected an object like"),
        ('{"year": {"kind": "date"}}', "field 'year': kind must be one of"),
        ('{"year": {"kind": "numeric", "unit": "y"}}', "field 'year' has unknown keys \\['unit'\\]"),
        ('{"text": {"kind": "categorical"}}', "'text' cannot be a structured field"),
        ('{"price": {"kind": "numeric"}}', "ads.csv: missing column\\(s\\) \\['price'\\]"),
    ],
)
def test_a_bad_declaration_names_the_file_and_what_to_fix(tmp_path: Path, declared: str, message: str):
    folder = write_ads(tmp_path / "shop", ROWS, None)
    (folder / "ad_fields.json").write_text(declared)
    with pytest.raises(SourceError, match=message):
        read_ads(folder)


def test_changing_the_declaration_changes_the_source_fingerprint(tmp_path: Path):
    folder = write_ads(tmp_path / "shop", ROWS, None)
    before = source_fingerprint(folder)
    write_field_specs(folder, (YEAR,))
    assert source_fingerprint(folder) != before


def test_catalog_with_fields_round_trips_through_its_arrays(tmp_path: Path):
    catalog = read_ads(
        write_ads(
            tmp_path / "shop", ROWS, {"year": {"kind": "numeric"}, "genres": {"kind": "categorical", "separator": "|"}}
        )
    )
    again = AdCatalog.from_arrays(catalog.to_arrays())
    assert again.fields.specs == catalog.fields.specs == (YEAR, GENRES)
    for name in ("year", "genres"):
        assert again.fields.cells[name].tolist() == catalog.fields.cells[name].tolist()
    with pytest.raises(ArtifactError, match="field 'year' needs one entry per row"):
        AdCatalog(catalog.ad_ids, catalog.texts, catalog.image_paths, catalog.image_root,
                  AdFields((YEAR,), cells(year=["1"])))  # fmt: skip


# ----------------------------------------------------------------------------- the projector


def tiny_graph(n_ads: int = 12, n_users: int = 6) -> ClickGraph:
    rng = np.random.default_rng(0)
    users, ads = np.divmod(np.arange(n_users * n_ads), n_ads)
    keep = rng.random(len(users)) < 0.5
    return ClickGraph.from_codes(
        np.array([f"u{i}" for i in range(n_users)]), users[keep], np.array([f"a{i}" for i in range(n_ads)]),
        ads[keep], np.ones(int(keep.sum()), dtype=np.float32),
    )  # fmt: skip


def test_projector_appends_the_encoded_fields_and_its_checkpoint_keeps_the_encoding():
    graph = tiny_graph()
    rng = np.random.default_rng(1)
    content = rng.normal(size=(graph.n_ads, 16)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    users = rng.normal(size=(graph.n_users, 8)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    ad_fields = AdFields((GENRES, YEAR), cells(genres=["A|B", "A", "B"] * 4, year=[str(1990 + i) for i in range(12)]))
    encoder = ad_fields.fit(1.0)
    params = ProjectorParams(hidden_dim=16, epochs=1, min_steps=5, batch_size=8)
    model = train_projector(graph, content, users, params, fields=encoder, field_cells=ad_fields.cells).model
    assert model.net[0].in_features == 16 + encoder.width and model.popularity.in_features == 16 + encoder.width
    with_fields = project(model, content, ad_fields.cells)
    assert not np.allclose(with_fields, project(model, content))  # no cells: the field block is zero
    trained = TrainedProjector.trained(model, "enc", "users:x", "fp", FULL_RETRAIN)
    again = TrainedProjector.from_checkpoint(trained.to_checkpoint())
    assert again.model.fields == encoder
    np.testing.assert_array_equal(project(again.model, content, ad_fields.cells), with_fields)
    np.testing.assert_array_equal(
        score_bias(again.model, content, ad_fields.cells), score_bias(model, content, ad_fields.cells)
    )
    with pytest.raises(ValueError, match="expects \\(n, 16\\) content vectors"):
        project(model, content[:, :8])


def test_a_projector_without_fields_is_what_it_was():
    model = Projector(16, 8, ProjectorParams(hidden_dim=16))
    content = np.eye(16, dtype=np.float32)[:3]
    assert model.inputs(content, {"year": ["1990"] * 3}).shape == (3, 16)  # nothing declared: cells ignored
    with torch.inference_mode():
        np.testing.assert_array_equal(project(model, content), model(torch.from_numpy(content)).numpy())


def test_a_written_source_keeps_its_declared_fields(tmp_path: Path):
    from adrec_assets.sources import RawClicks
    from adrec_assets.sources.files import write_source

    fields = AdFields((GENRES, YEAR), cells(genres=["A|B", "", "B"], year=["1990", "2000", ""]))
    catalog = AdCatalog(np.asarray(["a", "b", "c"]), np.asarray(["x", "y", "z"]), np.asarray([""] * 3), "", fields)
    clicks = RawClicks(user_vocab=np.asarray(["u"]), user_codes=np.asarray([0, 0]), ad_vocab=np.asarray(["a", "b"]),
                       ad_codes=np.asarray([0, 1]), weights=np.ones(2, dtype=np.float32))  # fmt: skip
    write_source(tmp_path / "out", catalog, clicks)
    back = read_ads(tmp_path / "out")
    assert back.fields.specs == (GENRES, YEAR)
    assert {n: v.tolist() for n, v in back.fields.cells.items()} == {n: v.tolist() for n, v in fields.cells.items()}
