"""Tests for crash-safe writes (storage.atomic_write) and the artifact IO managers."""

import os
import zipfile

import dagster as dg
import numpy as np
import pytest
import torch
from upath import UPath

from adrec_assets import storage
from adrec_assets.artifacts import load_file, write_file, write_npz_reproducibly
from adrec_assets.io_managers import ReportIOManager, SnapshotIOManager
from adrec_assets.ml.models import Projector, TrainedProjector
from adrec_assets.ml.params import ProjectorParams
from adrec_assets.ml.types import (
    ARTIFACT_FORMAT,
    AdCatalog,
    ArtifactError,
    ClickGraph,
    ContentEmbeddings,
    GlobalMean,
    ProjectedAds,
    TrainingProvenance,
    UserEmbeddings,
)
from adrec_assets.resources import ArtifactStoreResource
from adrec_assets.snapshots import SnapshotError, SnapshotStore
from adrec_assets.storage import atomic_write

# ---------------------------------------------------------------- atomic_write


def test_atomic_write_writes_content(tmp_path):
    """The callback's bytes end up at the target; only the target is left in the folder."""
    target = tmp_path / "sub" / "a.bin"
    atomic_write(target, lambda h: h.write(b"hello world"))
    assert target.read_bytes() == b"hello world"
    atomic_write(target, lambda h: h.write(b"v2"))
    assert target.read_bytes() == b"v2"
    assert os.listdir(target.parent) == ["a.bin"]


def test_atomic_write_failing_callback_keeps_previous(tmp_path):
    """A write that raises half-way leaves the old file byte-for-byte and no temp file."""
    target = tmp_path / "a.bin"
    original = os.urandom(4096)
    target.write_bytes(original)

    def half(handle):
        handle.write(b"partial garbage" * 100)
        handle.flush()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half)
    assert target.read_bytes() == original
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    """If the rename fails after the temp file is complete, the old file and folder are intact."""
    target = tmp_path / "a.bin"
    target.write_bytes(b"old contents")
    seen = []

    def broken_replace(src, dst):
        seen.append(os.path.exists(src) and open(src, "rb").read())
        raise OSError("simulated crash")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(target, lambda h: h.write(b"new contents"))
    assert seen == [b"new contents"]  # the temp file was fully written before the rename
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_keyboard_interrupt_cleans_up(tmp_path):
    """Even BaseException (Ctrl-C) removes the temp file."""
    target = tmp_path / "a.bin"

    def interrupt(handle):
        handle.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupt)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- artifact files and the IO manager


def _provenance() -> TrainingProvenance:
    return TrainingProvenance({"lr": 0.1, "epochs": 3}, "inputs-abc", "full_retrain")


def _artifacts():
    cat = AdCatalog(np.array(["a1", "a2"]), np.array(["shoes", "funds"]), np.array(["/img/a1.png", ""]), "/img")
    graph = ClickGraph.from_pairs(np.array(["p1", "p2", "p1"]), np.array(["a1", "a1", "a2"]), np.array([1, 2, 3]))
    users = UserEmbeddings(
        np.array(["p1", "p2"]),
        np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32),
        space="users:abc",
        isolated=np.array([False, True]),
        provenance=_provenance(),
    )
    content = ContentEmbeddings(np.array(["a1", "a2"]), np.eye(2, dtype=np.float32), "enc:v1", np.array([True, False]))
    projected = ProjectedAds(np.array(["a1", "a2"]), np.eye(2, dtype=np.float32), "users:abc", "enc:v1",
                             np.array([0.5, -0.25], dtype=np.float32))  # fmt: skip
    gm = GlobalMean(np.array([0.0, 1.0], dtype=np.float32), 2, 0.7, "users:abc")
    return {"raw_ads": cat, "click_graph": graph, "user_embeddings": users, "ad_embeddings_raw": content,
            "ad_projected": projected, "global_mean": gm}  # fmt: skip


