"""Jina CLIP v2 encoder: fusion, truncation, batching and order with a test double; weight
discovery on fake folders; encoder selection; the fail-fast path without weights. One
test uses the real weights and runs only where they are on disk (never downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adrec_assets.ml.encoders import (
    AUTO,
    ENCODER_BUILDERS,
    JINA,
    OFFLINE,
    AdEncoder,
    EncodeResult,
    build_encoder,
    resolve_encoder_name,
    select_encoder,
)
from adrec_assets.ml.encoders import jina as jina_mod
from adrec_assets.ml.encoders.base import (
    ImageStream,
    l2_normalize,
    load_images_parallel,
    load_rgb_center_crop,
    load_rgb_image,
    try_load_images,
)
from adrec_assets.ml.encoders.jina import (
    IMAGE_SIZE,
    JinaClipV2Encoder,
    JinaWeightsMissing,
    check_jina_available,
    locate_jina_weights,
)

REPO = Path(__file__).resolve().parents[1]
CATALOG_IMAGES = REPO / "data" / "catalog" / "images"
FULL_DIM = 1024  # Jina CLIP v2's native width; the encoder asks for the 768-d prefix


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _seeded_vec(key: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(FULL_DIM)


class FakeJina:
    """Stands in for the remote-code model: same method signatures, deterministic vectors
    (a function of the text / the decoded pixels), full 1024 dims unless truncate_dim is
    given, and a record of every call."""

    def __init__(self, honour_truncate_dim: bool = True) -> None:
        self.honour_truncate_dim = honour_truncate_dim
        self.text_calls: list[dict] = []
        self.image_calls: list[dict] = []

    @staticmethod
    def text_full(text: str) -> np.ndarray:
        return _seeded_vec(b"text:" + text.encode())

    @staticmethod
    def image_full(image: Image.Image) -> np.ndarray:
        return _seeded_vec(b"image:" + image.tobytes())

    def _finish(self, vecs: np.ndarray, truncate_dim: int | None, normalize: bool) -> np.ndarray:
        if truncate_dim and self.honour_truncate_dim:
            vecs = vecs[:, :truncate_dim]
        return _unit(vecs).astype(np.float32) if normalize else vecs.astype(np.float32)

    def encode_text(self, sentences, task=None, batch_size=32, truncate_dim=None, normalize_embeddings=True, **kwargs):
        self.text_calls.append(
            {"texts": list(sentences), "truncate_dim": truncate_dim, "batch_size": batch_size, "kwargs": kwargs}
        )
        vecs = np.stack([self.text_full(s) for s in sentences])
        return self._finish(vecs, truncate_dim, normalize_embeddings)

    def encode_image(self, images, batch_size=32, truncate_dim=None, normalize_embeddings=True, **kwargs):
        self.image_calls.append(
            {"images": list(images), "truncate_dim": truncate_dim, "batch_size": batch_size, "kwargs": kwargs}
        )
        for im in images:
            assert isinstance(im, Image.Image), f"encode_image got {type(im).__name__}, not a PIL image"
        vecs = np.stack([self.image_full(im) for im in images])
        return self._finish(vecs, truncate_dim, normalize_embeddings)


def expected_text(text: str) -> np.ndarray:
    return _unit(FakeJina.text_full(text)[:768])


def expected_image(path: Path) -> np.ndarray:
    return _unit(FakeJina.image_full(load_rgb_center_crop(str(path), IMAGE_SIZE))[:768])


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Distinct small images (PNG, JPEG, a non-square one) plus broken files."""
    out = {}
    for i, (name, size) in enumerate([("a.png", (64, 64)), ("b.jpg", (80, 60)), ("c.png", (300, 120))]):
        arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        arr[..., i] = 200
        arr[: size[1] // 2, :, (i + 1) % 3] = 90 + 40 * i
        Image.fromarray(arr).save(tmp_path / name)
        out[name] = tmp_path / name
    (tmp_path / "garbage.png").write_bytes(b"not an image at all \x00\x01" * 8)
    data = out["a.png"].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    out["garbage.png"] = tmp_path / "garbage.png"
    out["truncated.png"] = tmp_path / "truncated.png"
    out["missing.png"] = tmp_path / "missing.png"
    return out


@pytest.fixture
def no_jina(tmp_path, monkeypatch) -> Path:
    """Nothing Jina-related on this 'machine': an empty HF cache, no ADREC_JINA_PATH."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("ADREC_JINA_PATH", raising=False)
    monkeypatch.delenv("ADREC_ENCODER", raising=False)
    return cache


# --- the encoder with a test double ---------------------------------------------------------


def test_implements_interface_truncates_and_normalizes():
    """768-d float32 unit rows; truncate_dim=768 is requested on every call."""
    fake = FakeJina()
    enc = JinaClipV2Encoder(model=fake, batch_size=4)
    assert isinstance(enc, AdEncoder) and enc.dim == 768
    assert enc.encoder_id == "jina-clip-v2:truncate768:v1"
    texts = ["short", "a somewhat longer ad text", "x"]
    res = enc.encode(texts, [None, "", None])
    assert isinstance(res, EncodeResult)
    assert res.vectors.shape == (3, 768) and res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(res.vectors, np.stack([expected_text(t) for t in texts]), atol=1e-6)
    assert fake.text_calls and all(c["truncate_dim"] == 768 for c in fake.text_calls)
    assert res.has_image.tolist() == [False, False, False] and res.image_failures == []


def test_untruncated_model_output_is_cut_to_the_matryoshka_prefix(images):
    """A model returning its full 1024 dims (truncate_dim ignored) still yields the
    normalized 768-d prefix, for text and images alike."""
    fake = FakeJina(honour_truncate_dim=False)
    enc = JinaClipV2Encoder(model=fake)
    res = enc.encode(["hello"], [str(images["a.png"])])
    want = l2_normalize(expected_text("hello") + expected_image(images["a.png"]))
    np.testing.assert_allclose(res.vectors[0], want, atol=1e-6)
    assert fake.image_calls[0]["truncate_dim"] == 768


def test_model_output_narrower_than_768_is_refused():
    class Narrow(FakeJina):
        def encode_text(self, sentences, **kwargs):
            return np.ones((len(sentences), 512), dtype=np.float32)

    with pytest.raises(ValueError, match=r"expected \(1, >=768\)"):
        JinaClipV2Encoder(model=Narrow()).encode(["a"], [None])


def test_fusion_text_plus_image_and_text_only_fallbacks(images):
    """Image ads: normalize(text + image); no/missing/corrupt image: the text vector alone,
    each failure counted with its row, path and reason."""
    enc = JinaClipV2Encoder(model=FakeJina(), batch_size=2)
    text = "Trail running shoes with aggressive lugs."
    paths = [
        str(images["a.png"]),
        None,
        str(images["missing.png"]),
        "",
        str(images["garbage.png"]),
        str(images["truncated.png"]),
        str(images["b.jpg"]),
    ]
    res = enc.encode([text] * len(paths), paths)
    t = expected_text(text)
    assert res.has_image.tolist() == [True, False, False, False, False, False, True]
    np.testing.assert_allclose(res.vectors[0], l2_normalize(t + expected_image(images["a.png"])), atol=1e-6)
    np.testing.assert_allclose(res.vectors[6], l2_normalize(t + expected_image(images["b.jpg"])), atol=1e-6)
    for row in range(1, 6):
        np.testing.assert_allclose(res.vectors[row], t, atol=1e-6)
    # the image really moves the vector, and text and image contribute equally
    assert float(res.vectors[0] @ t) < 0.95
    img0 = expected_image(images["a.png"])
    assert float(res.vectors[0] @ t) == pytest.approx(float(res.vectors[0] @ img0), abs=1e-6)
    failures = {row: (path, reason) for row, path, reason in res.image_failures}
    assert sorted(failures) == [2, 4, 5] and res.n_image_failures == 3
    assert failures[2] == (str(images["missing.png"]), "file not found")
    assert failures[4][1].startswith("unreadable image") and failures[5][1].startswith("unreadable image")


def test_order_preserved_with_length_sorted_batches():
    """Varied lengths, batch size 3: each batch is length-sorted, yet every output row is
    its own input's vector."""
    rng = np.random.default_rng(0)
    texts = ["w" * int(n) + f" ad {i}" for i, n in enumerate(rng.permutation(np.arange(1, 120, 7)))]
    fake = FakeJina()
    enc = JinaClipV2Encoder(model=fake, batch_size=3)
    res = enc.encode(texts, [None] * len(texts))
    np.testing.assert_allclose(res.vectors, np.stack([expected_text(t) for t in texts]), atol=1e-6)
    sizes = [len(c["texts"]) for c in fake.text_calls]
    assert sizes == [3] * (len(texts) // 3) + ([len(texts) % 3] if len(texts) % 3 else [])
    assert all(c["batch_size"] == len(c["texts"]) for c in fake.text_calls)
    lengths = [len(t) for c in fake.text_calls for t in c["texts"]]
    assert lengths == sorted(lengths), "texts are not fed in length order"
    assert sorted(t for c in fake.text_calls for t in c["texts"]) == sorted(texts)
    # reversing the input reverses the output exactly
    rev = enc.encode(texts[::-1], [None] * len(texts))
    np.testing.assert_allclose(rev.vectors, res.vectors[::-1], atol=1e-6)


def test_images_are_pil_never_paths_and_batched(images):
    """encode_image only ever sees decoded 512x512 RGB PIL images, in image_batch_size
    chunks, mapped back to the right rows."""
    fake = FakeJina()
    enc = JinaClipV2Encoder(model=fake, batch_size=8, image_batch_size=2, image_workers=2)
    names = ["a.png", "b.jpg", "c.png", "a.png", "b.jpg"]
    paths = [str(images[n]) for n in names]
    texts = [f"ad {i}" for i in range(len(paths))]
    res = enc.encode(texts, paths)
    assert [len(c["images"]) for c in fake.image_calls] == [2, 2, 1]
    for call in fake.image_calls:
        for im in call["images"]:
            assert isinstance(im, Image.Image) and not isinstance(im, str | os.PathLike)
            assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB"
    for row, name in enumerate(names):
        want = l2_normalize(expected_text(texts[row]) + expected_image(images[name]))
        np.testing.assert_allclose(res.vectors[row], want, atol=1e-6)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 texts but 1 image"):
        JinaClipV2Encoder(model=FakeJina()).encode(["a", "b"], [None])


# --- the parallel image loader (base.py) ----------------------------------------------------


def test_parallel_loader_matches_sequential(images):
    """load_images_parallel == try_load_images: same pixels, same failures and reasons."""
    paths = [str(images[n]) for n in ["a.png", "missing.png", "b.jpg", "garbage.png", "truncated.png", "c.png"]]
    paths.insert(2, None)
    seq_images, seq_failures = try_load_images(paths, 224)
    par_images, par_failures = load_images_parallel(paths, 224, workers=3)
    assert par_failures == seq_failures and [f[0] for f in par_failures] == [1, 4, 5]
    for a, b in zip(seq_images, par_images, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.tobytes() == b.tobytes()


def test_image_stream_bounded_prefetch_and_order(images):
    paths = [str(images["a.png"]), str(images["b.jpg"])] * 10
    with ImageStream(paths, 32, workers=2, prefetch=3, loader=load_rgb_image) as stream:
        assert len(stream._window) == 3  # decoding started, bounded
        rows = [row for row, im in stream if im is not None]
    assert rows == list(range(20)) and stream.failures == []


def test_center_crop_keeps_aspect():
    """A 300x120 image: shorter side to 512, centre crop; the middle stays the middle."""
    arr = np.zeros((120, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # a white band in the middle third
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"adrec-crop-{os.getpid()}.png"
    Image.fromarray(arr).save(path)
    try:
        out = load_rgb_center_crop(str(path), 512)
    finally:
        path.unlink()
    assert out.size == (512, 512)
    px = np.asarray(out)
    # scaled width = 1280; crop covers 384..896, the band 427..853 -> crop cols ~43..469
    assert px[256, 256].min() > 200 and px[256, 5].max() < 50 and px[256, 506].max() < 50


# --- locating weights ---------------------------------------------------------------------


def _fake_model_dir(folder: Path, auto_map: dict | None = None, text_repo: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "jina_clip"}
    if auto_map:
        config["auto_map"] = auto_map
    if text_repo:
        config["text_config"] = {"hf_model_name_or_path": text_repo}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def _fake_cache_repo(cache: Path, repo_id: str, files: dict[str, str], commit: str = "0123abcd") -> Path:
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_locate_explicit_dir(tmp_path, no_jina):
    full = _fake_model_dir(tmp_path / "jina")
    assert locate_jina_weights(str(full)) == full.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert locate_jina_weights(str(empty)) is None
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    assert locate_jina_weights(str(config_only)) is None
    assert locate_jina_weights(str(tmp_path / "does-not-exist")) is None
    assert locate_jina_weights(None) is None  # empty cache, no env


def test_locate_via_env_var(tmp_path, no_jina, monkeypatch):
    full = _fake_model_dir(tmp_path / "jina")
    monkeypatch.setenv("ADREC_JINA_PATH", str(full))
    assert locate_jina_weights(None) == full.resolve()


def test_locate_in_hf_cache_layout(tmp_path, no_jina, monkeypatch):
    """models--jinaai--jina-clip-v2/snapshots/<commit>/ under $HF_HUB_CACHE (or $HF_HOME/hub);
    a dangling symlink (interrupted download) does not count."""
    snap = _fake_cache_repo(no_jina, "jinaai/jina-clip-v2", {"config.json": "{}"})
    (snap / "model.safetensors").symlink_to(no_jina / "blobs-missing")
    assert locate_jina_weights(None) is None
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").write_bytes(b"\0")
    assert locate_jina_weights(None) == snap
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert locate_jina_weights(None) is None
    monkeypatch.setenv("HF_HOME", str(no_jina.parent))
    (no_jina.parent / "hub").symlink_to(no_jina)
    assert locate_jina_weights(None) == no_jina.parent / "hub" / snap.relative_to(no_jina)


def test_missing_remote_code_is_reported(tmp_path, no_jina, monkeypatch):
    """The code repos named by config.json's auto_map (and the text tower's config) must be
    in the HF cache; the check reads them from the config, not from a fixed list."""
    monkeypatch.setattr(jina_mod, "REQUIRED_PACKAGES", ())
    _fake_cache_repo(no_jina, "jinaai/jina-clip-v2", {})
    weights = _fake_model_dir(
        next((no_jina / "models--jinaai--jina-clip-v2" / "snapshots").iterdir()),
        auto_map={"AutoModel": "jinaai/jina-clip-implementation--modeling_clip.JinaCLIPModel"},
        text_repo="jinaai/jina-embeddings-v3",
    )
    avail = check_jina_available(None)
    assert avail.weights_dir == weights and not avail.ready
    assert any("jinaai/jina-clip-implementation (modeling_clip.py)" in m for m in avail.missing)
    assert any("jinaai/jina-embeddings-v3" in m for m in avail.missing)
    _fake_cache_repo(no_jina, "jinaai/jina-clip-implementation", {"modeling_clip.py": ""})
    _fake_cache_repo(
        no_jina,
        "jinaai/jina-embeddings-v3",
        {
            "config.json": json.dumps(
                {"auto_map": {"AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"}}
            )
        },
    )
    avail = check_jina_available(None)
    assert avail.missing == [
        f"remote code jinaai/xlm-roberta-flash-implementation (modeling_lora.py) in HF cache {no_jina}"
    ]
    _fake_cache_repo(no_jina, "jinaai/xlm-roberta-flash-implementation", {"modeling_lora.py": ""})
    assert check_jina_available(None).ready


# --- selection ----------------------------------------------------------------------------


class _Stub:
    def __init__(self, encoder_id: str) -> None:
        self.encoder_id, self.dim = encoder_id, 768

    def encode(self, texts, image_paths):  # pragma: no cover - never called
        raise AssertionError


def test_auto_selects_offline_when_nothing_is_there(no_jina, monkeypatch):
    selection = select_encoder(AUTO)
    assert selection.name == OFFLINE
    assert "auto: Jina CLIP v2 not available locally" in selection.reason
    assert "weights: no config.json + model.safetensors" in selection.reason
    monkeypatch.setitem(ENCODER_BUILDERS, OFFLINE, lambda jina_path=None, **kw: _Stub("offline:stub"))
    encoder = build_encoder(AUTO, batch_size=8)
    assert encoder.encoder_id == "offline:stub" and encoder.selection_reason == selection.reason


def test_auto_selects_jina_when_everything_is_there(tmp_path, no_jina, monkeypatch):
    monkeypatch.setattr(jina_mod, "REQUIRED_PACKAGES", ())
    weights = _fake_model_dir(tmp_path / "jina")
    selection = select_encoder(AUTO, str(weights))
    assert selection.name == JINA and str(weights.resolve()) in selection.reason
    monkeypatch.setitem(ENCODER_BUILDERS, JINA, lambda jina_path=None, **kw: JinaClipV2Encoder(model=FakeJina(), **kw))
    encoder = build_encoder(AUTO, batch_size=8, jina_path=str(weights))
    assert encoder.encoder_id.startswith("jina-clip-v2") and "files found" in encoder.selection_reason


def test_explicit_choice_and_env_override(monkeypatch):
    monkeypatch.delenv("ADREC_ENCODER", raising=False)
    assert resolve_encoder_name("offline") == ("offline", "name='offline'")
    monkeypatch.setenv("ADREC_ENCODER", "jina-clip-v2")
    assert resolve_encoder_name("auto") == ("jina-clip-v2", "ADREC_ENCODER=jina-clip-v2")


def test_invalid_encoder_name_lists_choices(monkeypatch):
    from adrec_assets.resources import EncoderResource

    monkeypatch.setenv("ADREC_ENCODER", "clip-large")
    with pytest.raises(
        ValueError,
        match=r"'clip-large' \(from ADREC_ENCODER=clip-large\).*"
        r"\['auto', 'jina-clip-v2', 'offline'\]",
    ):
        EncoderResource().get()
    monkeypatch.delenv("ADREC_ENCODER")
    with pytest.raises(ValueError, match=r"'nope'.*\['auto', 'jina-clip-v2', 'offline'\]"):
        EncoderResource(name="nope").get()


def test_jina_requested_without_weights_fails_fast_with_instructions(no_jina, monkeypatch):
    from adrec_assets.resources import EncoderResource

    monkeypatch.setenv("ADREC_ENCODER", "jina-clip-v2")
    start = time.perf_counter()
    with pytest.raises(JinaWeightsMissing) as info:
        EncoderResource().get()
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    for needle in [
        "huggingface-cli download jinaai/jina-clip-v2",
        "jinaai/jina-clip-implementation",
        "jinaai/xlm-roberta-flash-implementation",
        "jinaai/jina-embeddings-v3",
        "ADREC_JINA_PATH=",
        "pip install -e '.[jina]'",
        "transformers<4.52",
        "CC-BY-NC-4.0",
        str(no_jina),
    ]:
        assert needle in message, needle


def test_missing_weights_error_imports_no_model_code(tmp_path):
    """The fail-fast path never imports torch or transformers (a fresh interpreter)."""
    code = (
        "import sys\n"
        "from adrec_assets.ml.encoders import build_encoder\n"
        "from adrec_assets.ml.encoders.jina import JinaWeightsMissing\n"
        "try:\n    build_encoder('jina-clip-v2')\nexcept JinaWeightsMissing:\n    pass\n"
        "else:\n    raise SystemExit('no error')\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("ADREC_JINA_PATH", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_dagster_cli_fails_within_seconds_with_instructions(tmp_path):
    """`ADREC_ENCODER=jina-clip-v2 dagster asset materialize ... ad_embeddings_raw` on a
    machine without the weights: the run fails and prints the download instructions."""
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").touch()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ADREC_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "ADREC_ENCODER": "jina-clip-v2",
    }
    env.pop("ADREC_JINA_PATH", None)
    reg = subprocess.run(
        [sys.executable, "-m", "adrec_assets.cli", "register", "synthetic"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reg.returncode == 0, reg.stderr
    start = time.perf_counter()
    run = subprocess.run(
        [
            str(bin_dir / "dagster"),
            "asset",
            "materialize",
            "-m",
            "adrec_assets.definitions",
            "--select",
            "raw_ads,ad_embeddings_raw",
            "--partition",
            "synthetic",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "JinaWeightsMissing" in output
    assert "huggingface-cli download jinaai/jina-clip-v2" in output
    assert elapsed < 60, f"took {elapsed:.1f} s"


# --- real weights (only where they are already on disk) -----------------------------------


def test_real_weights_if_present():
    weights = locate_jina_weights(None)
    if weights is None:
        pytest.skip(
            "Jina CLIP v2 weights not found locally: set ADREC_JINA_PATH or put "
            "jinaai/jina-clip-v2 in the HF cache (see JinaWeightsMissing's instructions)"
        )
    availability = check_jina_available(None)
    if availability.missing_packages:
        pytest.skip(
            f"Jina CLIP v2 weights found in {weights} but packages missing: "
            f"{availability.missing_packages} (pip install -e '.[jina]')"
        )
    enc = JinaClipV2Encoder(batch_size=4)
    running = str(CATALOG_IMAGES / "ad-running-13.png")
    finance = str(CATALOG_IMAGES / "ad-personal_finance-03.png")
    texts = [
        "Trail running shoes with aggressive lugs.",
        "Road running shoes, cushioned.",
        "Low-cost index funds for beginners.",
        "Trail running shoes with aggressive lugs.",
    ]
    res = enc.encode(texts, [None, None, None, running])
    assert res.vectors.shape == (4, 768) and res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-4)
    assert res.has_image.tolist() == [False, False, False, True]
    v = res.vectors
    assert v[0] @ v[1] > v[0] @ v[2]
    assert v[3] @ v[0] < 0.999  # the image contributed
    img = enc.encode_pil_images([load_rgb_center_crop(running, IMAGE_SIZE), load_rgb_center_crop(finance, IMAGE_SIZE)])
    assert img[0] @ v[0] > img[1] @ v[0]  # cross-modal: running image nearer the running text


# --- the real loading call, on a tiny local remote-code model -------------------------------

_TINY_CONFIG = """
from transformers import PretrainedConfig


class TinyClipConfig(PretrainedConfig):
    model_type = "tiny_clip_test"

    def __init__(self, width=1024, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""

_TINY_MODEL = '''
import numpy as np
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyClipConfig


class TinyClipModel(PreTrainedModel):
    """encode_text / encode_image with Jina's signatures; 1024-d outputs, Matryoshka-cut."""

    config_class = TinyClipConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(4, config.width, bias=False)

    def _out(self, feats, truncate_dim, normalize_embeddings):
        emb = self.proj(feats.to(self.device, self.dtype)).float()
        if truncate_dim:
            emb = emb[:, :truncate_dim]
        if normalize_embeddings:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.detach().cpu().numpy()

    def encode_text(self, sentences, task=None, batch_size=32, truncate_dim=None,
                    normalize_embeddings=True, **kwargs):
        feats = torch.tensor([[len(s), s.count(" ") + 1, sum(map(ord, s)) % 97, 1.0] for s in sentences])
        return self._out(feats, truncate_dim, normalize_embeddings)

    def encode_image(self, images, batch_size=32, truncate_dim=None, normalize_embeddings=True, **kwargs):
        feats = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)).tolist() + [1.0]
                                       for im in images]))
        return self._out(feats, truncate_dim, normalize_embeddings)
'''


def test_loads_local_remote_code_model_in_fp32_on_cpu(tmp_path, no_jina, monkeypatch, images):
    """JinaClipV2Encoder(path=...) goes through AutoModel.from_pretrained(dir,
    trust_remote_code=True, local_files_only=True): an fp16 checkpoint (like Jina's) comes
    back as fp32 on CPU and encodes through the real call path."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.setattr(jina_mod, "REQUIRED_PACKAGES", ())
    folder = tmp_path / "adrec_tiny_clip_test"  # transformers copies the code under this name
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(_TINY_CONFIG)
    (folder / "modeling_tiny.py").write_text(_TINY_MODEL)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "tiny_clip_test",
                "width": 1024,
                "torch_dtype": "float16",
                "auto_map": {
                    "AutoConfig": "configuration_tiny.TinyClipConfig",
                    "AutoModel": "modeling_tiny.TinyClipModel",
                },
            }
        )
    )
    weight = torch.randn(1024, 4, generator=torch.Generator().manual_seed(0)).half()
    save_file({"proj.weight": weight}, str(folder / "model.safetensors"), metadata={"format": "pt"})

    assert check_jina_available(str(folder)).ready  # local auto_map code sits beside the config
    enc = JinaClipV2Encoder(path=str(folder), device="cpu", batch_size=2)
    assert enc.model.dtype == torch.float32 and enc.model.device.type == "cpu"
    assert enc.weights_dir == folder.resolve()
    res = enc.encode(["a running shoe", "an index fund", "x"], [str(images["a.png"]), None, "nope.png"])
    assert res.vectors.shape == (3, 768) and res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    assert res.has_image.tolist() == [True, False, False] and res.n_image_failures == 1
    from transformers.utils import HF_MODULES_CACHE

    shutil.rmtree(Path(HF_MODULES_CACHE) / "transformers_modules" / folder.name, ignore_errors=True)
