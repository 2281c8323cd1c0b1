"""The content-hash encoding cache (``adrec_assets.ml.encoders.cache``): unchanged ads are
reused bit for bit without calling the encoder, any change of text, image bytes or encoder
re-encodes exactly the affected ads, a broken cache file never fails a run, invalid entries
heal themselves, image bytes are hashed under the same rules as the encoders read them, and a
second materialization of ``ad_embeddings_raw`` encodes nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from adrec_assets.ml.encoders import EncodeResult
from adrec_assets.ml.encoders.base import ImageAccess, ImageRefused
from adrec_assets.ml.encoders.cache import (
    HASH_HEX_LEN,
    EncodingCache,
    content_hashes,
    encode_with_cache,
)
from adrec_assets.resources import EncoderResource
from adrec_assets.settings import ENCODER_CACHE_DIR
from adrec_assets.sources.catalog import data_dir
from adrec_assets_tests.pipeline_fixtures import load_from_run, materialize_pipeline
from adrec_assets_tests.test_file_sources import AD_IDS, AD_TEXTS, write_valid_source

CACHE_LOGGER = "adrec_assets.ml.encoders.cache"


class CountingEncoder:
    """Deterministic fake encoder: the vector is a seeded function of the text and the image
    bytes; every ``encode`` call's texts are recorded. Images are read through the given
    ``ImageAccess`` and those that cannot be read or opened with PIL are reported as failures,
    like the real encoders do."""

    def __init__(self, encoder_id: str = "fake:v1", dim: int = 8) -> None:
        self.encoder_id = encoder_id
        self.dim = dim
        self.calls: list[list[str]] = []

    @property
    def encoded_texts(self) -> list[str]:
        return [t for call in self.calls for t in call]

    def encode(
        self, texts: Sequence[str], image_paths: Sequence[str | None], image_access: ImageAccess | None = None
    ) -> EncodeResult:
        self.calls.append(list(texts))
        access = image_access or ImageAccess()
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        has_image = np.zeros(len(texts), dtype=bool)
        failures = []
        for row, (text, path) in enumerate(zip(texts, image_paths)):
            seed = hashlib.sha256(f"{self.encoder_id}|{text}".encode()).digest()
            if path:
                try:
                    data = access.read(path)
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                    seed += data
                    has_image[row] = True
                except FileNotFoundError:
                    failures.append((row, str(path), "file not found"))
                except ImageRefused as exc:
                    failures.append((row, str(path), f"refused: {exc}"))
                except OSError as exc:
                    failures.append((row, str(path), f"unreadable image: {exc}"))
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
            v = rng.standard_normal(self.dim)
            vectors[row] = v / np.linalg.norm(v)
        return EncodeResult(vectors=vectors, has_image=has_image, image_failures=failures)


def write_png(path: Path, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="PNG")
    return str(path)


@pytest.fixture
def cache(tmp_path) -> EncodingCache:
    return EncodingCache(tmp_path / "cache")


TEXTS = ["red running shoes", "index funds for beginners", "pizza in 30 minutes", "sushi night"]


# ---------------------------------------------------------------- content hashes


def test_content_hashes_cover_text_and_image_bytes_not_the_path(tmp_path):
    a = write_png(tmp_path / "a" / "img.png", (255, 0, 0))
    moved = tmp_path / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    shutil.copyfile(a, moved)
    h = content_hashes(["x", "x", "x", "x", "x", "y"], [a, str(moved), None, "", str(tmp_path / "gone.png"), a])
    assert h.dtype == np.dtype(f"<U{HASH_HEX_LEN}") and all(len(s) == HASH_HEX_LEN for s in h)
    assert h[0] == h[1]  # same bytes, other path: same hash
    assert h[2] == h[3]  # None and "" both mean "no image"
    assert len({h[0], h[2], h[4], h[5]}) == 4  # image / none / missing / other text
    write_png(Path(a), (0, 0, 255))  # new bytes at the same path
    assert content_hashes(["x"], [a])[0] != h[0]
    # the text/image boundary is unambiguous
    assert content_hashes(["ab"], [None])[0] != content_hashes(["a"], [None])[0]


# ---------------------------------------------------------------- encode_with_cache


def test_unchanged_ads_are_reused_bit_for_bit_without_calling_the_encoder(cache, tmp_path):
    img = write_png(tmp_path / "img.png", (10, 20, 30))
    paths = [img, None, None, img]
    first_encoder = CountingEncoder()
    first = encode_with_cache(first_encoder, TEXTS, paths, cache)
    assert (first.n_cache_hits, first.n_encoded) == (0, 4) and first_encoder.encoded_texts == TEXTS
    assert first.cache_path == cache.path_for("fake:v1") and first.cache_path.exists()

    encoder = CountingEncoder()
    second = encode_with_cache(encoder, TEXTS, paths, cache)
    assert encoder.calls == []  # not even an empty call
    assert (second.n_cache_hits, second.n_encoded) == (4, 0)
    np.testing.assert_array_equal(second.result.vectors, first.result.vectors)
    assert second.result.vectors.dtype == np.float32
    assert second.result.has_image.tolist() == first.result.has_image.tolist() == [True, False, False, True]
    assert second.result.image_failures == [] and second.encode_seconds == 0.0


def test_changed_text_re_encodes_only_that_ad(cache):
    encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache)
    before = encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache).result.vectors
    texts = [*TEXTS[:2], "pizza in 20 minutes", TEXTS[3]]
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, texts, [None] * 4, cache)
    assert encoder.calls == [["pizza in 20 minutes"]]
    assert (out.n_cache_hits, out.n_encoded) == (3, 1)
    np.testing.assert_array_equal(out.result.vectors[[0, 1, 3]], before[[0, 1, 3]])
    np.testing.assert_array_equal(out.result.vectors[2], CountingEncoder().encode(texts[2:3], [None]).vectors[0])
    assert not np.array_equal(out.result.vectors[2], before[2])


def test_new_image_bytes_at_the_same_path_re_encode_that_ad(cache, tmp_path):
    img = write_png(tmp_path / "ad.png", (200, 0, 0))
    paths = [None, img, None, None]
    before = encode_with_cache(CountingEncoder(), TEXTS, paths, cache).result
    write_png(Path(img), (0, 200, 0))  # same path, different picture
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS, paths, cache)
    assert encoder.calls == [[TEXTS[1]]] and (out.n_cache_hits, out.n_encoded) == (3, 1)
    assert not np.array_equal(out.result.vectors[1], before.vectors[1])
    assert out.result.has_image.tolist() == [False, True, False, False]


def test_moving_the_images_keeps_the_cache(cache, tmp_path):
    img = write_png(tmp_path / "v1" / "ad.png", (1, 2, 3))
    encode_with_cache(CountingEncoder(), TEXTS[:1], [img], cache)
    shutil.move(tmp_path / "v1", tmp_path / "v2")
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS[:1], [str(tmp_path / "v2" / "ad.png")], cache)
    assert encoder.calls == [] and out.n_cache_hits == 1


def test_an_image_added_to_an_ad_without_one_re_encodes_it(cache, tmp_path):
    encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache)
    img = write_png(tmp_path / "new.png", (5, 5, 5))
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS, [None, None, img, None], cache)
    assert encoder.calls == [[TEXTS[2]]] and out.n_encoded == 1
    assert out.result.has_image.tolist() == [False, False, True, False]


def test_a_missing_image_is_re_encoded_each_run_and_picked_up_once_it_appears(cache, tmp_path):
    """A failed image is never cached: the failure keeps being reported (a cache hit would hide
    it), and once the file exists the ad gets its image vector."""
    missing = tmp_path / "later.png"
    paths = [None, str(missing), None, None]
    first = encode_with_cache(CountingEncoder(), TEXTS, paths, cache)
    assert [row for row, _, _ in first.result.image_failures] == [1]

    encoder = CountingEncoder()
    again = encode_with_cache(encoder, TEXTS, paths, cache)
    assert encoder.calls == [[TEXTS[1]]] and (again.n_cache_hits, again.n_encoded) == (3, 1)
    assert [(row, reason) for row, _, reason in again.result.image_failures] == [(1, "file not found")]

    write_png(missing, (9, 9, 9))
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS, paths, cache)
    assert encoder.calls == [[TEXTS[1]]] and out.result.image_failures == []
    assert out.result.has_image.tolist() == [False, True, False, False]
    encoder = CountingEncoder()
    assert encode_with_cache(encoder, TEXTS, paths, cache).n_cache_hits == 4 and encoder.calls == []


def test_image_failures_name_the_original_rows(cache, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    texts = [*TEXTS, "a fifth ad", "a sixth ad"]
    encode_with_cache(CountingEncoder(), texts[:4], [None] * 4, cache)  # rows 0-3 cached
    paths = [None, None, None, None, str(tmp_path / "nope.png"), str(garbage)]
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, texts, paths, cache)
    assert encoder.calls == [texts[4:]]  # the encoder saw them as its rows 0 and 1
    failures = {row: (path, reason) for row, path, reason in out.result.image_failures}
    assert sorted(failures) == [4, 5]
    assert failures[4] == (paths[4], "file not found") and failures[5][1].startswith("unreadable image")
    assert out.result.n_image_failures == 2


def test_another_encoder_reuses_nothing_and_entries_never_mix(cache):
    v1 = encode_with_cache(CountingEncoder("fake:v1"), TEXTS, [None] * 4, cache)
    other = CountingEncoder("fake:v2")
    v2 = encode_with_cache(other, TEXTS, [None] * 4, cache)
    assert other.encoded_texts == TEXTS and (v2.n_cache_hits, v2.n_encoded) == (0, 4)
    assert v2.cache_path != v1.cache_path and v1.cache_path.exists() and v2.cache_path.exists()
    assert not np.allclose(v1.result.vectors, v2.result.vectors)
    for encoder_id, expected in (("fake:v1", v1), ("fake:v2", v2)):
        encoder = CountingEncoder(encoder_id)
        out = encode_with_cache(encoder, TEXTS, [None] * 4, cache)
        assert encoder.calls == [] and out.n_cache_hits == 4
        np.testing.assert_array_equal(out.result.vectors, expected.result.vectors)
    with np.load(v2.cache_path, allow_pickle=False) as data:
        assert str(data["encoder_id"]) == "fake:v2"


def test_without_a_cache_everything_is_encoded(tmp_path):
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS, [None] * 4, None)
    assert encoder.calls == [TEXTS] and (out.n_cache_hits, out.n_encoded) == (0, 4) and out.cache_path is None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "damage",
    [
        lambda path, cache: path.write_bytes(b"PK\x03\x04 this is not a zip file"),
        lambda path, cache: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
        lambda path, cache: path.write_bytes(b""),
        # another encoder's file under this encoder's name
        lambda path, cache: shutil.copyfile(
            cache.update("fake:other", content_hashes(["z"], [None]), np.eye(1, 8, dtype=np.float32), [False]), path
        ),
        # same encoder id, vectors of another width
        lambda path, cache: (
            path.unlink(),
            cache.update("fake:v1", content_hashes(["z"], [None]), np.eye(1, 4), [False]),
        ),
    ],
    ids=["garbage", "truncated", "empty", "other-encoder", "other-dim"],
)
def test_a_broken_cache_file_is_a_warning_and_gets_rewritten(cache, caplog, damage):
    first = encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache)
    damage(first.cache_path, cache)
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        out = encode_with_cache(encoder, TEXTS, [None] * 4, cache)
    assert encoder.encoded_texts == TEXTS and (out.n_cache_hits, out.n_encoded) == (0, 4)
    assert any(r.name == CACHE_LOGGER and str(first.cache_path) in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out.result.vectors, first.result.vectors)
    # the file was rewritten whole: the next run hits again
    encoder = CountingEncoder()
    assert encode_with_cache(encoder, TEXTS, [None] * 4, cache).n_cache_hits == 4 and encoder.calls == []


def test_update_merges_with_the_file_new_values_win_and_needs_no_pickle(cache):
    h = content_hashes(["a", "b", "c"], [None] * 3)
    cache.update("e", h[:2], np.eye(2, 3, dtype=np.float32), [True, False])
    newer = np.tile(np.asarray([0.0, 0.6, 0.8], dtype=np.float32), (2, 1))  # unit rows: storable
    path = cache.update("e", h[1:], newer, [True, True])
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["encoder_id", "has_image", "hashes", "vectors"]
        assert len(data["hashes"]) == 3 and data["vectors"].dtype == np.float32
    found = cache.lookup("e", np.array([h[2], "f" * 64, h[0], h[1]]), dim=3)
    assert found.hit_mask.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(found.vectors, [newer[0], [1, 0, 0], newer[0]])
    assert found.has_image.tolist() == [True, True, True]
    assert not [p for p in cache.root.iterdir() if ".tmp" in p.name]  # atomic: no temp files left


def _tamper(path: Path, change) -> None:
    """Rewrite a cache file in place with ``change(vectors)`` applied (a well-formed file)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name].copy() for name in data.files}
    change(arrays["vectors"])
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_invalid_cached_entries_are_dropped_re_encoded_and_the_file_rewritten(cache, caplog):
    first = encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache)
    order = np.argsort(content_hashes(TEXTS, [None] * 4))  # the file stores entries sorted by hash
    spoiled = sorted(int(order[k]) for k in (0, 2))

    def spoil(vectors: np.ndarray) -> None:
        vectors[0] *= 2.0  # finite, wrong norm
        vectors[2, 0] = np.nan

    _tamper(first.cache_path, spoil)
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        out = encode_with_cache(encoder, TEXTS, [None] * 4, cache)
    assert encoder.calls == [[TEXTS[i] for i in spoiled]]  # only the spoiled entries, in input order
    assert (out.n_cache_hits, out.n_encoded) == (2, 2)
    np.testing.assert_array_equal(out.result.vectors, first.result.vectors)
    warnings = [r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER]
    assert len(warnings) == 1 and str(first.cache_path) in warnings[0] and "2 of 4 entries" in warnings[0]
    with np.load(first.cache_path, allow_pickle=False) as data:  # healed on disk
        np.testing.assert_allclose(np.linalg.norm(data["vectors"], axis=1), 1.0, atol=1e-6)
    caplog.clear()
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        assert encode_with_cache(encoder, TEXTS, [None] * 4, cache).n_cache_hits == 4
    assert encoder.calls == [] and not caplog.records


