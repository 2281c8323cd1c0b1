"""Tests for crash-safe writes (storage.atomic_write) and the artifact IO managers."""

import os
import zipfile

import dagster as dg
import numpy as np
import pytest
import torch
from upath import UPath

from adrec_assets import storage
from adrec_assets.io_managers import NumpyArtifactIOManager, TorchArtifactIOManager
from adrec_assets.ml.models import Projector, ProjectorSpec, TrainedProjector
from adrec_assets.ml.types import AdCatalog, ArtifactError, ClickGraph, Embeddings, GlobalMean
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


# ---------------------------------------------------------------- IO managers


def _artifacts():
    cat = AdCatalog(np.array(["a1", "a2"]), np.array(["shoes", "funds"]), np.array(["/img/a1.png", ""]))
    graph = ClickGraph.from_pairs(np.array(["p1", "p2", "p1"]), np.array(["a1", "a1", "a2"]), np.array([1, 2, 3]))
    emb = Embeddings(
        np.array(["p1", "p2"]),
        np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32),
        space="users:abc",
        encoder_id="enc:v1",
        extra={"isolated": np.array([False, True])},
    )
    gm = GlobalMean(np.array([0.0, 1.0], dtype=np.float32), 2, 0.7)
    return {"raw_ads": cat, "click_graph": graph, "user_embeddings": emb, "global_mean": gm}


def _assert_same(a, b):
    assert type(a) is type(b)
    for k, v in a.to_arrays().items():
        np.testing.assert_array_equal(b.to_arrays()[k], v, err_msg=k)


@pytest.mark.parametrize("asset", ["raw_ads", "click_graph", "user_embeddings", "global_mean"])
def test_numpy_io_manager_round_trip_via_dagster_contexts(tmp_path, asset):
    """handle_output/load_input with asset key + partition key round-trip every npz artifact."""
    obj = _artifacts()[asset]
    manager = NumpyArtifactIOManager(base_path=UPath(tmp_path))
    key = dg.AssetKey([asset])
    manager.handle_output(dg.build_output_context(asset_key=key, partition_key="synthetic"), obj)
    path = tmp_path / asset / "synthetic.npz"
    assert path.is_file()
    with np.load(path, allow_pickle=False) as npz:  # no pickled object arrays inside
        assert str(npz["__type__"]) == obj.type_tag
        assert all(npz[k].dtype != object for k in npz.files)
    back = manager.load_input(dg.build_input_context(asset_key=key, partition_key="synthetic"))
    _assert_same(obj, back)
    if asset == "user_embeddings":
        assert back.space == "users:abc" and back.encoder_id == "enc:v1"
        np.testing.assert_array_equal(back.extra["isolated"], [False, True])


def test_torch_io_manager_round_trip(tmp_path):
    """A TrainedProjector written by the torch IO manager loads back with identical outputs."""
    torch.manual_seed(0)
    tp = TrainedProjector(Projector(ProjectorSpec(12, 8, 4, 0.0)).eval(), "enc:v1", "users:abc")
    manager = TorchArtifactIOManager(base_path=UPath(tmp_path))
    key = dg.AssetKey(["projector"])
    manager.handle_output(dg.build_output_context(asset_key=key, partition_key="src"), tp)
    path = tmp_path / "projector" / "src.pt"
    torch.load(path, weights_only=True)  # plain tensors/primitives only
    back = manager.load_input(dg.build_input_context(asset_key=key, partition_key="src"))
    assert (back.encoder_id, back.user_space) == ("enc:v1", "users:abc")
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), tp.model(x), rtol=0, atol=0)


def test_dump_and_load_from_path_directly(tmp_path):
    """dump_to_path/load_from_path work without a run, for nested paths too."""
    manager = NumpyArtifactIOManager(base_path=UPath(tmp_path))
    ctx = dg.build_output_context(asset_key=dg.AssetKey(["global_mean"]))
    path = UPath(tmp_path) / "deep" / "gm.npz"
    gm = _artifacts()["global_mean"]
    manager.dump_to_path(ctx, gm, path)
    _assert_same(gm, manager.load_from_path(None, path))


def test_npz_without_type_tag_rejected(tmp_path):
    """A foreign .npz (no __type__) is refused with an error naming its path."""
    path = tmp_path / "foreign.npz"
    np.savez(path, vectors=np.ones((2, 2)))
    with pytest.raises(ArtifactError, match="foreign.npz.*not an adrec artifact"):
        NumpyArtifactIOManager(base_path=UPath(tmp_path)).load_from_path(None, UPath(path))
    np.savez(path, __type__=np.asarray("bogus"), vectors=np.ones(2))
    with pytest.raises(ArtifactError, match="bogus"):
        NumpyArtifactIOManager(base_path=UPath(tmp_path)).load_from_path(None, UPath(path))