def _assert_same(a, b):
    assert type(a) is type(b)
    for k, v in a.to_arrays().items():
        np.testing.assert_array_equal(b.to_arrays()[k], v, err_msg=k)


def _manager(tmp_path) -> SnapshotIOManager:
    return SnapshotIOManager(artifacts=ArtifactStoreResource(base_dir=str(tmp_path)))


def _output(asset: str, partition: str = "synthetic", run_id: str = "run-1") -> dg.OutputContext:
    return dg.build_output_context(asset_key=dg.AssetKey([asset]), partition_key=partition, run_id=run_id)


def _input(asset: str, partition: str = "synthetic", run_id: str = "run-1") -> dg.InputContext:
    return dg.build_input_context(
        asset_key=dg.AssetKey([asset]), partition_key=partition, upstream_output=_output(asset, partition, run_id)
    )


@pytest.mark.parametrize("asset", list(_artifacts()))
def test_io_manager_stages_and_round_trips_every_npz_artifact_within_its_run(tmp_path, asset):
    """handle_output stages (invisible to readers outside the run); load_input in the same run
    gets it back; the staged object is a pickle-free .npz of the current format."""
    obj = _artifacts()[asset]
    manager = _manager(tmp_path)
    manager.handle_output(_output(asset), obj)
    store = SnapshotStore(tmp_path, "synthetic")
    assert store.current_id() is None  # staged, not published
    path = store.object_path(store.staged("run-1")[asset])
    with np.load(path, allow_pickle=False) as npz:  # no pickled object arrays inside
        assert str(npz["__type__"]) == obj.type_tag and str(npz["__format__"]) == ARTIFACT_FORMAT
        assert all(npz[k].dtype != object for k in npz.files)
    _assert_same(obj, manager.load_input(_input(asset)))


def test_a_step_of_another_run_reads_the_published_snapshot_not_staged_outputs(tmp_path):
    manager = _manager(tmp_path)
    manager.handle_output(_output("global_mean", run_id="run-1"), _artifacts()["global_mean"])
    SnapshotStore(tmp_path, "synthetic").publish("run-1")
    newer = GlobalMean(np.array([1.0, 0.0], dtype=np.float32), 5, 0.1, "users:abc")
    manager.handle_output(_output("global_mean", run_id="run-2"), newer)
    assert manager.load_input(_input("global_mean", run_id="run-3")).n_users == 2  # published, not run-2's
    assert manager.load_input(_input("global_mean", run_id="run-2")).n_users == 5


def test_reports_are_written_beside_the_snapshots_and_read_back(tmp_path):
    manager = ReportIOManager(artifacts=ArtifactStoreResource(base_dir=str(tmp_path)))
    manager.handle_output(_output("evaluation", "shop"), _artifacts()["global_mean"])
    assert (tmp_path / "shop" / "reports" / "evaluation.npz").is_file()
    _assert_same(_artifacts()["global_mean"], manager.load_input(_input("evaluation", "shop")))


def test_typed_fields_survive_the_round_trip(tmp_path):
    """Provenance, flags and biases come back as typed fields, not as a free-form dict."""
    arts = _artifacts()
    for name, obj in arts.items():
        write_file(tmp_path / f"{name}.npz", obj)
    users = load_file(tmp_path / "user_embeddings.npz")
    assert users.provenance == _provenance() and users.isolated.tolist() == [False, True]
    assert users.row_of("p2") == 1 and users.row_of("nobody") is None
    assert load_file(tmp_path / "ad_embeddings_raw.npz").has_image.tolist() == [True, False]
    assert load_file(tmp_path / "ad_projected.npz").score_bias.tolist() == [0.5, -0.25]
    assert load_file(tmp_path / "global_mean.npz").space == "users:abc"