def test_invalid_entries_of_other_ads_are_purged_even_when_every_asked_ad_hits(cache):
    encode_with_cache(CountingEncoder(), TEXTS, [None] * 4, cache)
    path = cache.path_for("fake:v1")
    stale = sorted(content_hashes(TEXTS, [None] * 4).tolist()).index(content_hashes(TEXTS[3:], [None])[0])
    _tamper(path, lambda vectors: vectors.__setitem__(stale, 0.0))  # a zero vector: not unit length
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS[:3], [None] * 3, cache)
    assert encoder.calls == [] and out.n_cache_hits == 3
    with np.load(path, allow_pickle=False) as data:
        assert len(data["hashes"]) == 3 and content_hashes(TEXTS[3:], [None])[0] not in data["hashes"]


def test_cache_update_never_stores_a_row_that_is_not_a_finite_unit_vector(cache):
    h = content_hashes(["a", "b", "c"], [None] * 3)
    vectors = np.asarray([[1, 0, 0], [0, 3, 0], [np.inf, 0, 0]], dtype=np.float32)
    cache.update("e", h, vectors, [False] * 3)
    assert cache.lookup("e", h, dim=3).hit_mask.tolist() == [True, False, False]


# ---------------------------------------------------------------- image bytes are read safely


def test_hashing_never_reads_a_fifo_or_a_file_outside_the_image_root(tmp_path):
    from adrec_assets.ml.encoders.base import ImageAccess

    root = tmp_path / "src"
    img = write_png(root / "images" / "a.png", (1, 2, 3))
    os.mkfifo(root / "images" / "pipe.png")
    unreadable = content_hashes(["x"], [str(tmp_path / "missing.png")])[0]
    access = ImageAccess(str(root))
    # The FIFO hashes like an unreadable image (and the call returns: it never blocks).
    assert content_hashes(["x"], [str(root / "images" / "pipe.png")], access)[0] == unreadable
    outside = write_png(tmp_path / "outside.png", (9, 9, 9))
    readable = content_hashes(["x"], [img], access)[0]
    os.unlink(img)
    os.symlink(outside, img)
    assert content_hashes(["x"], [img], access)[0] == unreadable  # the outside bytes are not read
    assert content_hashes(["x"], [img])[0] not in (unreadable, readable)  # unconfined, the link is followed
    assert content_hashes(["x"], [outside], ImageAccess(max_bytes=10))[0] == unreadable  # over the cap


