"""Input handling: 'caffe' preprocessing inside the model, and image decoding."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode
from pipeline.model import caffe_preprocess


def test_caffe_preprocess_matches_keras():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    expected = keras.applications.resnet.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(np.asarray(caffe_preprocess(pixels)), expected, rtol=1e-6, atol=1e-4)
    assert np.asarray(caffe_preprocess(pixels[..., :1, :1, :]))[0, 0, 0, 0] == pytest.approx(
        float(pixels[0, 0, 0, 2]) - 103.939, abs=1e-4
    )


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_crop_resizes_shorter_side_then_center_crops():
    # A 640x480 image whose left and right thirds are black: a center crop of the 256-high resize is all white.
    array = np.zeros((480, 640, 3), np.uint8)
    array[:, 200:440] = 255
    pixels, width, height = decode(encode(Image.fromarray(array), "PNG"), "crop")
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert (width, height) == (640, 480)
    assert pixels[:, 112].min() == 255
    squashed, _, _ = decode(encode(Image.fromarray(array), "PNG"), "squash")
    assert squashed.shape == (224, 224, 3) and squashed[:, 0].max() == 0  # the black margin survives


def test_exif_orientation_is_applied():
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    pixels, width, height = decode(encode(Image.fromarray(array), exif=exif), "squash")
    assert (width, height) == (40, 80)  # the upright image is portrait
    assert pixels[:100].mean() > 200 and pixels[124:].mean() < 50  # white half now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_modes_become_rgb(mode):
    image = (
        Image.new("RGB", (50, 30), (200, 100, 50)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (50, 30), 65535)
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels, _, _ = decode(encode(image, fmt))
    assert pixels.shape == (224, 224, 3)
    if mode == "I;16":
        assert pixels.min() == 255  # 16-bit full scale maps to 8-bit full scale, not clipped noise


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html>not an image</html>", "not a readable image"),
        (encode(Image.new("RGB", (300, 300)))[:200], "corrupt|truncated|readable"),
    ],
)
def test_bad_images_raise_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(data)


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(DecodeError, match="too large: 300x200"):
        decode(encode(Image.new("RGB", (300, 200))), max_pixels=50_000)


def test_large_jpegs_decode_at_reduced_scale_with_the_same_result():
    from pipeline.decode import _draft, fit
    from pipeline.samples import photo

    big = photo("china.jpg").resize((2560, 1708), Image.Resampling.BICUBIC)
    data = encode(big, quality=95)
    opened = Image.open(io.BytesIO(data))
    _draft(opened, "crop", 224)
    assert opened.size == (640, 427)  # libjpeg decodes at 1/4 scale: still over 256 on the short side

    drafted, width, height = decode(data, "crop")
    full = fit(Image.open(io.BytesIO(data)).convert("RGB"), "crop")
    assert (width, height) == (2560, 1708)  # the original size is reported, not the drafted one
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 4  # the same picture, within resampling noise


@pytest.mark.parametrize(
    ("variant", "reference", "tolerance"),
    [
        ("photo.png", "rgb", 0.01),  # lossless
        ("photo.bmp", "rgb", 0.01),
        ("photo.tiff", "rgb", 0.01),
        ("photo.jpg", "rgb", 3),  # JPEG at quality 92
        ("photo.webp", "rgb", 4),
        ("rgba.png", "rgb", 0.01),  # fully opaque alpha: composited onto white changes nothing
        ("cmyk.jpg", "rgb", 4),
        ("exif-rotated.jpg", "rgb", 4),  # stored a quarter-turn off; upright again after decoding
        ("gray.jpg", "gray", 3),
        ("sixteen-bit.png", "gray", 0.6),  # 16-bit scaled back to 8 bits, not clipped
        ("palette-transparent.png", "rgb", 12),  # 64 colours
        ("animated.gif", "rgb", 12),  # the first frame, 128 colours
    ],
)
def test_every_variant_decodes_to_the_picture_it_shows(variant, reference, tolerance):
    from pipeline.samples import VARIANTS, photo

    original = photo("china.jpg")
    expected_image = original if reference == "rgb" else original.convert("L").convert("RGB")
    expected = np.asarray(expected_image.resize((224, 224), Image.Resampling.BILINEAR), dtype=float)
    pixels, width, height = decode(VARIANTS[variant](original), "squash")
    assert (width, height) == original.size
    assert np.abs(pixels.astype(float) - expected).mean() <= tolerance, variant