def test_projector_round_trip_rebuilds_the_model_from_its_params(tmp_path):
    """A TrainedProjector written as .pt loads back (weights_only) with identical outputs."""
    torch.manual_seed(0)
    params = ProjectorParams(hidden_dim=8, dropout=0.0)
    tp = TrainedProjector.trained(Projector(12, 4, params).eval(), "enc:v1", "users:abc", "inputs", "full_retrain")
    _manager(tmp_path).handle_output(_output("projector", "src"), tp)
    store = SnapshotStore(tmp_path, "src")
    path = store.object_path(store.staged("run-1")["projector"])
    assert path.suffix == ".pt"
    torch.load(path, weights_only=True)  # plain tensors/primitives only
    back = load_file(path)
    assert (back.encoder_id, back.user_space, back.params) == ("enc:v1", "users:abc", params)
    assert back.provenance == tp.provenance
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), tp.model(x), rtol=0, atol=0)


def test_an_artifact_of_the_old_format_names_the_file_and_says_to_rematerialize(tmp_path):
    """Files written before the typed artifacts (no __format__) are refused, not misread."""
    old = tmp_path / "user_embeddings" / "shop.npz"
    old.parent.mkdir()
    np.savez(old, __type__=np.asarray("embeddings"), ids=np.array(["u"]), vectors=np.ones((1, 2), np.float32))
    with pytest.raises(ArtifactError, match=r"shop\.npz.*older adrec.*re-materialize"):
        load_file(old)
    old_projector = tmp_path / "projector.pt"
    torch.save({"format": "adrec.projector.v2", "spec": {}, "state_dict": {}}, old_projector)
    with pytest.raises(ArtifactError, match=r"projector\.pt.*re-materialize"):
        load_file(old_projector)


def test_a_stored_field_that_is_missing_is_named(tmp_path):
    """No silent default: a missing field is an error naming the field and the file."""
    arrays = _artifacts()["ad_projected"].to_arrays()
    del arrays["score_bias"]
    path = tmp_path / "ad_projected.npz"
    with open(path, "wb") as handle:
        write_npz_reproducibly(handle, {"__type__": np.asarray("projected_ads"),
                                        "__format__": np.asarray(ARTIFACT_FORMAT), **arrays})  # fmt: skip
    with pytest.raises(ArtifactError, match=r"ad_projected\.npz.*'score_bias' is missing"):
        load_file(path)


def test_strings_are_stored_in_their_own_length_not_the_longest_times_rows(tmp_path):
    """One long ad text does not multiply the size of every other row (no fixed-width <U)."""
    n, long_text = 200, "x" * 100_000
    texts = np.array([long_text] + ["short"] * (n - 1), dtype=object)
    catalog = AdCatalog(np.array([f"a{i}" for i in range(n)]), texts, np.array([""] * n), "")
    write_file(tmp_path / "raw_ads.npz", catalog)
    size = (tmp_path / "raw_ads.npz").stat().st_size
    assert size < 2 * len(long_text)  # fixed-width UTF-32 would be n * 4 * 100k = 80 MB
    assert load_file(tmp_path / "raw_ads.npz").texts[0] == long_text


def test_npz_without_type_tag_rejected(tmp_path):
    """A foreign .npz (no __type__) is refused with an error naming its path."""
    path = tmp_path / "foreign.npz"
    np.savez(path, __format__=np.asarray(ARTIFACT_FORMAT), vectors=np.ones((2, 2)))
    with pytest.raises(ArtifactError, match="foreign.npz.*not an adrec artifact"):
        load_file(path)
    np.savez(path, __format__=np.asarray(ARTIFACT_FORMAT), __type__=np.asarray("bogus"), vectors=np.ones(2))
    with pytest.raises(ArtifactError, match="bogus"):
        load_file(path)


def test_npz_with_pickled_object_rejected(tmp_path):
    """An npz holding an object array is not unpickled on load."""
    path = tmp_path / "evil.npz"
    np.savez(path, __format__=np.asarray(ARTIFACT_FORMAT), __type__=np.asarray("global_mean"),
             vector=np.array([{"x": 1}], dtype=object))  # fmt: skip
    with pytest.raises(ArtifactError, match="allow_pickle"):
        load_file(path)