def test_encode_with_cache_confines_images_to_the_catalogue_root(cache, tmp_path):
    root = tmp_path / "src"
    inside = write_png(root / "images" / "in.png", (50, 60, 70))
    outside = write_png(tmp_path / "elsewhere" / "out.png", (1, 1, 1))
    escaped = str(root / "images" / "link.png")
    os.symlink(outside, escaped)
    paths = [inside, escaped, None, None]
    encoder = CountingEncoder()
    out = encode_with_cache(encoder, TEXTS, paths, cache, image_root=str(root))
    assert out.result.has_image.tolist() == [True, False, False, False]
    ((row, path, reason),) = out.result.image_failures
    assert (row, path) == (1, escaped) and reason.startswith("refused:") and "symlink" in reason
    # The refused image is not cached: the next run tries (and reports) it again.
    encoder = CountingEncoder()
    again = encode_with_cache(encoder, TEXTS, paths, cache, image_root=str(root))
    assert encoder.calls == [[TEXTS[1]]] and again.result.n_image_failures == 1
    # The same files without a root: the link is followed and the image used.
    assert encode_with_cache(CountingEncoder(), TEXTS, paths, None).result.has_image.tolist()[:2] == [True, True]


# ---------------------------------------------------------------- the resource


def test_encoder_resource_cache_location_and_switch(tmp_path, monkeypatch):
    monkeypatch.setenv(ENCODER_CACHE_DIR.name, str(tmp_path / "env"))
    assert EncoderResource().encoding_cache().root == tmp_path / "env"
    assert EncoderResource(cache_dir=str(tmp_path / "cfg")).encoding_cache().root == tmp_path / "cfg"
    assert EncoderResource(use_cache=False).encoding_cache() is None
    monkeypatch.delenv(ENCODER_CACHE_DIR.name)
    assert EncoderResource().cache_root() == data_dir() / "cache" / "encodings"  # not created here