def test_npz_with_pickled_object_rejected(tmp_path):
    """An npz holding an object array is not unpickled on load."""
    path = tmp_path / "evil.npz"
    np.savez(path, __type__=np.asarray("global_mean"), vector=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        NumpyArtifactIOManager(base_path=UPath(tmp_path)).load_from_path(None, UPath(path))


def test_numpy_io_manager_refuses_plain_dict(tmp_path):
    """Only adrec artifacts are stored; a dict raises TypeError and writes nothing."""
    manager = NumpyArtifactIOManager(base_path=UPath(tmp_path))
    ctx = dg.build_output_context(asset_key=dg.AssetKey(["raw_ads"]), partition_key="p")
    with pytest.raises(TypeError, match="raw_ads.*dict"):
        manager.handle_output(ctx, {"vectors": np.ones(3)})
    assert not list(tmp_path.rglob("*.npz"))


def test_torch_io_manager_refuses_non_projector(tmp_path):
    """The torch IO manager stores only TrainedProjector."""
    manager = TorchArtifactIOManager(base_path=UPath(tmp_path))
    ctx = dg.build_output_context(asset_key=dg.AssetKey(["projector"]), partition_key="p")
    with pytest.raises(TypeError, match="TrainedProjector"):
        manager.handle_output(ctx, Projector(ProjectorSpec(4, 4, 2)))


def test_failed_overwrite_keeps_previous_artifact(tmp_path, monkeypatch):
    """A crash while re-writing an artifact leaves the previous good file loadable."""
    manager = NumpyArtifactIOManager(base_path=UPath(tmp_path))
    key = dg.AssetKey(["global_mean"])
    gm = _artifacts()["global_mean"]
    manager.handle_output(dg.build_output_context(asset_key=key, partition_key="p"), gm)
    before = (tmp_path / "global_mean" / "p.npz").read_bytes()

    def boom(*a, **k):
        raise OSError("crash")

    monkeypatch.setattr(storage.os, "replace", boom)
    gm2 = GlobalMean(np.array([1.0, 0.0], dtype=np.float32), 5, 0.1)
    with pytest.raises(OSError):
        manager.handle_output(dg.build_output_context(asset_key=key, partition_key="p"), gm2)
    assert (tmp_path / "global_mean" / "p.npz").read_bytes() == before
    assert os.listdir(tmp_path / "global_mean") == ["p.npz"]


@pytest.mark.parametrize("partition", ["../../etc", "..", "/../../etc/passwd", "a/../../../b", "../"])
def test_partition_key_cannot_escape_base_dir(tmp_path, partition):
    """make_safe_partition_path keeps any partition key under the base dir."""
    base = tmp_path / "base"
    manager = NumpyArtifactIOManager(base_path=UPath(base))
    asset_dir = UPath(base) / "global_mean"
    safe = manager.make_safe_partition_path(asset_dir, partition)
    resolved = os.path.realpath(str(safe))
    assert resolved.startswith(os.path.realpath(asset_dir) + os.sep), (partition, resolved)
    # and a real write through dagster lands inside the base dir
    manager.handle_output(
        dg.build_output_context(asset_key=dg.AssetKey(["global_mean"]), partition_key=partition),
        _artifacts()["global_mean"],
    )
    written = [p for p in tmp_path.rglob("*.npz")]
    assert len(written) == 1
    assert os.path.realpath(written[0]).startswith(os.path.realpath(base) + os.sep)


def test_remote_upath_write_round_trip():
    """Non-local UPaths (memory://) are written in one put and read back."""
    manager = NumpyArtifactIOManager(base_path=UPath("memory://adrec-test"))
    path = UPath("memory://adrec-test/global_mean/p.npz")
    gm = _artifacts()["global_mean"]
    manager.dump_to_path(dg.build_output_context(asset_key=dg.AssetKey(["global_mean"])), gm, path)
    _assert_same(gm, manager.load_from_path(None, path))
    assert zipfile.is_zipfile(path.open("rb"))


def test_numpy_io_manager_refuses_object_arrays_at_write_time(tmp_path):
    """Writing must fail loudly rather than produce a file that needs pickle to load."""
    import dagster as dg
    from upath import UPath

    from adrec_assets.io_managers import NumpyArtifactIOManager
    from adrec_assets.ml.types import Embeddings

    bad = Embeddings(
        ids=np.array(["a"]),
        vectors=np.ones((1, 2), np.float32) / np.sqrt(2),
        space="s",
        extra={"tags": np.array([{"x": 1}], dtype=object)},
    )
    path = UPath(tmp_path / "e.npz")
    with pytest.raises(TypeError, match="pickle"):
        NumpyArtifactIOManager().dump_to_path(dg.build_output_context(asset_key=dg.AssetKey("x")), bad, path)
    assert not path.exists()


def test_npz_artifacts_are_byte_reproducible(tmp_path):
    """Equal content -> equal bytes (no write timestamps inside), and np.load still reads it."""
    import time

    import dagster as dg

    from adrec_assets.ml.types import GlobalMean

    artifact = GlobalMean(vector=np.ones(4, np.float32) / 2, n_users=3, mean_norm=0.5)
    manager = NumpyArtifactIOManager()
    context = dg.build_output_context(asset_key=dg.AssetKey("global_mean"))
    manager.dump_to_path(context, artifact, UPath(tmp_path / "a.npz"))
    time.sleep(2.1)  # zip timestamps have 2-second resolution
    manager.dump_to_path(context, artifact, UPath(tmp_path / "b.npz"))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"__type__", "vector", "n_users", "mean_norm"}
        np.testing.assert_array_equal(npz["vector"], artifact.vector)