def test_io_manager_refuses_plain_dict(tmp_path):
    """Only adrec artifacts are stored; a dict raises TypeError and writes nothing."""
    with pytest.raises(TypeError, match="raw_ads.*dict"):
        _manager(tmp_path).handle_output(_output("raw_ads", "p"), {"vectors": np.ones(3)})
    assert not list(tmp_path.rglob("*.npz"))


def test_failed_overwrite_keeps_previous_artifact(tmp_path, monkeypatch):
    """A crash while re-writing a report leaves the previous good file loadable."""
    manager = ReportIOManager(artifacts=ArtifactStoreResource(base_dir=str(tmp_path)))
    gm = _artifacts()["global_mean"]
    manager.handle_output(_output("evaluation", "p"), gm)
    folder = tmp_path / "p" / "reports"
    before = (folder / "evaluation.npz").read_bytes()

    def boom(*a, **k):
        raise OSError("crash")

    monkeypatch.setattr(storage.os, "replace", boom)
    gm2 = GlobalMean(np.array([1.0, 0.0], dtype=np.float32), 5, 0.1, "users:abc")
    with pytest.raises(OSError):
        manager.handle_output(_output("evaluation", "p"), gm2)
    assert (folder / "evaluation.npz").read_bytes() == before
    assert os.listdir(folder) == ["evaluation.npz"]


@pytest.mark.parametrize("partition", ["../../etc", "..", "/../../etc/passwd", "a/../../../b", "../"])
def test_partition_key_cannot_escape_base_dir(tmp_path, partition):
    """A partition key is a source name chosen at run time: one that could climb out of the
    artifacts root is refused and nothing is written."""
    base = tmp_path / "base"
    with pytest.raises(SnapshotError, match="not a safe name"):
        _manager(base).handle_output(_output("global_mean", partition), _artifacts()["global_mean"])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_remote_upath_write_round_trip():
    """Non-local UPaths (memory://) are written in one put and read back."""
    path = UPath("memory://adrec-test/global_mean/p.npz")
    gm = _artifacts()["global_mean"]
    write_file(path, gm)
    _assert_same(gm, load_file(path))
    assert zipfile.is_zipfile(path.open("rb"))


def test_npz_artifacts_are_byte_reproducible(tmp_path):
    """Equal content -> equal bytes (no write timestamps inside), and np.load still reads it."""
    import time

    artifact = GlobalMean(vector=np.ones(4, np.float32) / 2, n_users=3, mean_norm=0.5, space="users:x")
    write_file(tmp_path / "a.npz", artifact)
    time.sleep(2.1)  # zip timestamps have 2-second resolution
    write_file(tmp_path / "b.npz", artifact)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"__type__", "__format__", "vector", "n_users", "mean_norm", "space"}
        np.testing.assert_array_equal(npz["vector"], artifact.vector)


# ---------------------------------------------------------------- artifact types, imported on demand


def test_every_artifact_type_module_registers_its_tag():
    """artifacts.TYPE_MODULES names, for each tag defined outside ml/types, the module that
    registers it; every registered tag is found there or in ml/types."""
    import importlib

    from adrec_assets.artifacts import TYPE_MODULES, artifact_class
    from adrec_assets.ml import types

    for tag, module in TYPE_MODULES.items():
        cls = artifact_class(tag)
        assert cls is not None and cls.__module__ == module, (tag, module)
        importlib.import_module(module)
    for tag, cls in types.ARTIFACT_TYPES.items():
        assert tag in TYPE_MODULES or cls.__module__ == types.__name__, (tag, cls.__module__)


@pytest.mark.parametrize("module", ["adrec_assets.snapshots", "adrec_assets.artifacts", "adrec_assets.online.store"])
def test_reading_snapshots_or_the_store_imports_no_torch_or_faiss(module):
    """The snapshot store and the online store are imported by light processes (the CLI, the
    sensor, the service's store tools): they must not pay for torch or faiss."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'faiss', 'statsmodels') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
