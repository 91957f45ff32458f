"""Input handling: 'caffe' preprocessing inside the model, and image decoding."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

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


PEAK_MEMORY = """
import re, sys
from pathlib import Path
from PIL import Image
from pipeline.decode import decode

def peak():
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

Image.init()
data = Path(sys.argv[1]).read_bytes()
before = peak()
decode(data, "crop")
print(peak() - before)
"""


def large_image(mode: str, side: int) -> bytes:
    """A ``side`` x ``side`` image in ``mode``, mostly flat: a small file that decodes to many pixels."""
    colours = {
        "I;16": (20000, 50000),
        "I": (20000, 50000),
        "F": (20.5, 200.5),
        "RGBA": ((20, 120, 220, 255), (240, 200, 0, 100)),
        "P": (0, 1),
    }
    background, foreground = colours[mode]
    image = Image.new(mode, (side, side), background)
    image.paste(foreground, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    if mode == "P":
        image.putpalette([255, 255, 255, 200, 30, 30])
        return encode(image, "PNG", transparency=0)
    return encode(image, "TIFF", compression="tiff_deflate") if mode in ("I", "F") else encode(image, "PNG")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from Linux's /proc")
@pytest.mark.parametrize(("mode", "decoded_bytes_per_pixel"), [("I;16", 2), ("I", 4), ("F", 4), ("RGBA", 4), ("P", 1)])
def test_decoding_memory_is_bounded_by_the_decoded_image(tmp_path, mode, decoded_bytes_per_pixel):
    # Issue 18: a 16-bit PNG of 172 KB took 2.3 GB (float64 of the whole image); alpha took several RGBA copies.
    side = 4000
    path = tmp_path / "image"
    path.write_bytes(large_image(mode, side))
    with Image.open(path) as opened:
        assert opened.mode == mode
    # A fresh process each (peak memory is a high-water mark; VmHWM, unlike ru_maxrss, is not the parent's).
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    extra = int(result.stdout)
    # What cannot be avoided: Pillow's decoded pixels and one 8-bit RGB copy (Pillow keeps RGB at 4 bytes a pixel),
    # at most 2.67x width x height x 3; plus 32 MiB for the band of rows being converted (~5 MiB) and allocator noise.
    bound = (decoded_bytes_per_pixel + 4) * side * side + 32 * 2**20
    assert extra <= bound, f"{mode}: {extra / 2**20:.0f} MiB over {bound / 2**20:.0f} MiB"