# ---------------------------------------------------------------- the asset


def _ad_embeddings_run(instance, base: Path, root: Path, cache_dir: Path):
    result = materialize_pipeline(
        instance,
        base,
        partition="shop",
        selection=["raw_ads", "ad_embeddings_raw"],
        root=str(root),
        encoder_cache_dir=cache_dir,
    )
    assert result.success
    meta = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }["ad_embeddings_raw"]
    return {k: v.value for k, v in meta.items()}, load_from_run(base, result, "ad_embeddings_raw", "shop")


def test_rematerializing_ad_embeddings_raw_encodes_only_changed_ads(tmp_path, single_torch_thread):
    root, base, cache_dir = tmp_path / "sources", tmp_path / "artifacts", tmp_path / "encoder_cache"
    folder = write_valid_source(root, "shop", images={0: "images/a.png"})
    write_png(folder / "images" / "a.png", (120, 30, 200))
    n_ads = len(AD_IDS)
    with dg.instance_for_test() as instance:
        meta, first = _ad_embeddings_run(instance, base, root, cache_dir)
        assert (meta["n_cache_hits"], meta["n_encoded"]) == (0, n_ads)
        cache_file = Path(meta["encoding_cache"])
        assert cache_file.parent == cache_dir and cache_file.exists()
        assert meta["ads_per_second"] > 0

        meta, second = _ad_embeddings_run(instance, base, root, cache_dir)
        assert (meta["n_cache_hits"], meta["n_encoded"]) == (n_ads, 0)
        assert meta["ads_per_second"] == 0.0 and meta["n_ads"] == n_ads and meta["n_ads_with_image"] == 1
        assert meta["encoding_cache"] == str(cache_file)
        np.testing.assert_array_equal(second.vectors, first.vectors)
        assert second.has_image.tolist() == first.has_image.tolist() == [True] + [False] * 5

        ads = folder / "ads.csv"
        ads.write_text(ads.read_text().replace(AD_TEXTS[3], "A savings account that pays 5% interest."))
        meta, third = _ad_embeddings_run(instance, base, root, cache_dir)
        assert (meta["n_cache_hits"], meta["n_encoded"]) == (n_ads - 1, 1)
        keep = [i for i in range(n_ads) if i != 3]
        np.testing.assert_array_equal(third.vectors[keep], first.vectors[keep])
        assert np.abs(third.vectors[3] - first.vectors[3]).max() > 1e-3
